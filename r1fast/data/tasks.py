"""Synthetic reasoning tasks with verifiable answers: Countdown and multi-digit arithmetic.

No dataset can be downloaded here, and tiny models need easy, unlimited, checkable problems.
Each generator is deterministic given ``(n, split, seed, config)`` and returns examples

    {"task", "id", "split", "question", "prompt", "answer", "solution_cot", "reward", ...task fields}

where ``prompt`` is the R1-Zero template around ``question`` (:mod:`r1fast.data.template`),
``solution_cot`` a short correct step-by-step reasoning usable as cold-start SFT data, and
``reward`` the name of the registered reward that checks it.

Train/test splits are disjoint by construction: a problem's split is a function of its
canonical key alone (a SHA-256 hash, ``test_fraction`` of the key space goes to test), so no
seed and no generation order can put the same problem in both splits.

- Countdown (TinyZero): 3-4 numbers in [1, 99] and a target in [1, 100] that is reachable: the
  generator combines the numbers at random, two at a time, keeping every intermediate a
  positive integer, and stores that construction as the solution (``answer`` is the equation,
  each number used exactly once).
- Arithmetic: ``a + b``, ``a - b`` (a >= b) or ``a * b`` with 2-3 digit operands; the answer is
  the integer, the reasoning a column addition/subtraction or a place-value multiplication.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

from r1fast.data.template import make_prompt

_COLUMNS = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions")


def split_of(key: str, test_fraction: float) -> str:
    """"test" for a ``test_fraction`` share of keys (by SHA-256), else "train"."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "test" if h / 2.0 ** 64 < test_fraction else "train"


def _check_split(split: str, n: int) -> None:
    from r1fast.ops._validate import check_choice, check_range
    check_choice("split", split, ("train", "test"))
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"n must be an int, got {type(n).__name__}")
    check_range("n", n, 0)


def _generate(make: Callable[[random.Random], tuple[str, dict] | None], task: str, n: int,
              split: str, seed: int, test_fraction: float) -> list[dict]:
    """Draw candidates until ``n`` distinct ones of ``split``; raise if the space runs dry."""
    _check_split(split, n)
    rng = random.Random(f"r1fast/{task}/{split}/{seed}")
    out: list[dict] = []
    seen: set[str] = set()
    budget = 200 * n + 10_000
    while len(out) < n:
        budget -= 1
        if budget < 0:
            raise ValueError(f"could only generate {len(out)} distinct {split} examples of {task!r}, "
                             f"asked for n={n}: widen the task config")
        made = make(rng)
        if made is None:
            continue
        key, ex = made
        key = f"{task}:{key}"
        if key in seen or split_of(key, test_fraction) != split:
            continue
        seen.add(key)
        ex.update(task=task, id=key, split=split, prompt=make_prompt(ex["question"]))
        out.append(ex)
    return out


# --- Countdown ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CountdownConfig:
    """Problem space of the Countdown task."""

    min_numbers: int = 3
    """Fewest numbers per problem."""
    max_numbers: int = 4
    """Most numbers per problem."""
    min_value: int = 1
    """Smallest given number."""
    max_value: int = 99
    """Largest given number."""
    min_target: int = 1
    """Smallest target."""
    max_target: int = 100
    """Largest target."""
    max_intermediate: int = 10_000
    """Largest intermediate result allowed in the stored solution."""
    test_fraction: float = 0.1
    """Share of the problem space (by key hash) reserved for the test split."""

    def __post_init__(self):
        from r1fast.ops._validate import check_range
        check_range("min_numbers", self.min_numbers, 2)
        check_range("max_numbers", self.max_numbers, self.min_numbers, 8)
        check_range("min_value", self.min_value, 1)
        check_range("max_value", self.max_value, self.min_value)
        check_range("min_target", self.min_target, 1)
        check_range("max_target", self.max_target, self.min_target)
        check_range("test_fraction", self.test_fraction, 0, 1, lo_open=True, hi_open=True)


_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _combine(a: tuple[int, str, int], b: tuple[int, str, int], op: str) -> tuple[int, str, int]:
    """(value, expression, precedence) of ``a op b`` with only the parentheses needed."""
    (va, ea, pa), (vb, eb, pb) = a, b
    p = _PREC[op]
    left = f"({ea})" if pa < p else ea
    # The right operand of - and / needs parentheses at equal precedence: a - (b + c).
    right = f"({eb})" if pb < p or (pb == p and op in "-/") else eb
    value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va // vb if vb else 0}[op]
    return value, f"{left} {op} {right}", p


