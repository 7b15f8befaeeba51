"""Rewards by name, so that configs and the CLI can say ``rewards: [math_accuracy, format]``.

``get_reward("countdown", format_score=0.0)`` builds a reward with config overrides;
``register_reward("mine", fn)`` (usable as a decorator) adds a reward ``(completion, example)
-> float``, or a factory that takes keyword arguments and returns one; a registered name can be
used in a recipe's ``[reward] weights`` and in a dataset row's ``reward`` field.
:class:`RoutedReward` scores each example with the reward its row names (``"rule"``: the
default checker).

``reward_model`` needs a trained model: ``get_reward("reward_model", model=...)`` wraps a model
object; a recipe names a reward-model folder in ``[reward] reward_model`` instead (loaded by
:func:`r1fast.train.reward_model_io.load_reward_model`, which the rewards layer cannot import).
"""
from __future__ import annotations

import inspect
import pickle
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
        if name in _REGISTRY and _REGISTRY[name] is not f and \
                getattr(_REGISTRY[name], "reward", None) is not f:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = _as_factory(name, f) if _is_reward_fn(f) else f
        return f

    return add if factory is None else add(factory)


def _is_reward_fn(f: Callable) -> bool:
    """A reward takes (completion, example) positionally; a factory takes keywords only."""
    if isinstance(f, type):
        return False
    try:
        params = inspect.signature(f).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2


def _as_factory(name: str, fn: RewardFn) -> Callable[..., RewardFn]:
    def factory(**kwargs) -> RewardFn:
        if kwargs:
            raise ValueError(f"reward {name!r} is a plain function and takes no options, got "
                             f"{sorted(kwargs)}")
        return fn
    factory.reward = fn  # type: ignore[attr-defined]
    return factory


#: values of a row's ``reward`` field that mean "the run's default checker"
DEFAULT_ROUTES = (None, "", "rule")


class RoutedReward:
    """Scores each example with the registered reward named by its ``reward`` field, or with
    ``default`` when it has none or says ``"rule"`` (datasets that mix sources, e.g. verl's
    ``data_source``, or rule and reward-model rows)."""

    def __init__(self, default: str):
        get_reward(default)  # an unknown default is an error now, not at the first call
        self.default = default
        self._rewards: dict[str, RewardFn] = {}

    def reward_for(self, example: dict) -> RewardFn:
        name = example.get("reward")
        if name in DEFAULT_ROUTES:
            name = self.default
        if name not in self._rewards:
            carried = getattr(self, "_carried", {})
            if name in carried:
                reward, build = carried[name]
                self._rewards[name] = reward() if build else reward
            else:
                self._rewards[name] = get_reward(name)
        return self._rewards[name]

    def __getstate__(self) -> dict:
        """A worker process registers only the built-in rewards: the ones this process
        registered (``register_reward`` in a script) travel with the object, by reference
        (a row naming one scored 0 in every worker, counted as an error); one that cannot
        be pickled stays behind (its rows then fail in the worker, named)."""
        carried = {}
        for name, factory in _REGISTRY.items():
            if name in _BUILT_IN:
                continue
            plain = getattr(factory, "reward", None)  # a function registered as it is
            entry = (plain, False) if plain is not None else (factory, True)
            try:
                pickle.dumps(entry[0])
            except (pickle.PicklingError, AttributeError, TypeError):
                continue
            carried[name] = entry
        return {**self.__dict__, "_rewards": {}, "_carried": carried}

    def __call__(self, completion: str, example: dict) -> float:
        return self.reward_for(example)(completion, example)

    @property
    def preload_modules(self) -> tuple[str, ...]:
        return tuple(getattr(get_reward(self.default), "preload_modules", ()))

    def __repr__(self) -> str:
        return f"RoutedReward(default={self.default!r})"


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
def _reward_model(**kwargs) -> RewardModelReward:
    """A :class:`RewardModelReward` around ``model=`` (and ``tokenizer=``, config fields)."""
    if kwargs.get("model") is None:
        raise ValueError("reward 'reward_model' needs a trained model: in a recipe set [reward] "
                         "reward_model = \"<folder>\" (the model/ folder `r1fast stage "
                         "reward-model` writes); in Python pass model=<callable>")
    return RewardModelReward(**kwargs)


register_reward("reward_model", _reward_model)
_BUILT_IN = frozenset(_REGISTRY)  # what every process registers on import
