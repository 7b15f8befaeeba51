"""Which rejection-sampled answers become SFT data: R1's stage-3 filters, each a named reason.

DeepSeek-R1's third stage samples many answers per prompt from the RL checkpoint and keeps only
the correct ones that a person could read: the report filters out chains of thought with mixed
languages, long paragraphs and code blocks. Here every rule is a small predicate with its
threshold in :class:`RejectionFilterConfig`, and every dropped sample is counted under the
*first* rule it fails, in this order (cheap and decisive rules first):

==================  =================================================================
``empty``           nothing but whitespace (always on: an SFT row needs a completion)
``truncated``       cut at ``max_new_tokens`` before a stop token (on in every preset: SFT
                    appends the eos, so the student would learn to stop mid-text)
``too_long``        longer than ``max_chars`` characters (0: no limit)
``unparsable``      not ``<think>...</think>`` + a non-empty ``\\boxed{}`` answer
``wrong``           the example's checker (its ``reward`` field, else math accuracy)
                    scores it below 1
``timeout``         the checker ran past ``checker_cpu_time_s`` CPU seconds (counted apart
                    from ``wrong``: a hard-to-check answer may well be right)
``checker_error``   the checker raised, or returned no finite number (the first error is
                    named in the summary's ``first_checker_error``; the stage goes on, as
                    training scores a failing reward 0 and goes on)
``mixed_language``  share of thought words in ``language`` below ``min_language_share``
``long_paragraph``  a paragraph (text between blank lines) over ``max_paragraph_chars``
``code_block``      a fenced (```) code block
``duplicate``       the same text (whitespace-normalised) as an answer already kept for
                    this prompt
==================  =================================================================

so ``kept + sum(rejected.values()) + over_limit == samples`` (``over_limit``: distinct
passing answers beyond ``keep_per_prompt``). :func:`filter_samples` returns the kept rows and
that summary; :func:`format_summary` prints it as a table.

Checkers are looked up only when the rules need correctness (``keep="well_formed"`` and
``"all"`` never score an answer, so a ``reward_model`` row is fine there), and all of them
before the first sample is scored: :func:`resolve_checkers` is cheap and can run before
sampling, so a row that no checker can score fails at once, naming the row.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from r1fast.rewards import is_well_formed
from r1fast.rewards.workers import bounded_call
from r1fast.rewards.extract import as_scored
from r1fast.rewards.format import FormatRewardConfig
from r1fast.rewards.language import LANGUAGE_SCRIPTS, LanguageRewardConfig, language_consistency
from r1fast.rewards.registry import available_rewards
from r1fast.checks import check_choice, check_range, one_line

REASONS = ("empty", "truncated", "too_long", "unparsable", "wrong", "timeout", "checker_error",
           "mixed_language", "long_paragraph", "code_block", "duplicate")
CODE_FENCE = "```"
Checker = Callable[[str, dict], float]
log = logging.getLogger("r1fast.pipeline")


@dataclass(frozen=True, kw_only=True)
class RejectionFilterConfig:
    """The rules of :mod:`r1fast.pipeline.filters`; a rule with its switch off keeps all."""

    max_chars: int = 0
    """``too_long``: completions longer than this many characters are dropped (0: no limit;
    sampling's max_new_tokens already bounds the length)."""
    require_format: bool = True
    """``unparsable``: drop completions that are not one think block + a boxed answer."""
    require_correct: bool = True
    """``wrong``: drop completions the example's checker scores below 1."""
    checker_cpu_time_s: float = 3.0
    """``timeout``: CPU seconds (of the main thread) one checker call may use; a call that
    needs more is dropped as ``timeout``, not ``wrong``. Within this limit math accuracy leaves
    the verdict to it (its own ``parse_timeout_s`` is not used). 0: no limit of this stage's
    own; math accuracy then bounds its symbolic tier by ``parse_timeout_s`` and scores an
    answer needing more as wrong, so such answers count as ``wrong``. Off the main thread no
    signal can stop a call and neither limit applies."""
    language: str | None = "en"
    """``mixed_language``: target language of the thought (a code of
    r1fast.rewards.language.LANGUAGE_SCRIPTS); None: no language rule."""
    min_language_share: float = 0.95
    """``mixed_language``: least share of thought words in ``language`` (a thought without
    words passes); 0.95 leaves room for a symbol name such as "pi" written in Greek."""
    max_paragraph_chars: int = 2000
    """``long_paragraph``: longest paragraph allowed, in characters (about 300 English words
    without a blank line); 0: no limit."""
    reject_code_blocks: bool = True
    """``code_block``: drop completions with a fenced code block."""
    reject_truncated: bool = True
    """``truncated``: drop completions cut at the sampling limit before a stop token (SFT ends
    every completion with the eos, so a cut one would teach stopping mid-text)."""
    dedupe: bool = True
    """``duplicate``: keep one copy of each distinct (whitespace-normalised) answer per prompt."""
    think_in_prompt: bool = False
    """The prompt already opened ``<think>`` (format and language rules start inside it)."""

    def __post_init__(self):
        check_range("max_chars", self.max_chars, 0)
        check_range("checker_cpu_time_s", self.checker_cpu_time_s, 0)
        check_range("max_paragraph_chars", self.max_paragraph_chars, 0)
        check_range("min_language_share", self.min_language_share, 0, 1)
        if self.language is not None:
            check_choice("language", self.language, sorted(LANGUAGE_SCRIPTS))

    @classmethod
    def for_keep(cls, keep: str) -> "RejectionFilterConfig":
        """The rules behind ``rejection_sample(keep=...)``: "correct" (all of R1's rules),
        "well_formed" (all but ``wrong``), "all" (only ``truncated`` and ``duplicate``;
        ``empty`` is always on)."""
        if keep == "correct":
            return cls()
        if keep == "well_formed":
            return cls(require_correct=False)
        if keep == "all":
            return cls(require_format=False, require_correct=False, language=None,
                       max_paragraph_chars=0, reject_code_blocks=False)
        raise ValueError(f"keep must be one of ('correct', 'well_formed', 'all'), got {keep!r}")


# ---------------------------------------------------------------------------- predicates

def too_long(text: str, cfg: RejectionFilterConfig) -> bool:
    """Longer than ``cfg.max_chars`` characters (never, when it is 0)."""
    return cfg.max_chars > 0 and len(text) > cfg.max_chars


def unparsable(text: str, cfg: RejectionFilterConfig) -> bool:
    """Not in the think-then-boxed-answer format (strict: one leading think block)."""
    return not is_well_formed(text, FormatRewardConfig(think_in_prompt=cfg.think_in_prompt))


def mixed_language(text: str, cfg: RejectionFilterConfig) -> bool:
    """The thought's share of ``cfg.language`` words is below ``cfg.min_language_share``."""
    lang = LanguageRewardConfig(target=cfg.language, empty_score=1.0,
                                think_in_prompt=cfg.think_in_prompt)
    return language_consistency(text, lang) < cfg.min_language_share


def longest_paragraph(text: str) -> int:
    """Characters of the longest paragraph; paragraphs are separated by blank lines."""
    lines = text.replace("\r\n", "\n").split("\n")
    longest = current = 0
    for line in lines:
        if line.strip():
            current += len(line) + (1 if current else 0)
            longest = max(longest, current)
        else:
            current = 0
    return longest


def long_paragraph(text: str, cfg: RejectionFilterConfig) -> bool:
    """A paragraph longer than ``cfg.max_paragraph_chars`` (never, when it is 0)."""
    return cfg.max_paragraph_chars > 0 and longest_paragraph(text) > cfg.max_paragraph_chars


def has_code_block(text: str) -> bool:
    """A fenced markdown code block: an opening and a closing triple backtick."""
    first = text.find(CODE_FENCE)
    return first >= 0 and text.find(CODE_FENCE, first + len(CODE_FENCE)) >= 0


def normalised(text: str) -> str:
    """The text with runs of whitespace collapsed: what ``duplicate`` compares."""
    return " ".join(text.split())


def check_answer(read: str, example: dict, check: Checker,
                 cpu_time_s: float) -> tuple[str | None, str | None]:
    """``(reason, error)`` of the checker on ``read``: reason None (scored 1 or more),
    "wrong" (below 1), "timeout" (past ``cpu_time_s`` CPU seconds; 0: no limit) or
    "checker_error" (it raised or returned no finite number; ``error`` says what). As in the
    reward runner's inline mode, one bad call must not end a stage (rejection sampling, an
    evaluation) that may have sampled for hours."""
    out = bounded_call(check, (read, example), cpu_time_s)
    if out.status != "ok":
        return ("timeout", None) if out.status == "timeout" else ("checker_error", out.message)
    return (None if out.value >= 1.0 else "wrong"), None


def rejection_reason(text: str, example: dict, check: Checker | None,
                     cfg: RejectionFilterConfig, kept: set[str],
                     truncated: bool = False, errors: list[str] | None = None) -> str | None:
    """The first rule ``text`` fails (a name of :data:`REASONS`), or None to keep it; ``kept``
    holds the normalised answers already kept for this prompt; ``truncated``: generation cut
    the text at its token limit; ``check``: the example's checker (None when
    ``cfg.require_correct`` is off); ``errors``: when given, a checker error's message is
    appended to it. A completion whose prompt
    opened ``<think>`` is read with it in front (:func:`~r1fast.rewards.extract.as_scored`),
    unless ``cfg.think_in_prompt`` already says so."""
    read = text if cfg.think_in_prompt else as_scored(text, example.get("prompt", ""))
    if not text.strip():  # always: an SFT row needs something to learn, even under keep="all"
        return "empty"
    if truncated and cfg.reject_truncated:
        return "truncated"
    if too_long(text, cfg):
        return "too_long"
    if cfg.require_format and unparsable(read, cfg):
        return "unparsable"
    if cfg.require_correct:
        if check is None:
            raise ValueError("require_correct needs the example's checker, got check=None")
        reason, error = check_answer(read, example, check, cfg.checker_cpu_time_s)
        if error is not None and errors is not None:
            errors.append(error)
        if reason is not None:
            return reason
    if cfg.language is not None and mixed_language(read, cfg):
        return "mixed_language"
    if long_paragraph(text, cfg):
        return "long_paragraph"
    if cfg.reject_code_blocks and has_code_block(text):
        return "code_block"
    if cfg.dedupe and normalised(text) in kept:
        return "duplicate"
    return None


# ---------------------------------------------------------------------------- a whole batch

def _named(i: int, example: dict) -> str:
    """An example as messages name it: its place in the batch and its id (``file:row``)."""
    return f"example {i} (id {example.get('id')!r})"


def build_checkers(examples: Sequence[dict], checker_for: Callable[[dict], Checker],
                   stage: str, hint: str = "") -> list[Checker]:
    """Each example's checker, built before anything is sampled or scored, so that a row no
    checker can score fails in seconds rather than after the whole generation: a ValueError
    naming the ``stage``, the row and its reward (``hint``: what the stage accepts instead)."""
    checks = []
    for i, ex in enumerate(examples):
        try:
            checks.append(checker_for(ex))
        except Exception as exc:
            raise ValueError(f"{stage}: {_named(i, ex)} has reward {ex.get('reward')!r}, whose "
                             f"checker cannot be built ({one_line(exc)}){hint}") from exc
    return checks


def resolve_checkers(examples: Sequence[dict], checker_for: Callable[[dict], Checker],
                     cfg: RejectionFilterConfig) -> list[Checker | None]:
    """Each example's checker (:func:`build_checkers`), or all None when
    ``cfg.require_correct`` is off (no answer is scored then, so a row whose reward cannot
    score one is fine)."""
    if not cfg.require_correct:
        return [None] * len(examples)
    # reward_model scores preference, not correctness, and needs a loaded model
    allowed = tuple(n for n in available_rewards() if n != "reward_model")
    return build_checkers(examples, checker_for, "rejection sampling", hint=(
        f"; keeping only correct answers needs a row's reward to be one of {allowed}, or "
        f"absent / 'rule' (math accuracy); keep='well_formed' or 'all' scores no answer"))


def filter_samples(examples: Sequence[dict], samples: Sequence[Sequence[str]],
                   checker_for: Callable[[dict], Checker],
                   cfg: RejectionFilterConfig, keep_per_prompt: int | None = None,
                   truncated: Sequence[Sequence[bool]] | None = None
                   ) -> tuple[list[dict], dict[str, Any]]:
    """Kept ``{"prompt", "completion", "id"}`` rows of ``samples[i]`` (answers to
    ``examples[i]``) and the summary: prompts, samples, kept, prompts_with_a_kept_sample,
    rejected (count per reason, every reason listed), over_limit, the rules used and
    first_checker_error (None, or the first checker error: its example's index and id, the
    reward and the message).
    ``truncated[i][j]`` marks samples cut at the generation limit (None: none were).
    Checkers come from ``checker_for``, all of them before the first sample is scored."""
    if len(samples) != len(examples):
        raise ValueError(f"samples and examples must have the same length, got {len(samples)} "
                         f"and {len(examples)}")
    if truncated is None:
        truncated = [[False] * len(outs) for outs in samples]
    if [len(t) for t in truncated] != [len(outs) for outs in samples]:
        raise ValueError("truncated must have one flag per sample, shaped like samples")
    if keep_per_prompt is not None and keep_per_prompt < 1:
        raise ValueError(f"keep_per_prompt must be >= 1 or None (no limit), got {keep_per_prompt}")
    checks = resolve_checkers(examples, checker_for, cfg)
    rejected = dict.fromkeys(REASONS, 0)
    rows: list[dict] = []
    solved = over = total = 0
    first_error: dict[str, Any] | None = None
    for i, (ex, outs, cuts, check) in enumerate(zip(examples, samples, truncated, checks)):
        kept: dict[str, str] = {}  # normalised -> text, in sampling order
        for text, cut in zip(outs, cuts):
            total += 1
            errors: list[str] = []
            reason = rejection_reason(text, ex, check, cfg, set(kept) if cfg.dedupe else set(),
                                      truncated=cut, errors=errors)
            if errors and first_error is None:
                first_error = {"example": i, "id": ex.get("id"), "reward": ex.get("reward"),
                               "error": errors[0]}
            if reason is not None:
                rejected[reason] += 1
            elif keep_per_prompt is not None and len(kept) >= keep_per_prompt:
                over += 1
            else:
                kept[normalised(text) if cfg.dedupe else str(len(kept))] = text
        solved += bool(kept)
        rows.extend({"prompt": ex["prompt"], "completion": t, "id": ex.get("id")}
                    for t in kept.values())
    summary = {"prompts": len(examples), "samples": total, "kept": len(rows),
               "prompts_with_a_kept_sample": solved, "rejected": rejected, "over_limit": over,
               "rules": dataclasses.asdict(cfg), "first_checker_error": first_error}
    _warn_checker_failures(summary, cfg)
    return rows, summary


def _warn_checker_failures(summary: dict[str, Any], cfg: RejectionFilterConfig) -> None:
    """One WARNING per kind of checker failure: those samples were dropped for the checker's
    sake, not the answer's."""
    rejected, n = summary["rejected"], summary["samples"]
    if rejected["checker_error"]:
        first = summary["first_checker_error"]
        log.warning("rejection sampling: the checker failed on %d of %d samples, dropped as "
                    "checker_error; first: %s, reward %r: %s", rejected["checker_error"], n,
                    _named(first["example"], first), first["reward"], first["error"])
    if rejected["timeout"]:
        log.warning("rejection sampling: the checker ran past checker_cpu_time_s=%g CPU "
                    "seconds on %d of %d samples, dropped as timeout", cfg.checker_cpu_time_s,
                    rejected["timeout"], n)


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a small table: kept, then each reason's count and share of samples."""
    n = max(summary["samples"], 1)
    lines = [f"rejection sampling: {summary['prompts']} prompts, {summary['samples']} samples, "
             f"kept {summary['kept']} ({summary['kept'] / n:.1%}), "
             f"{summary['prompts_with_a_kept_sample']} prompts with a kept answer"]
    for reason, count in summary["rejected"].items():
        lines.append(f"  {reason:<16} {count:>7}  {count / n:6.1%}")
    if summary.get("over_limit"):
        lines.append(f"  {'over_limit':<16} {summary['over_limit']:>7}  "
                     f"{summary['over_limit'] / n:6.1%}")
    first = summary.get("first_checker_error")
    if first:
        lines.append(f"  first checker_error: {_named(first['example'], first)}, reward "
                     f"{first['reward']!r}: {first['error']}")
    return "\n".join(lines)
