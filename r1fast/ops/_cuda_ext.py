"""Just-in-time build of r1fast's CUDA kernels (``csrc/``) and the answer to "can op X run on
CUDA here, and if not, why?".

Each op's kernels live in ``csrc/<stem>.cu`` (plain CUDA, ``extern "C"`` launchers taking a
``cudaStream_t``, no torch headers) plus ``csrc/<stem>.cpp`` (the torch bindings). One stem
builds one extension module, ``r1fast_<stem>``, with ``torch.utils.cpp_extension.load`` and
ninja, the first time an op needs it. The build directory is cached (``R1FAST_EXT_DIR``, default
``~/.cache/r1fast/torch_extensions/<torch>-cu<cuda>/<stem>``): later processes reuse it and ninja
rebuilds only what changed. A build is tried once per process; its failure is remembered.
``R1FAST_CUDA_EXT=0`` turns the extension off (every op reports why): ``make gpu-check`` sets it
for the stages after a failed or cut build, so each process does not compile again.

Everything here is answered once per process and cached: the environment check (CUDA torch, a
device, nvcc, ninja -- ``is_ninja_available`` starts a ``ninja --version`` subprocess, 1-20 ms),
each op's :func:`missing` answer and its loaded module, so the dispatch on the hot path of an
op costs a dictionary lookup. :func:`clear_caches` forgets them (tests, or after installing a
toolkit in a running process).

:func:`missing` is what ``r1fast.ops._dispatch`` calls; it names exactly what is absent:
a CPU-only torch, no CUDA device, no nvcc, no ninja, ``build failed: <first error line>``, or the
op not being in the built extension. Ops not listed in ``_OPS`` default to stem = op name and
any function named ``<op>`` or ``<op>_*`` in it, so a new ``csrc/<op>.cu`` needs no edit here.
"""
from __future__ import annotations

import functools
import os
import shutil
import threading
from pathlib import Path
from types import ModuleType

import torch

from r1fast.ops._dispatch import ImplUnavailableError

# op -> (source stem, functions the op needs from the extension)
_OPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "moe_route": ("moe_route", ("moe_route_fwd", "moe_route_bwd")),
    "moe_aux_scores": ("moe_route", ("moe_aux_scores_fwd", "moe_aux_scores_bwd")),
    "moe_permute": ("moe_route", ("moe_scatter_rows", "moe_gather_combine")),
    "moe_unpermute": ("moe_route", ("moe_scatter_rows", "moe_gather_combine")),
}

_lock = threading.Lock()
_built: dict[str, ModuleType | str] = {}  # stem -> module, or the build error's first line


def csrc_dir() -> Path:
    """Folder of the CUDA sources (installed as ``r1fast.csrc``)."""
    import r1fast.csrc

    return Path(r1fast.csrc.__file__).resolve().parent


def _sources(stem: str) -> list[Path]:
    d = csrc_dir()
    return [p for p in (d / f"{stem}.cpp", d / f"{stem}.cu") if p.exists()]


def _nvcc() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and Path(home, "bin", "nvcc").exists():
        return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def _build_dir(stem: str) -> Path:
    root = os.environ.get("R1FAST_EXT_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "r1fast" / "torch_extensions"
    tag = f"{torch.__version__.split('+')[0]}-cu{(torch.version.cuda or 'none').replace('.', '')}"
    path = base / tag / stem
    path.mkdir(parents=True, exist_ok=True)
    return path


def first_error_line(text: str) -> str:
    """The first line of a compiler log that reports an error (else its first non-empty line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        low = ln.lower()
        if "error" in low and not low.startswith("ninja: build stopped"):
            return ln
    return lines[0] if lines else "unknown error"


@functools.lru_cache(maxsize=None)
def _environment_missing() -> str | None:
    if os.environ.get("R1FAST_CUDA_EXT", "1") == "0":
        return "the CUDA extension is turned off (R1FAST_CUDA_EXT=0)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (no CUDA torch)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    if _nvcc() is None:
        return "nvcc not found (set CUDA_HOME or put the CUDA toolkit's bin/ on PATH)"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _build(stem: str) -> ModuleType | str:
    """Build (or load from the cache) extension ``r1fast_<stem>``; the error line on failure."""
    with _lock:
        if stem in _built:
            return _built[stem]
        from torch.utils import cpp_extension

        try:
            mod = cpp_extension.load(
                name=f"r1fast_{stem}",
                sources=[str(p) for p in _sources(stem)],
                # torch adds the C++ standard its headers need (-std=c++17/20) itself.
                extra_cflags=["-O3"],
                # No --use_fast_math: the kernels promise fp32 results matching the reference.
                extra_cuda_cflags=["-O3", "-lineinfo"],
                extra_include_paths=[str(csrc_dir())],
                build_directory=str(_build_dir(stem)),
                verbose=os.environ.get("R1FAST_EXT_VERBOSE", "0") == "1",
            )
        except (RuntimeError, OSError, ImportError) as e:  # compiler, linker or loader failure
            _built[stem] = f"build failed: {first_error_line(str(e))}"
        else:
            _built[stem] = mod
        return _built[stem]


def _spec(op: str) -> tuple[str, tuple[str, ...] | None]:
    if op in _OPS:
        return _OPS[op]
    return op, None  # None: any function named `op` or `op_*`


@functools.lru_cache(maxsize=None)
def missing(op: str) -> str | None:
    """Why the CUDA kernels of ``op`` cannot run in this process, or None when they can.
    Builds the extension on first use (a minute or so), so call it lazily. Cached per op."""
    why = _environment_missing()
    if why is not None:
        return why
    stem, symbols = _spec(op)
    if not _sources(stem):
        return f"op {op!r} not in extension: no csrc/{stem}.cpp or csrc/{stem}.cu"
    mod = _build(stem)
    if isinstance(mod, str):
        return mod
    names = dir(mod)
    if symbols is None:
        if not any(n == op or n.startswith(op + "_") for n in names):
            return f"op {op!r} not in extension r1fast_{stem}"
    else:
        absent = [s for s in symbols if s not in names]
        if absent:
            return f"op {op!r} not in extension r1fast_{stem} (missing {', '.join(absent)})"
    return None


def load(op: str) -> ModuleType:
    """The built extension module holding ``op``; raises ImplUnavailableError otherwise."""
    module = _loaded.get(op)
    if module is not None:
        return module
    why = missing(op)
    if why is not None:
        raise ImplUnavailableError(f"{op}: impl='cuda' is unavailable: {why}")
    module = _build(_spec(op)[0])
    assert not isinstance(module, str)
    _loaded[op] = module
    return module


_loaded: dict[str, ModuleType] = {}  # op -> its module, once load() succeeded


def clear_caches() -> None:
    """Forget the cached environment check, ``missing`` answers and loaded modules (not the
    builds: a failed build stays failed for this process)."""
    _environment_missing.cache_clear()
    missing.cache_clear()
    _loaded.clear()
