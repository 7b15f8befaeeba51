"""Which megatron-core versions the bridges are for: one table, read by everything that names a
version (the import-time check, the error of a missing megatron name, the pip hint and the test
that compares it with pyproject.toml's pin).

The bridges replace megatron internals by name (module globals, private functions, class
methods), so they are only as good as the versions they were run against. The *supported
range* is what pyproject.toml pins; the *tested versions* are the releases the test suite
(tests/megatron_compat, tests/policy, the gloo TP/PP/EP equivalence) actually passed with.
Outside the range :func:`check_megatron_version` warns; a bridged name that is gone raises
(:func:`require`), whatever the version says.

To support a new release: run the suite against it, add it to :data:`TESTED`, widen
:data:`SUPPORTED` if needed, and keep pyproject.toml's ``megatron-core`` line equal to
:func:`pip_requirement` (tests/megatron_compat/test_bridges.py checks that).
"""
from __future__ import annotations

import warnings
from typing import Any

SUPPORTED = ("0.16", "0.17")
"""[low, high): the megatron-core versions r1fast supports; pyproject.toml pins exactly this."""

TESTED: dict[str, str] = {
    "0.16.1": "every bridge; CPU/gloo TP2, EP2, PP2, TP2xEP2 equal one rank (Python 3.11)",
}
"""Releases the suite passed with -> what was measured."""

NOT_SUPPORTED: dict[str, str] = {
    "0.17": "needs Python >= 3.12 and was never run with these bridges",
}
"""Release series known to fall outside :data:`SUPPORTED` -> why (quoted in the warning)."""


def version_tuple(version: str) -> tuple[int, int, int]:
    """``"0.16.1rc2"`` -> ``(0, 16, 1)``; missing parts are 0."""
    parts = []
    for part in version.split(".")[:3]:
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)  # type: ignore[return-value]


def pip_requirement() -> str:
    """The pip requirement of the supported range, as pyproject.toml spells it."""
    low, high = SUPPORTED
    return f"megatron-core>={low},<{high}"


def is_supported(version: str) -> bool:
    low, high = SUPPORTED
    return version_tuple(low) <= version_tuple(version) < version_tuple(high)


def describe() -> str:
    """One line for messages: the supported range and the tested releases."""
    return f"supported: {pip_requirement()}; tested: {', '.join(sorted(TESTED))}"


def _why_not(version: str) -> str:
    for series, why in NOT_SUPPORTED.items():
        if version_tuple(version)[:2] == version_tuple(series)[:2]:
            return f" ({series}.x {why})"
    return ""


def check_megatron_version() -> str:
    """The installed megatron-core version; a RuntimeWarning when it is outside
    :data:`SUPPORTED` (the bridges may then fail, or :func:`require` may raise)."""
    try:
        from megatron.core import package_info
    except ImportError as e:  # pragma: no cover - megatron-core is a hard dependency
        raise ImportError(f"r1fast's policy needs megatron-core (pip install "
                          f"'{pip_requirement()}')") from e
    version = package_info.__version__
    if not is_supported(version):
        warnings.warn(f"megatron-core {version} is outside the range r1fast's megatron bridges "
                      f"support{_why_not(version)}; {describe()}. The policy may fail.",
                      RuntimeWarning, stacklevel=2)
    return version


def require(owner: Any, name: str) -> Any:
    """``getattr(owner, name)`` for a megatron name a bridge replaces or calls, with an error
    that says which version range the bridges expect when the name is gone."""
    if not hasattr(owner, name):
        where = (f"{owner.__module__}.{owner.__qualname__}" if isinstance(owner, type)
                 else getattr(owner, "__name__", repr(owner)))
        raise RuntimeError(f"r1fast.megatron_compat: megatron-core {where} has no "
                           f"{name!r}; this megatron-core version is not supported ({describe()})")
    return getattr(owner, name)
