"""Choosing an op's implementation: what ``triton_missing`` answers on a CPU, where Triton runs
in its interpreter, and how a refused interpreter reaches the op's caller."""
import pytest
import torch

from r1fast.ops import _dispatch
from r1fast.ops._dispatch import ImplUnavailableError, resolve_impl, triton_missing

CPU = torch.device("cpu")
INTERPRETED = _dispatch.triton_importable() and _dispatch.triton_interpret()


@pytest.mark.skipif(not INTERPRETED, reason="the probe runs in the Triton interpreter (CPU)")
def test_interpreter_probe_passes_where_the_kernels_run():
    # the suite's Triton tests run here, so the probe kernel must run too
    assert _dispatch.interpreter_missing() is None
    assert triton_missing(CPU) is None


@pytest.mark.skipif(not INTERPRETED, reason="the probe runs in the Triton interpreter (CPU)")
def test_a_refused_interpreter_is_named_by_the_op(monkeypatch):
    why = "the Triton interpreter of triton 3.6.0 cannot run r1fast's kernels with numpy 2.4.6"
    monkeypatch.setattr(_dispatch, "interpreter_missing", lambda: why)
    assert triton_missing(CPU) == why
    with pytest.raises(ImplUnavailableError, match="linear_logprob: impl='triton' is "
                                                   "unavailable: the Triton interpreter"):
        resolve_impl("linear_logprob", "triton", CPU, supported=("torch", "triton"))
    # auto stays on torch on a CPU, as before: the interpreter is only used when asked for
    assert resolve_impl("linear_logprob", "auto", CPU, supported=("torch", "triton")) == "torch"


def test_cpu_without_the_interpreter_is_refused_with_how_to_turn_it_on(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not _dispatch.triton_importable():
        pytest.skip("triton is not installed")
    assert "set TRITON_INTERPRET=1" in triton_missing(CPU)
