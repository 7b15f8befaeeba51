"""Format reward: reasoning inside ``<think> ... </think>``, then a non-empty answer.

R1-Zero's second rule-based reward. Two strictness levels:

- strict (default): after optional leading whitespace the completion opens with ``<think>``
  (unless the prompt already did, ``think_in_prompt``), contains exactly one ``<think>`` and one
  ``</think>``, the thought between them is non-blank, and the text after ``</think>`` is a
  non-blank answer; with ``require_boxed`` that answer must hold a complete, non-empty
  ``\\boxed{...}``.
- lenient (``strict=False``): some ``</think>`` followed by a non-blank answer (and a box when
  required); extra or missing ``<think>`` tags are tolerated.

Only ``str.find``/``count`` and the linear box scanner are used: no regular expression that
could backtrack on hostile text.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from r1fast.rewards.extract import DEFAULT_MAX_CHARS, THINK_CLOSE, THINK_OPEN, last_boxed


@dataclass(frozen=True)
class FormatRewardConfig:
    """Strictness and score of the format reward."""

    strict: bool = True
    """Exactly one think block at the start (see module docstring); False: lenient."""
    require_boxed: bool = True
    """The answer after ``</think>`` must contain a complete non-empty ``\\boxed{}``."""
    think_in_prompt: bool = False
    """The prompt ends with ``<think>``: the completion starts inside the thought."""
    score: float = 1.0
    """Reward for a well-formed completion (0 otherwise)."""
    max_chars: int = 4 * DEFAULT_MAX_CHARS
    """Completions longer than this are not well-formed (bounds the scan)."""

    def __post_init__(self):
        from r1fast.ops._validate import check_range  # lazy: keeps reward workers torch-free
        check_range("max_chars", self.max_chars, 1)


def is_well_formed(completion: str, config: FormatRewardConfig | None = None) -> bool:
    """Whether ``completion`` follows the think-then-answer format."""
    cfg = config or FormatRewardConfig()
    text = completion
    if len(text) > cfg.max_chars:
        return False
    if cfg.strict:
        if not cfg.think_in_prompt:
            text = text.lstrip()
            if not text.startswith(THINK_OPEN):
                return False
            text = text[len(THINK_OPEN):]
        if THINK_OPEN in text or text.count(THINK_CLOSE) != 1:
            return False
        thought, _, answer = text.partition(THINK_CLOSE)
    else:
        close = text.rfind(THINK_CLOSE)
        if close < 0:
            return False
        thought, answer = text[:close], text[close + len(THINK_CLOSE):]
    if cfg.strict and not thought.strip():
        return False
    if not answer.strip():
        return False
    if cfg.require_boxed:
        boxed = last_boxed(answer)
        if boxed is None or not boxed.strip():
            return False
    return True


class FormatReward:
    """``(completion, example) -> score | 0.0``; the example is not used."""

    name = "format"
    sandbox = False

    def __init__(self, config: FormatRewardConfig | None = None, **overrides):
        base = config or FormatRewardConfig()
        self.config = replace(base, **overrides) if overrides else base

    def __call__(self, completion: str, example: dict | None = None) -> float:
        return self.config.score if is_well_formed(completion, self.config) else 0.0

    def __repr__(self) -> str:
        return f"FormatReward({self.config})"
