"""Math accuracy reward: is the final answer equal to the ground truth?

The R1-Zero accuracy reward. The answer is pulled out of the completion by
:func:`r1fast.rewards.extract.extract_answer` (last ``\\boxed{}`` after ``</think>``, then the
fallbacks described there) and compared with ``example["answer"]`` in three tiers:

1. guards, no parsing: an answer longer than ``max_answer_chars`` (or twice the gold's
   length, when that is more), or any non-ASCII digit (fullwidth ``５``, Arabic-Indic ``٥``,
   bold ``𝟓``) -> wrong;
2. exact arithmetic: when both sides are plain arithmetic (integers, decimals, ``\\frac``,
   ``+ - * / ^``), they are evaluated exactly by :mod:`r1fast.rewards.arith` (bounded in
   length, depth and size) and compared as rationals; a value too large to hold
   (``9^{9^{9}}``, ``10^{100000}``) is wrong, decided without ever computing it, unless the
   gold is the very same expression;
3. otherwise, nesting deeper than ``max_nesting`` (or the gold's) is wrong (the LaTeX
   parser's time grows exponentially with nested parentheses: 50 levels take seconds); then
   math-verify (LaTeX extraction only: its plain-expression path runs sympy's
   ``parse_expr``, which uses ``eval``), or, when math-verify is missing, a whitespace- and
   ``$``-insensitive string comparison.

Tier 3 can still hang inside sympy on hostile symbolic input, and no signal can interrupt a
long C-level computation, so this reward is marked ``sandbox = True``: the
:class:`~r1fast.rewards.runner.RewardRunner` runs it in worker processes that it kills on
timeout. Inside a runner's call, tier 3 is bounded by that call's CPU limit (a check that
needs more is counted as a timeout); elsewhere (evaluation, rejection sampling) by
``parse_timeout_s`` seconds of CPU time (:func:`r1fast.rewards.cpu_limit.cpu_time_limit`, main
thread), and an answer that needs more is wrong. math-verify's own wall-clock alarms are off: with
them a correct, deeply nested answer was right on an idle machine and wrong on a busy one.
"""
from __future__ import annotations

import importlib.util
import unicodedata
from dataclasses import dataclass, replace

from r1fast.rewards.arith import ArithConfig, ArithRangeError, ArithDomainError, ArithSyntaxError, evaluate
from r1fast.rewards.extract import DEFAULT_MAX_CHARS, extract_answer
from r1fast.rewards.cpu_limit import CpuTimeExceeded, cpu_time_limit, limit_active
from r1fast.checks import check_range

_HAS_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None


@dataclass(frozen=True)
class MathRewardConfig:
    """Scores, extraction and equivalence settings of the math accuracy reward."""

    correct_score: float = 1.0
    """Reward for an answer equal to the ground truth."""
    wrong_score: float = 0.0
    """Reward for a wrong, missing or unparsable answer."""
    answer_key: str = "answer"
    """Field of the example holding the ground-truth answer (a str or a number)."""
    require_boxed: bool = False
    """Only a ``\\boxed{}`` answer counts (no ``Answer:`` / after-``</think>`` fallback)."""
    think_in_prompt: bool = False
    """The prompt already opened ``<think>``, so the completion starts inside the thought."""
    max_chars: int = DEFAULT_MAX_CHARS
    """Only the last ``max_chars`` characters of a completion are read."""
    max_answer_chars: int = 256
    """Longer extracted answers are wrong without being parsed (the limit is twice the gold's
    length when that is more: a long gold answer stays reachable)."""
    max_nesting: int = 12
    """Answers nested deeper (``( [ {``) than this and than the gold are wrong without reaching
    math-verify (plain arithmetic is decided before, by the bounded exact evaluator)."""
    exact_arithmetic: bool = True
    """Decide plain-arithmetic pairs by exact rational equality (no rounding, no math-verify)."""
    use_math_verify: bool = True
    """Use math-verify for symbolic answers when it is installed."""
    parse_timeout_s: float = 3
    """CPU-time budget of the math-verify tier when no reward-call limit is open (evaluation,
    rejection sampling, direct calls): seconds of this thread's CPU, main thread only; 0
    disables it; exceeding it makes the answer wrong. Inside a RewardRunner call, that call's
    own limit (``reward.cpu_time_s``, else half of ``reward.timeout_s``) bounds the check, and
    a check that exceeds it is counted as the call's timeout, not scored as a wrong answer."""

    def __post_init__(self):
        check_range("max_answer_chars", self.max_answer_chars, 1)
        check_range("max_nesting", self.max_nesting, 1)
        check_range("max_chars", self.max_chars, 1)
        check_range("parse_timeout_s", self.parse_timeout_s, 0)
        if not isinstance(self.answer_key, str) or not self.answer_key:
            raise ValueError(f"answer_key must be a non-empty str, got {self.answer_key!r}")


_NUMERIC = ArithConfig(max_chars=512, max_depth=32, max_bits=4096)


