"""Adapters between r1fast and megatron-core: what lets megatron's GPU code run on a CPU box
under gloo, and without Transformer Engine, unchanged in its math.

megatron-core is written for CUDA + NCCL + TE. r1fast runs the *same* megatron code paths
everywhere (a CPU box reproduces a GPU layout's numbers, which is how the TP/PP/EP equivalence
tests run without GPUs). The gap is bridged here, by rebinding a few names inside megatron
modules; neither torch nor any torch class is modified.

- :mod:`~r1fast.megatron_compat.versions`: the supported/tested megatron-core versions (the
  single table pyproject.toml's pin matches) and the check.
- :mod:`~r1fast.megatron_compat.quiet`: filters for the expected third-party warnings,
  each by exact message and module.
- :mod:`~r1fast.megatron_compat.cpu`: the CPU bridges (RNG tracker, CUDA type-name checks,
  gloo collectives, torch norms under sequence parallelism) and the WARNING line that says
  they are on; :mod:`~r1fast.megatron_compat.torch_proxy`: the CPU-flavoured ``torch`` that
  megatron's device-naming modules see.
- :mod:`~r1fast.megatron_compat.te`: the bridge for a machine without Transformer Engine.

One entry point: :func:`install`, called by :func:`r1fast.policy.parallel.init_parallel`
(which every way of building a policy goes through) before megatron builds anything. It is
idempotent and applies the CPU bridges only when CUDA is absent (on a GPU they are never
touched) and the TE bridge only when TE is absent. Importing this package imports torch but
not megatron.
"""
from __future__ import annotations

import threading

from r1fast.megatron_compat import quiet

quiet.install_filters()  # before anything imports megatron (see quiet.py)

from r1fast.megatron_compat import cpu, te, versions  # noqa: E402
from r1fast.megatron_compat.cpu import cuda_absent  # noqa: E402
from r1fast.megatron_compat.te import te_absent  # noqa: E402

__all__ = ["install", "applied_bridges", "cuda_absent", "te_absent"]

_APPLIED: list[str] = []
_VERSION: list[str] = []  # the checked megatron-core version, once
_LOCK = threading.Lock()


def install() -> list[str]:
    """Apply what this process needs, once: the version check, the warning filters, the CPU
    bridges when CUDA is absent (announced by one WARNING line) and the TE bridge when TE is
    absent. Returns the names of the bridges applied (see :func:`applied_bridges`)."""
    with _LOCK:
        quiet.install_filters()
        if not _VERSION:
            _VERSION.append(versions.check_megatron_version())
        if cuda_absent():
            for name, bridge in cpu.BRIDGES.items():
                if name not in _APPLIED:
                    bridge()
                    _APPLIED.append(name)
            cpu.announce()
        if te_absent() and "te_general_gemm" not in _APPLIED:
            te.bridge_te_general_gemm()
            te.bridge_mla_te_flag()
            _APPLIED.extend(["te_general_gemm", "mla_have_te"])
    return applied_bridges()


def applied_bridges() -> list[str]:
    """Names of the bridges applied in this process so far, sorted."""
    return sorted(_APPLIED)