def _make_countdown(cfg: CountdownConfig) -> Callable[[random.Random], tuple[str, dict] | None]:
    def make(rng: random.Random) -> tuple[str, dict] | None:
        k = rng.randint(cfg.min_numbers, cfg.max_numbers)
        numbers = [rng.randint(cfg.min_value, cfg.max_value) for _ in range(k)]
        pool = [(x, str(x), 3) for x in numbers]
        steps = []
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            a, b = pool[i], pool[j]
            ops = ["+"]
            if a[0] > b[0]:
                ops.append("-")
            if a[0] * b[0] <= cfg.max_intermediate and b[0] > 1 and a[0] > 1:
                ops.append("*")
            if b[0] > 1 and a[0] % b[0] == 0:
                ops.append("/")
            op = rng.choice(ops)
            c = _combine(a, b, op)
            steps.append(f"{a[0]} {op} {b[0]} = {c[0]}")
            pool = [x for t, x in enumerate(pool) if t not in (i, j)] + [c]
        target, equation, _ = pool[0]
        if not cfg.min_target <= target <= cfg.max_target:
            return None
        listed = ", ".join(map(str, numbers))
        question = (f"Using the numbers [{listed}], create an equation that equals {target}. "
                    f"Use each number exactly once, with + - * / and parentheses.")
        cot = (f"We need {target} from {listed}. " + ". ".join(steps)
               + f". So {equation} = {target}.")
        key = ",".join(map(str, sorted(numbers))) + f"->{target}"
        return key, {"question": question, "answer": equation, "numbers": numbers,
                     "target": target, "solution_cot": cot, "reward": "countdown"}
    return make


def generate_countdown(n: int, split: str = "train", seed: int = 0,
                       config: CountdownConfig | None = None, **overrides) -> list[dict]:
    """``n`` distinct Countdown examples of ``split`` (fields: numbers, target, answer=equation)."""
    cfg = replace(config or CountdownConfig(), **overrides)
    return _generate(_make_countdown(cfg), "countdown", n, split, seed, cfg.test_fraction)


# --- Arithmetic -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ArithmeticConfig:
    """Problem space of the multi-digit arithmetic task."""

    min_digits: int = 2
    """Fewest digits per operand."""
    max_digits: int = 3
    """Most digits per operand."""
    ops: tuple[str, ...] = ("+", "-", "*")
    """Operations drawn uniformly (subtraction keeps a >= b, so answers are >= 0)."""
    test_fraction: float = 0.1
    """Share of the problem space (by key hash) reserved for the test split."""

    def __post_init__(self):
        from r1fast.ops._validate import check_range
        check_range("min_digits", self.min_digits, 1)
        check_range("max_digits", self.max_digits, self.min_digits, 6)
        check_range("test_fraction", self.test_fraction, 0, 1, lo_open=True, hi_open=True)
        if not self.ops or any(op not in ("+", "-", "*") for op in self.ops):
            raise ValueError(f"ops must be a non-empty tuple drawn from ('+', '-', '*'), got {self.ops!r}")


def _digits(x: int) -> list[int]:
    return [int(d) for d in reversed(str(x))]


def addition_cot(a: int, b: int) -> str:
    """Column addition with carries, every step a true equation."""
    da, db = _digits(a), _digits(b)
    steps, carry = [], 0
    for k in range(max(len(da), len(db))):
        terms = [da[k] if k < len(da) else 0, db[k] if k < len(db) else 0] + ([carry] if carry else [])
        s = sum(terms)
        step = f"{_COLUMNS[k]}: {' + '.join(map(str, terms))} = {s}"
        steps.append(step + (f", write {s - 10}, carry 1" if s >= 10 else f", write {s}"))
        carry = s // 10
    if carry:
        steps.append(f"{_COLUMNS[len(steps)]}: write the carry 1")
    return "Add column by column. " + ". ".join(steps) + f". So {a} + {b} = {a + b}."


