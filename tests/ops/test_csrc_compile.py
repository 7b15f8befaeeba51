"""Compile checks of the CUDA sources in csrc/ on machines without a GPU, so a syntax or type
error in a kernel cannot land unnoticed: every ``csrc/*.cu`` is compiled for sm_90 with nvcc
(default suite; skipped with the reason when nvcc is absent), and every ``csrc/*.cpp`` binding
is syntax-checked against the installed torch headers (slow: torch/extension.h is heavy).
Also the "what is missing" answers of ``r1fast.ops._cuda_ext`` on a machine without CUDA.
"""
from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from r1fast.ops import _cuda_ext

CSRC = _cuda_ext.csrc_dir()
CU_FILES = sorted(CSRC.glob("*.cu"))
CPP_FILES = sorted(CSRC.glob("*.cpp"))


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


NVCC = _nvcc()


def _cuda_include() -> Path | None:
    if NVCC is None:
        return None
    from torch.utils import cpp_extension

    candidates = [Path(NVCC).resolve().parent.parent / "include", Path("/usr/local/cuda/include")]
    if cpp_extension.CUDA_HOME:
        candidates.insert(0, Path(cpp_extension.CUDA_HOME) / "include")
    return next((c for c in candidates if (c / "cuda_runtime.h").exists()), None)


def test_csrc_has_sources():
    assert CU_FILES and CPP_FILES, f"no CUDA sources found in {CSRC}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit on this machine)")
@pytest.mark.parametrize("path", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cu_compiles_for_sm90(path, tmp_path):
    cmd = [NVCC, "-c", "-arch=sm_90", "-std=c++17", "-o", str(tmp_path / "x.o"), str(path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (f"{path.name}: {_cuda_ext.first_error_line(res.stderr)}\n"
                                 f"{res.stderr[-4000:]}")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include() is None,
                    reason="needs g++ and the CUDA toolkit headers")
@pytest.mark.parametrize("path", CPP_FILES, ids=[p.name for p in CPP_FILES])
def test_cpp_bindings_syntax_check(path, tmp_path):
    """The CPU torch wheel ships the c10/cuda headers but not the generated
    cuda_cmake_macros.h; an empty shim stands in for it (docs/DESIGN.md §5)."""
    shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n")
    torch_inc = Path(torch.__file__).parent / "include"
    cmd = ["g++", "-fsyntax-only", "-std=c++20", f"-I{tmp_path / 'shim'}", f"-I{torch_inc}",
           f"-I{torch_inc / 'torch' / 'csrc' / 'api' / 'include'}",
           f"-I{sysconfig.get_paths()['include']}", f"-I{_cuda_include()}", f"-I{CSRC}",
           f"-DTORCH_EXTENSION_NAME=r1fast_{path.stem}", str(path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (f"{path.name}: {_cuda_ext.first_error_line(res.stderr)}\n"
                                 f"{res.stderr[-4000:]}")


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA")
def test_missing_names_a_cpu_only_torch():
    why = _cuda_ext.missing("moe_route")
    assert why is not None and "CPU-only build" in why


def test_the_extension_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("R1FAST_CUDA_EXT", "0")
    _cuda_ext.clear_caches()
    try:
        assert _cuda_ext.missing("moe_route") == \
            "the CUDA extension is turned off (R1FAST_CUDA_EXT=0)"
    finally:
        monkeypatch.delenv("R1FAST_CUDA_EXT")
        _cuda_ext.clear_caches()


def test_first_error_line_picks_the_compiler_error():
    log = ("[1/3] c++ -c foo.cpp\nFAILED: foo.o\nfoo.cpp:3:1: error: expected ';' before '}'\n"
           "ninja: build stopped: subcommand failed.\n")
    assert _cuda_ext.first_error_line(log) == "foo.cpp:3:1: error: expected ';' before '}'"
    assert _cuda_ext.first_error_line("\n\nsomething odd\n") == "something odd"


def test_op_registry_points_at_existing_sources():
    for op, (stem, symbols) in _cuda_ext._OPS.items():
        assert _cuda_ext._sources(stem), f"{op}: no csrc/{stem}.cpp/.cu"
        bindings = (CSRC / f"{stem}.cpp").read_text()
        for sym in symbols:
            assert f'm.def("{sym}"' in bindings, f"{op}: {sym} is not bound in {stem}.cpp"

