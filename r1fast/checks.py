"""Argument checks that need nothing but Python: one-line ``ValueError`` messages naming the
argument, its value and what is allowed (and :func:`one_line`, an exception as such a line).
Reward workers and configs use them without importing torch (a fresh worker would otherwise
pay ~2 s of CPU for it on its first call, inside that call's time limit); the tensor checks are
in ``r1fast.ops._validate``, which re-exports these.
"""
from __future__ import annotations

from typing import Sequence


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_range(name: str, value: float, lo: float | None = None, hi: float | None = None,
                *, lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise ``ValueError`` unless ``lo <= value <= hi`` (open ends with ``lo_open`` /
    ``hi_open``). NaN is never in range (its comparisons are all False, so it is tested
    explicitly)."""
    bad = value != value or \
        (lo is not None and (value <= lo if lo_open else value < lo)) or \
        (hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {lb}{lo if lo is not None else '-inf'}, "
                         f"{hi if hi is not None else 'inf'}{rb}, got {value}")


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """``"TypeName: message"`` of ``exc`` on one line (whitespace runs collapsed), at most
    ``limit`` characters: what a failure counted in a summary or told to other ranks says."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if limit is None else text[:limit]
