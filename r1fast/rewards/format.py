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

Counted once: some checkers already pay for the format. Countdown scores as TinyZero does (0 for
no answer, 0.1 for an extracted but wrong equation, 1.0 for a correct one), so its 0.1 *is* the
format reward; a separate format part on top would count the format twice (0.2 for a wrong
equation, 1.1 for a right one). Rows whose ``reward`` field names such a checker
(``credited_elsewhere``, default ``("countdown",)``) score 0 here, with a one-time warning, so a
recipe with ``weights = {accuracy = 1.0, format = 0.1}`` gives Countdown rows exactly TinyZero's
scores and every other row R1's accuracy + format.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from r1fast.rewards.extract import DEFAULT_MAX_CHARS, THINK_CLOSE, THINK_OPEN, last_boxed
from r1fast.checks import check_range

log = logging.getLogger("r1fast.rewards")
_WARNED: set[str] = set()


def _warn_once(checker: str) -> None:
    if checker not in _WARNED:
        _WARNED.add(checker)
        log.warning("format reward: rows checked by %r already carry their format credit "
                    "(TinyZero's 0.1 for an answered equation); the format part scores them 0 "
                    "so the format counts once (FormatRewardConfig.credited_elsewhere)", checker)


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
    credited_elsewhere: tuple[str, ...] = ("countdown",)
    """Checkers (a row's ``reward`` field) whose score already includes format credit; rows
    they check score 0 here so the format counts once (see the module docstring); () scores
    every row."""

    def __post_init__(self):
        check_range("max_chars", self.max_chars, 1)
        names = self.credited_elsewhere
        if not isinstance(names, tuple) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"credited_elsewhere must be a tuple of reward names, got {names!r}")


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
        checker = (example or {}).get("reward")
        if checker is not None and checker in self.config.credited_elsewhere:
            _warn_once(checker)
            return 0.0
        return self.config.score if is_well_formed(completion, self.config) else 0.0

    def __repr__(self) -> str:
        return f"FormatReward({self.config})"
