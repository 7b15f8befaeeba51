"""The megatron-core CPU bridges: applied only without CUDA and idempotently, the version pin,
the torch proxy of bridged megatron modules, the CPU RNG tracker, the scoped Tensor-method
shims, sequence parallelism with torch norms, and the gloo collectives (2 processes)."""
from __future__ import annotations

import importlib.util
import pathlib
import warnings

import pytest
import torch

from r1fast.policy import cpu_compat

_spec = importlib.util.spec_from_file_location("r1fast_policy_test_dist",
                                               pathlib.Path(__file__).with_name("_dist.py"))
_dist = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_dist)

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU bridges are off on GPU")


def test_applied_only_without_cuda_and_idempotent():
    first = cpu_compat.apply_megatron_bridges()
    assert cpu_compat.apply_megatron_bridges() == first
    assert ("torch_names" in first) == (not torch.cuda.is_available())
    if cpu_compat.te_absent():
        assert "te_general_gemm" in first


def test_version_pin_warns_outside_range(monkeypatch):
    from megatron.core import package_info

    monkeypatch.setattr(package_info, "__version__", "0.99.0")
    with pytest.warns(RuntimeWarning, match=r"megatron-core 0.99.0 is outside the range"):
        cpu_compat.check_megatron_version()
    monkeypatch.setattr(package_info, "__version__", "0.16.1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_compat.check_megatron_version() == "0.16.1"


def test_missing_megatron_name_is_reported():
    with pytest.raises(RuntimeError, match=r"has no 'nope'; this megatron-core version is not "
                                           r"supported"):
        cpu_compat._require(cpu_compat, "nope")


def test_torch_proxy():
    proxy = cpu_compat._TorchOnCPU()
    assert proxy.zeros(2, device="cuda").device.type == "cpu"
    assert proxy.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    assert proxy.ones(1, device=0).device.type == "cpu"  # an int device is a CUDA ordinal
    assert proxy.float32 is torch.float32 and proxy.Tensor is torch.Tensor
    assert proxy.cuda.current_device() == torch.device("cpu")
    s = proxy.cuda.Stream()
    s.wait_stream(proxy.cuda.current_stream())
    with proxy.cuda.stream(s):
        pass
    s.record_event().synchronize()
    assert proxy.cuda.is_available() == torch.cuda.is_available()


@CPU_ONLY
def test_bridged_megatron_module_runs_on_cpu():
    cpu_compat.apply_megatron_bridges()
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(3)  # torch.ones(device="cuda") inside
    assert mask.device.type == "cpu" and mask.tolist()[0] == [False, True, True]


@CPU_ONLY
def test_cpu_rng_tracker_forks_and_restores():
    cpu_compat.apply_megatron_bridges()
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("stream", 123)
    torch.manual_seed(0)
    outside = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork("stream"):
        a = torch.rand(3)
    assert torch.equal(torch.rand(3), outside)  # the default stream is untouched
    with tracker.fork("stream"):
        b = torch.rand(3)
    assert torch.equal(a, torch.rand(3, generator=torch.Generator().manual_seed(123)))
    assert not torch.equal(a, b)  # the named stream advanced
    with pytest.raises(Exception, match="rng state nope is not added"):
        with tracker.fork("nope"):
            pass


def test_cuda_tensor_methods_are_scoped():
    t = torch.zeros(2)
    with cpu_compat._cuda_tensor_methods():
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.cuda() is t
        assert t.type(torch.float64).dtype == torch.float64  # conversions are untouched
    assert t.type() == "torch.FloatTensor"


def test_torch_norm_under_sequence_parallel():
    cpu_compat.apply_megatron_bridges()
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                            normalization="RMSNorm", tensor_model_parallel_size=2,
                            sequence_parallel=True)
    norm = WrappedTorchNorm(cfg, 8, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm) and cfg.sequence_parallel
    assert getattr(norm.weight, "sequence_parallel", False)


@CPU_ONLY
@pytest.mark.multiproc
def test_gloo_uneven_collectives_and_tensor_splits():
    res = _dist.launch(2, "uneven", {}, timeout=180)
    want = torch.cat([torch.full((r + 1, 3), float(r + 1)) + torch.arange(3.0) for r in range(2)])
    total = res[0]["full"] + res[1]["full"]  # [3, 3]: rank r keeps rows of size r+1
    for r, out in enumerate(res):
        assert torch.equal(out["gathered"], want)
        assert torch.allclose(out["scattered"], total[[0]] if r == 0 else total[1:])
        assert torch.equal(out["a2a"], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
