"""Rewards by name, so that configs and the CLI can say ``rewards: [math_accuracy, format]``.

``get_reward("countdown", format_score=0.0)`` builds a reward with config overrides;
``register_reward("mine")`` (usable as a decorator) adds a factory. Factories take keyword
arguments and return a reward ``(completion, example) -> float``.
"""
from __future__ import annotations

from typing import Callable

from r1fast.rewards.compose import RewardFn
from r1fast.rewards.countdown import CountdownReward
from r1fast.rewards.format import FormatReward
from r1fast.rewards.language import LanguageReward
from r1fast.rewards.math import MathAccuracyReward
from r1fast.rewards.reward_model import RewardModelReward

_REGISTRY: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str, factory: Callable[..., RewardFn] | None = None):
    """Register ``factory`` under ``name``; without ``factory``, return a decorator."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")

    def add(f: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        if not callable(f):
            raise ValueError(f"factory for reward {name!r} must be callable, got {type(f).__name__}")
        if name in _REGISTRY and _REGISTRY[name] is not f:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = f
        return f

    return add if factory is None else add(factory)


def available_rewards() -> list[str]:
    """Registered names, sorted."""
    return sorted(_REGISTRY)


def get_reward(name: str, **kwargs) -> RewardFn:
    """Build the reward registered as ``name`` with ``kwargs`` (config field overrides)."""
    if name not in _REGISTRY:
        raise ValueError(f"reward name must be one of {tuple(available_rewards())}, got {name!r}")
    return _REGISTRY[name](**kwargs)


register_reward("math_accuracy", MathAccuracyReward)
register_reward("countdown", CountdownReward)
register_reward("format", FormatReward)
register_reward("language", LanguageReward)
register_reward("reward_model", RewardModelReward)
