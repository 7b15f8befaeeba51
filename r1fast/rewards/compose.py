"""Weighted sums of rewards, keeping each part visible.

R1 trains on a sum of rewards (accuracy + format, plus language consistency in stage 2), and
a run is only debuggable when each part is logged on its own. :class:`CompositeReward` holds
named, weighted parts; :meth:`CompositeReward.score` returns the weighted total and the raw
score of every part, and calling it returns just the total, so a composite is itself a reward
``(completion, example) -> float`` and can be nested or handed to the
:class:`~r1fast.rewards.runner.RewardRunner` (which evaluates the parts separately, each with
its own isolation and timeout, and combines them with :meth:`CompositeReward.combine`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

RewardFn = Callable[[str, dict], float]
PartSpec = Union[tuple[RewardFn, float], tuple[str, RewardFn, float]]


def reward_name(fn: object) -> str:
    """A display name: the ``name`` attribute, else the function or class name."""
    name = getattr(fn, "name", None)
    if isinstance(name, str) and name:
        return name
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) and name else type(fn).__name__


@dataclass(frozen=True)
class RewardPart:
    """One weighted component of a composite reward."""

    name: str
    """Unique key of this part in per-part scores and metrics."""
    fn: RewardFn
    """The reward ``(completion, example) -> float``."""
    weight: float
    """Multiplier of this part in the total."""


class CompositeReward:
    """``total = sum_k weight_k * part_k(completion, example)``.

    ``parts`` holds ``(fn, weight)`` or ``(name, fn, weight)`` tuples; names default to
    :func:`reward_name` and must be unique.
    """

    name = "composite"

    def __init__(self, parts: Sequence[PartSpec]):
        if isinstance(parts, (str, bytes)) or not isinstance(parts, Sequence) or len(parts) == 0:
            raise ValueError("parts must be a non-empty sequence of (fn, weight) or (name, fn, weight)")
        built: list[RewardPart] = []
        for i, spec in enumerate(parts):
            if not isinstance(spec, tuple) or len(spec) not in (2, 3):
                raise ValueError(f"parts[{i}] must be (fn, weight) or (name, fn, weight), got {spec!r}")
            name, fn, weight = spec if len(spec) == 3 else (reward_name(spec[0]), spec[0], spec[1])
            if not callable(fn):
                raise ValueError(f"parts[{i}] reward must be callable, got {type(fn).__name__}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"parts[{i}] weight must be a finite number, got {weight!r}")
            if not isinstance(name, str) or not name:
                raise ValueError(f"parts[{i}] name must be a non-empty str, got {name!r}")
            built.append(RewardPart(name, fn, float(weight)))
        names = [p.name for p in built]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"part names must be unique, got duplicates {dupes}; "
                             "pass (name, fn, weight) to name them")
        self.parts: tuple[RewardPart, ...] = tuple(built)

    def combine(self, scores: Mapping[str, float]) -> float:
        """Weighted total of per-part scores (a missing part counts as 0)."""
        return sum(p.weight * float(scores.get(p.name, 0.0)) for p in self.parts)

    def score(self, completion: str, example: dict) -> tuple[float, dict[str, float]]:
        """(weighted total, raw score per part name). Exceptions from parts propagate; the
        runner is what turns them into 0 and a counted warning."""
        scores = {p.name: float(p.fn(completion, example)) for p in self.parts}
        return self.combine(scores), scores

    def __call__(self, completion: str, example: dict) -> float:
        return self.score(completion, example)[0]

    def __repr__(self) -> str:
        inner = ", ".join(f"{p.name}*{p.weight:g}" for p in self.parts)
        return f"CompositeReward({inner})"