def subtraction_cot(a: int, b: int) -> str:
    """Column subtraction with borrows (needs a >= b), every step a true equation."""
    if a < b:
        raise ValueError(f"subtraction_cot needs a >= b, got a={a}, b={b}")
    da, db = _digits(a), _digits(b)
    steps, borrow = [], 0
    for k in range(len(da)):
        x, y = da[k], db[k] if k < len(db) else 0
        parts = []
        if borrow:
            parts.append(f"{x} - 1 = {x - 1} after the borrow")
            x -= 1
        if x < y:
            parts.append(f"{x} < {y}, borrow: {x + 10} - {y} = {x + 10 - y}")
            borrow = 1
        else:
            parts.append(f"{x} - {y} = {x - y}")
            borrow = 0
        steps.append(f"{_COLUMNS[k]}: " + "; ".join(parts))
    return "Subtract column by column. " + ". ".join(steps) + f". So {a} - {b} = {a - b}."


def multiplication_cot(a: int, b: int) -> str:
    """Place-value multiplication: split b into its digits' values, multiply, add up."""
    parts = [d * 10 ** k for k, d in enumerate(_digits(b)) if d][::-1]
    if not parts:
        return f"Anything times 0 is 0. So {a} * {b} = 0."
    products = [a * p for p in parts]
    steps = []
    if len(parts) > 1:
        steps.append(f"{b} = {' + '.join(map(str, parts))}")
    steps += [f"{a} * {p} = {q}" for p, q in zip(parts, products)]
    if len(parts) > 1:
        steps.append(f"{' + '.join(map(str, products))} = {sum(products)}")
    return ". ".join(steps) + f". So {a} * {b} = {a * b}."


def _make_arithmetic(cfg: ArithmeticConfig) -> Callable[[random.Random], tuple[str, dict]]:
    def operand(rng: random.Random) -> int:
        d = rng.randint(cfg.min_digits, cfg.max_digits)
        return rng.randint(10 ** (d - 1) if d > 1 else 0, 10 ** d - 1)

    def make(rng: random.Random) -> tuple[str, dict]:
        op = rng.choice(cfg.ops)
        a, b = operand(rng), operand(rng)
        if op == "-" and a < b:
            a, b = b, a
        if op == "+":
            value, cot = a + b, addition_cot(a, b)
        elif op == "-":
            value, cot = a - b, subtraction_cot(a, b)
        else:
            value, cot = a * b, multiplication_cot(a, b)
        # + and * commute: a problem and its operand-swapped twin share one key, hence one
        # split (a held-out 34+12 must not have 12+34 in training)
        key = f"{min(a, b)}{op}{max(a, b)}" if op in "+*" else f"{a}{op}{b}"
        return key, {"question": f"What is {a} {op} {b}?", "answer": str(value),
                               "a": a, "b": b, "op": op, "solution_cot": cot, "reward": "math_accuracy"}
    return make


def generate_arithmetic(n: int, split: str = "train", seed: int = 0,
                        config: ArithmeticConfig | None = None, **overrides) -> list[dict]:
    """``n`` distinct arithmetic examples of ``split`` (fields: a, b, op, answer=integer str)."""
    cfg = replace(config or ArithmeticConfig(), **overrides)
    return _generate(_make_arithmetic(cfg), "arithmetic", n, split, seed, cfg.test_fraction)


class TaskSpec(NamedTuple):
    """A synthetic task: its generator and the config dataclass of its options."""

    generate: Callable[..., list[dict]]
    config: type


TASKS: dict[str, TaskSpec] = {
    "countdown": TaskSpec(generate_countdown, CountdownConfig),
    "arithmetic": TaskSpec(generate_arithmetic, ArithmeticConfig),
}


def task_config(task: str, options: dict, key: str = "task_options"):
    """The config of the task named ``task`` from a table of its fields: an unknown field, a
    wrong type or an out-of-range value is a one-line error naming ``key.<field>``."""
    from r1fast.typed_toml import from_dict

    if task not in TASKS:
        raise ValueError(f"task must be one of {tuple(sorted(TASKS))}, got {task!r}")
    return from_dict(TASKS[task].config, options, prefix=key + ".")


def generate_task(task: str, n: int, split: str = "train", seed: int = 0, **overrides) -> list[dict]:
    """Examples of the task named ``task`` (a key of ``TASKS``), config fields as overrides."""
    config = task_config(task, overrides)  # names a bad task or option first
    return TASKS[task].generate(n, split=split, seed=seed, config=config)
