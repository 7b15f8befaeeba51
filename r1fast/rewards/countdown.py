"""Countdown reward (TinyZero): does the equation reach the target with the given numbers?

The task gives numbers (e.g. ``[3, 7, 25, 50]``) and a target (``71``); the model answers with
an equation such as ``\\boxed{(50 + 25) - (7 - 3)}``. Scoring, as in TinyZero:

- no answer found -> 0;
- an answer that is wrong in any way (not arithmetic, numbers outside the given set, a number
  used too often or, by default, not at all, division by zero, wrong value) -> ``format_score``
  (0.1): the model at least produced an answer in the right place;
- correct -> ``correct_score`` (1.0).

That 0.1 is TinyZero's format reward, so Countdown needs no separate one: the ``format`` reward
scores Countdown rows 0 (its ``credited_elsewhere``), and ``weights = {accuracy = 1.0}`` or
``{accuracy = 1.0, format = 0.1}`` both give exactly TinyZero's 0 / 0.1 / 1.0
(``recipes/countdown_tinyzero.toml``).

TinyZero requires each number exactly once (``exactly_once=True``, the default); with
``exactly_once=False`` each may be used at most once. The equation may carry its result on
one side (``(50 + 25) - (7 - 3) = 71`` or ``71 = ...``); that side must then be the target.

The equation is evaluated by :mod:`r1fast.rewards.arith` (never ``eval``): integers, ``+ - * /``
and parentheses only (no powers, decimals or unary signs), exact rationals, so ``6 / 4 * 2``
is exactly 3 and float round-off can neither make a wrong equation right nor the reverse.
Length and nesting are bounded, so this reward is safe to run in-process (``sandbox=False``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from fractions import Fraction

from r1fast.rewards.arith import ArithConfig, ArithError, evaluate
from r1fast.rewards.extract import DEFAULT_MAX_CHARS, extract_answer
from r1fast.checks import check_range


@dataclass(frozen=True)
class CountdownRewardConfig:
    """Scores and rules of the Countdown reward."""

    correct_score: float = 1.0
    """Reward for a valid equation equal to the target."""
    format_score: float = 0.1
    """Reward for an extracted answer that is not a correct equation (TinyZero's 0.1)."""
    exactly_once: bool = True
    """Each given number must be used exactly once (TinyZero); False: at most once."""
    require_boxed: bool = False
    """Only a ``\\boxed{}`` answer counts."""
    think_in_prompt: bool = False
    """The prompt already opened ``<think>``."""
    max_chars: int = DEFAULT_MAX_CHARS
    """Only the last ``max_chars`` characters of a completion are read."""
    max_equation_chars: int = 256
    """Longer equations are refused (scored ``format_score``)."""
    max_depth: int = 32
    """Deepest parenthesis nesting accepted in an equation."""

    def __post_init__(self):
        check_range("max_equation_chars", self.max_equation_chars, 1)
        check_range("max_depth", self.max_depth, 1)
        check_range("max_chars", self.max_chars, 1)


def _arith_config(cfg: CountdownRewardConfig) -> ArithConfig:
    return ArithConfig(allow_power=False, allow_decimals=False, allow_unary=False, allow_latex=True,
                       allow_thousands=False, max_chars=cfg.max_equation_chars,
                       max_tokens=4 * cfg.max_equation_chars, max_depth=cfg.max_depth,
                       max_literal_digits=12, max_bits=512)


def _is_int_literal(s: str) -> bool:
    s = s.strip()
    return bool(s) and len(s) <= 12 and all("0" <= c <= "9" for c in s)


def check_equation(equation: str, numbers: list[int], target: int,
                   config: CountdownRewardConfig | None = None) -> bool:
    """Whether ``equation`` uses ``numbers`` as the rules require and equals ``target``."""
    cfg = config or CountdownRewardConfig()
    sides = equation.split("=")
    if len(sides) == 1:
        expr = sides[0]
    elif len(sides) == 2:
        a, b = sides
        if _is_int_literal(b) and int(b) == target:
            expr = a
        elif _is_int_literal(a) and int(a) == target:
            expr = b
        else:
            return False
    else:
        return False
    try:
        result = evaluate(expr, _arith_config(cfg))
    except ArithError:
        return False
    used = Counter(result.literals)
    given = Counter(Fraction(int(x)) for x in numbers)
    if cfg.exactly_once:
        if used != given:
            return False
    elif any(used[k] > given[k] for k in used):
        return False
    return result.value == target


class CountdownReward:
    """``(completion, example) -> float`` with ``example["numbers"]`` and ``example["target"]``."""

    name = "countdown"
    sandbox = False  # bounded linear-time parsing: safe in-process

    def __init__(self, config: CountdownRewardConfig | None = None, **overrides):
        base = config or CountdownRewardConfig()
        self.config = replace(base, **overrides) if overrides else base

    def __call__(self, completion: str, example: dict) -> float:
        cfg = self.config
        for key in ("numbers", "target"):
            if key not in example:
                raise ValueError(f"countdown example has no {key!r} field")
        equation = extract_answer(completion, require_boxed=cfg.require_boxed,
                                  think_in_prompt=cfg.think_in_prompt, max_chars=cfg.max_chars)
        if equation is None:
            return 0.0
        ok = check_equation(equation, list(example["numbers"]), int(example["target"]), cfg)
        return cfg.correct_score if ok else cfg.format_score

    def __repr__(self) -> str:
        return f"CountdownReward({self.config})"
