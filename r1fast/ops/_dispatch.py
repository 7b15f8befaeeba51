"""Choosing an implementation for an op: ``impl="auto"|"torch"|"triton"|"cuda"``.

Every public op takes ``impl``. ``"torch"`` is the pure-PyTorch reference, available
everywhere. ``"triton"`` needs the ``triton`` package and either a CUDA tensor or the Triton
interpreter (``TRITON_INTERPRET=1``, how CI runs kernels on a CPU). ``"cuda"`` needs a CUDA
tensor and the just-in-time built extension of ``csrc/``. ``"auto"`` picks the fastest path
that is present for the tensor's device: cuda > triton > torch on a GPU, torch on a CPU (the
interpreter is 1000x slower than torch, so it is only used when asked for).

Asking for a path that is not there raises :class:`ImplUnavailableError` naming what is missing,
never a silent fallback. The chosen path is logged once per op. What is present is answered once
per process (cached), so choosing costs no subprocess or file lookup on the hot path.

Debug checks: no op waits for the GPU (a host sync: ``.item()``, ``.tolist()``, ``.cpu()``,
``bool(t)``, ``torch.bincount``, ``nonzero``) on its hot path. Checks that need the values of
device tensors (indices in range, a row map that is a permutation, targets inside the
vocabulary) run only when :func:`debug_checks` is on: ``R1FAST_DEBUG_CHECKS=1`` in the
environment (read at each call, so a test or a debugging session can switch it), or the
``validate=True`` argument of the op. Shape, dtype and device checks always run (they read
metadata only).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import Callable, Iterable

import torch

log = logging.getLogger("r1fast.ops")

IMPLS = ("auto", "torch", "triton", "cuda")


class ImplUnavailableError(RuntimeError):
    """The requested implementation of an op cannot run here; the message says why."""


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """True when Triton kernels run in the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def debug_checks(validate: bool | None = None) -> bool:
    """Whether an op runs its value checks (host syncs): ``validate`` when given, else the
    environment variable ``R1FAST_DEBUG_CHECKS`` (``1``/``true``/``yes`` turn them on)."""
    if validate is not None:
        return bool(validate)
    return os.environ.get("R1FAST_DEBUG_CHECKS", "0").strip().lower() in ("1", "true", "yes")


def checks_values(validate: bool | None, device: torch.device) -> bool:
    """An op's ``validate=`` argument when given, else :func:`value_checks` of ``device``."""
    return bool(validate) if validate is not None else value_checks(device)


def value_checks(device: torch.device) -> bool:
    """Whether an op reads tensor values to validate them: always for CPU tensors (no device to
    wait for), on an accelerator only under ``R1FAST_DEBUG_CHECKS=1`` (each read is a host sync
    on the hot path), never while compiling."""
    return not torch.compiler.is_compiling() and (device.type == "cpu" or debug_checks())


@functools.lru_cache(maxsize=None)
def interpreter_missing() -> str | None:
    """Why this process's Triton interpreter cannot run r1fast's kernels, or None when it can.

    Answered once per process by running a probe kernel whose loop starts at a tensor, the way
    every r1fast kernel splits its work. Why a probe and not a version table: Triton 3.6's
    interpreter turns such a bound into a Python index with ``int()`` of a one-element array,
    which NumPy 2.4 made an error; Triton 3.8 squeezes the array first. The same pair of
    packages works compiled on a GPU, so only the interpreter (CPU runs, CI) is refused.
    """
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def _loop_from_program_id(out_ptr, n):
        for i in range(tl.program_id(0), n):
            tl.store(out_ptr + i, i)

    out = torch.zeros(2, dtype=torch.int32)
    try:
        _loop_from_program_id[(1,)](out, 2)
    except Exception as exc:  # the interpreter wraps its cause; the message names it
        return (f"the Triton interpreter of triton {triton.__version__} cannot run r1fast's "
                f"kernels with numpy {numpy.__version__} ({type(exc).__name__}: {exc}); "
                "install numpy<2.4 or triton>=3.8")
    if out.tolist() != [0, 1]:
        return (f"the Triton interpreter of triton {triton.__version__} ran a probe loop "
                f"wrongly (wrote {out.tolist()}, expected [0, 1])")
    return None


def triton_missing(device: torch.device) -> str | None:
    """Why Triton cannot run on ``device``, or None when it can."""
    if not triton_importable():
        return "the `triton` package is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpret():
        return interpreter_missing()
    return (f"Triton kernels need CUDA tensors (got device {device.type!r}); on a CPU set "
            "TRITON_INTERPRET=1 before the first launch to use the (slow) interpreter")


def cuda_missing(device: torch.device, op: str) -> str | None:
    """Why the CUDA extension cannot run ``op`` on ``device``, or None when it can."""
    if device.type != "cuda":
        return f"the CUDA kernels need CUDA tensors (got device {device.type!r})"
    from r1fast.ops import _cuda_ext  # local: building the extension is expensive

    return _cuda_ext.missing(op)


_logged: set[tuple[str, str, str]] = set()


def resolve_impl(
    op: str,
    impl: str,
    device: torch.device,
    supported: Iterable[str] = ("torch",),
) -> str:
    """Return the concrete implementation (``torch``/``triton``/``cuda``) to run ``op`` with.

    ``supported`` lists the implementations that ``op`` has. Raises ``ValueError`` for an unknown
    ``impl`` and :class:`ImplUnavailableError` when the requested one cannot run here.
    """
    supported = tuple(supported)
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    checks: dict[str, Callable[[], str | None]] = {
        "torch": lambda: None,
        "triton": lambda: triton_missing(device),
        "cuda": lambda: cuda_missing(device, op),
    }
    if impl == "auto":
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("torch",)
        chosen = next(i for i in order if i in supported and checks[i]() is None)
    else:
        if impl not in supported:
            raise ImplUnavailableError(
                f"{op}: impl={impl!r} is not implemented for this op; available: {supported}")
        why = checks[impl]()
        if why is not None:
            raise ImplUnavailableError(f"{op}: impl={impl!r} is unavailable: {why}")
        chosen = impl
    key = (op, impl, chosen)
    # (logging is a graph break under torch.compile; an eager call logs it)
    if key not in _logged and not torch.compiler.is_compiling():
        _logged.add(key)
        log.info("r1fast.ops.%s: impl=%s -> %s on %s", op, impl, chosen, device.type)
    return chosen