def _nesting(s: str) -> int:
    depth = best = 0
    for c in s:
        if c in "([{":
            depth += 1
            best = max(best, depth)
        elif c in ")]}" and depth:
            depth -= 1
    return best


def _has_foreign_digit(s: str) -> bool:
    return any(not c.isascii() and unicodedata.category(c) == "Nd" for c in s)


def _clean(s: str) -> str:
    s = s.strip().strip("$").strip()
    return s[:-1].strip() if s.endswith(".") else s


def _exact(s: str) -> object:
    """The exact value, None when not plain arithmetic, or the string "huge"/"undefined"."""
    try:
        return evaluate(s, _NUMERIC).value
    except ArithSyntaxError:
        return None
    except ArithRangeError:
        return "huge"
    except ArithDomainError:
        return "undefined"


def _math_verify_equal(pred: str, gold: str, cpu_s: float) -> bool:
    from math_verify import LatexExtractionConfig, parse, verify

    # No wall-clock alarms (parsing_timeout / timeout_seconds None): a CPU-time budget instead,
    # so the verdict does not depend on machine load. Signals only work on the main thread;
    # elsewhere the caller (a killed worker) bounds the time.
    for mod in ("math_verify.parser", "math_verify.grader"):
        # their one-time "timeout is disabled, provide your own" warning: we do (above)
        module = importlib.import_module(mod)
        if hasattr(module, "TIMEOUT_WARNING_SHOWN"):
            module.TIMEOUT_WARNING_SHOWN = True
    extraction = [LatexExtractionConfig()]

    def equal() -> bool:
        gold_parsed = parse(f"${gold}$", extraction, parsing_timeout=None)
        pred_parsed = parse(f"${pred}$", extraction, parsing_timeout=None)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))

    if limit_active():  # inside a reward call: its limit decides, and the runner counts it
        return equal()
    limit = cpu_time_limit(cpu_s)
    try:  # around the block: the limit can also fire in its __exit__
        with limit:
            return equal()
    except CpuTimeExceeded as exc:
        if exc.token is not limit.token:  # an outer limit: not ours to decide
            raise
        return False


def warm_up() -> None:
    """Build math-verify's LaTeX parser once (the first parse costs ~0.3 s); reward workers
    call this at startup so the cost never counts against a call's timeout."""
    if _HAS_MATH_VERIFY:
        _math_verify_equal("\\frac{1}{2}", "0.5", 5)


def answers_equal(pred: str, gold: str, config: MathRewardConfig | None = None) -> bool:
    """Whether the extracted answer ``pred`` equals ``gold`` (tiers in the module docstring)."""
    cfg = config or MathRewardConfig()
    pred, gold = _clean(pred), _clean(str(gold))
    if not pred or not gold:
        return False
    if len(pred) > max(cfg.max_answer_chars, 2 * len(gold)) or _has_foreign_digit(pred):
        return False
    if cfg.exact_arithmetic:
        pv, gv = _exact(pred), _exact(gold)
        if isinstance(pv, str):  # too large to represent, or undefined: never a valid answer,
            # but for the very expression of a gold that is too large as well (10^{2000})
            return pv == gv == "huge" and "".join(pred.split()) == "".join(gold.split())
        if pv is not None and gv is not None and not isinstance(gv, str):
            return pv == gv
    if _nesting(pred) > max(cfg.max_nesting, _nesting(gold)):  # the parser's exponential case
        return False
    if cfg.use_math_verify and _HAS_MATH_VERIFY:
        return _math_verify_equal(pred, gold, cfg.parse_timeout_s)
    return "".join(pred.split()) == "".join(gold.split())


class MathAccuracyReward:
    """``(completion, example) -> correct_score | wrong_score`` against ``example[answer_key]``."""

    name = "math_accuracy"
    sandbox = True  # tier 3 can hang: the runner puts this reward in killable workers

    def __init__(self, config: MathRewardConfig | None = None, **overrides):
        base = config or MathRewardConfig()
        self.config = replace(base, **overrides) if overrides else base

    @property
    def preload_modules(self) -> tuple[str, ...]:
        """Modules a worker imports before its first call, so imports never eat a timeout."""
        return ("r1fast.rewards.math:warm_up",) if self.config.use_math_verify and _HAS_MATH_VERIFY else ()

    def __call__(self, completion: str, example: dict) -> float:
        cfg = self.config
        if cfg.answer_key not in example:
            raise ValueError(f"example has no {cfg.answer_key!r} field (the ground-truth answer)")
        pred = extract_answer(completion, require_boxed=cfg.require_boxed,
                              think_in_prompt=cfg.think_in_prompt, max_chars=cfg.max_chars)
        if pred is None:
            return cfg.wrong_score
        ok = answers_equal(pred, str(example[cfg.answer_key]), cfg)
        return cfg.correct_score if ok else cfg.wrong_score

    def __repr__(self) -> str:
        return f"MathAccuracyReward({self.config})"
