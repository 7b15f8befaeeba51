"""GPU-path hygiene checked on a CPU (issue #18): no op waits for the GPU on its hot path, the
value checks that do still fire under ``R1FAST_DEBUG_CHECKS=1`` / ``validate=True``, the
environment checks of the CUDA dispatch run once per process, and the routing agreement check
of the CUDA tests accepts ties and nothing else.

A host sync is any of ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool(t)`` /
``int(t)`` (``aten._local_scalar_dense``), ``nonzero``, ``bincount``, ``unique`` or
``masked_select`` issued from r1fast code (the Triton interpreter, which runs the kernels here,
copies tensors to the host by design and is not counted). On a CPU nothing really waits, so the
recorder stands in for the GPU: what it records would be a stall there. On a GPU the same tests
run on CUDA tensors, after a warm-up call (autotuning syncs), and also under
``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising CUDA call.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from r1fast.ops import _cuda_ext, _dispatch
from r1fast.ops._dispatch import triton_missing
from r1fast.ops.fused_linear_policy_loss import fused_linear_policy_loss
from r1fast.ops.linear_logprob import linear_logprob
from r1fast.ops.moe_permute import moe_permute, moe_permute_rows, moe_unpermute
from r1fast.ops.moe_route import moe_route
from r1fast.ops.policy_loss import PolicyLossConfig, policy_loss
from tests.helpers.host_sync import SyncRecorder
from tests.helpers.moe_route_cases import rows_agree_up_to_ties

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NO_TRITON = triton_missing(DEVICE)
needs_triton = pytest.mark.skipif(NO_TRITON is not None, reason=str(NO_TRITON))

@pytest.fixture
def no_debug(monkeypatch):
    monkeypatch.delenv("R1FAST_DEBUG_CHECKS", raising=False)


def _permute_inputs(device=torch.device("cpu")):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 33, generator=g).to(device).requires_grad_()
    idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(7)]).to(device)
    w = torch.rand(7, 2, generator=g).to(device).requires_grad_()
    return x, idx, w


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_moe_permute_and_unpermute_do_not_sync(impl, monkeypatch, no_debug):
    x, idx, w = _permute_inputs(DEVICE)

    def step():
        perm, row_map, counts = moe_permute(x, idx, 8, impl=impl)
        again = moe_permute_rows(x, row_map, impl=impl)
        moe_unpermute(perm * 2 + again, row_map, w, impl=impl).sum().backward()
        return counts

    step()  # warm-up: compilation and autotuning may sync
    with SyncRecorder(monkeypatch) as rec:
        counts = step()
    assert rec.calls == []
    assert torch.equal(counts, torch.bincount(idx.reshape(-1), minlength=8))


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_moe_route_does_not_sync(impl, monkeypatch, no_debug):
    logits = torch.randn(9, 16, device=DEVICE, requires_grad=True)
    replay = torch.stack([torch.randperm(16)[:4] for _ in range(9)]).to(DEVICE)

    def step():
        for kw in ({}, {"replay_indices": replay}, {"n_groups": 4, "topk_groups": 2}):
            r = moe_route(logits, 4, score="sigmoid", impl=impl, **kw)
            r.weights.sum().backward()
        return r

    step()
    with SyncRecorder(monkeypatch) as rec:
        r = step()
    assert rec.calls == []
    want = torch.bincount(r.indices.reshape(-1), minlength=16)
    assert torch.equal(r.tokens_per_expert, want)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("per_row_tau", [False, True], ids=["one-tau", "row-tau"])
def test_linear_logprob_does_not_sync(impl, per_row_tau, monkeypatch, no_debug):
    h = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(13, 8, device=DEVICE, requires_grad=True)
    t = torch.tensor([0, 3, -100, 12, 5, 1], device=DEVICE)
    tau = torch.linspace(0.5, 1.5, 6, device=DEVICE) if per_row_tau else 0.9

    def step():
        logp, ent = linear_logprob(h, w, t, tau, return_entropy=True, impl=impl)
        (logp.sum() + ent.sum()).backward()

    step()
    with SyncRecorder(monkeypatch) as rec:
        step()
    assert rec.calls == []


@needs_triton
@pytest.mark.parametrize("mask_dtype", [
    torch.bool,
    pytest.param(torch.float32, marks=pytest.mark.xfail(
        DEVICE.type == "cpu", reason="policy_loss._validate reads a float mask's values "
        "(finite, >= 0) on CPU tensors, where it costs no device sync; on an accelerator "
        "only under R1FAST_DEBUG_CHECKS")),
])
def test_padded_policy_loss_triton_does_not_sync(mask_dtype, monkeypatch, no_debug):
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(3, 5, generator=g)).to(DEVICE).requires_grad_()
    old = logp.detach() + 0.05
    adv = torch.tensor([1.0, -1.0, 0.5], device=DEVICE)
    mask = torch.ones(3, 5, device=DEVICE, dtype=mask_dtype)

    def step():
        for agg in ("token-mean", "seq-mean-token-sum-norm"):
            loss, _ = policy_loss(logp, old, adv, mask, PolicyLossConfig(agg=agg), impl="triton")
            loss.backward()

    step()
    with SyncRecorder(monkeypatch) as rec:
        step()
    assert rec.calls == []


@needs_triton
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_packed_policy_loss_triton_does_not_sync_on_an_accelerator(mask_dtype, monkeypatch,
                                                                  no_debug):
    """Packed inputs, a float mask and a tensor normaliser: their value checks (cu_seqlens
    from 0 to N and non-decreasing, L_max, mask finite and >= 0, normaliser > 0) read the
    device, so on an accelerator they run only under R1FAST_DEBUG_CHECKS. The CPU always runs
    them (nothing waits there), so the accelerator's rule is put in place here."""
    # the module, not the function r1fast.ops re-exports under the same name
    policy_loss_module = sys.modules[policy_loss.__module__]
    monkeypatch.setattr(policy_loss_module, "value_checks", lambda device: False)
    g = torch.Generator().manual_seed(3)
    logp = (-torch.rand(9, generator=g)).to(DEVICE).requires_grad_()
    old = logp.detach() + 0.05
    adv = torch.tensor([1.0, -1.0, 0.5], device=DEVICE)
    mask = torch.ones(9, device=DEVICE, dtype=mask_dtype)
    cu = torch.tensor([0, 2, 6, 9], device=DEVICE, dtype=torch.int32)
    norm = torch.tensor([7.0], device=DEVICE)

    def step():
        for agg, kw in (("token-mean", {}), ("seq-mean-token-mean", {}),
                        ("seq-mean-token-sum-norm", {"max_len": 4}),
                        ("token-mean", {"global_normalizer": norm})):
            loss, _ = policy_loss(logp, old, adv, mask, PolicyLossConfig(agg=agg),
                                  cu_seqlens=cu, impl="triton", **kw)
            loss.backward()

    step()
    with SyncRecorder(monkeypatch) as rec:
        step()
    assert rec.calls == []


@needs_triton
def test_padded_fused_linear_policy_loss_triton_does_not_sync(monkeypatch, no_debug):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 3, 8, generator=g).to(DEVICE).requires_grad_()
    weight = torch.randn(11, 8, generator=g).to(DEVICE).requires_grad_()
    targets = torch.randint(0, 11, (2, 3), generator=g).to(DEVICE)
    old = -torch.rand(2, 3, generator=g).to(DEVICE)
    adv = torch.tensor([1.0, -0.5], device=DEVICE)
    mask = torch.ones(2, 3, device=DEVICE, dtype=torch.bool)  # a float mask syncs (see above)

    def step():
        loss, _ = fused_linear_policy_loss(hidden, weight, targets, old, adv, mask,
                                           impl="triton")
        loss.backward()

    step()
    with SyncRecorder(monkeypatch) as rec:
        step()
    assert rec.calls == []


def test_recorder_sees_a_sync(monkeypatch):
    """The recorder itself works: the debug checks it is meant to catch are seen."""
    x, idx, w = _permute_inputs()
    with SyncRecorder(monkeypatch) as rec:
        moe_permute(x, idx, 8, impl="torch", validate=True)
    assert rec.calls


def test_recorder_sees_boolean_mask_indexing(monkeypatch, tmp_path):
    """``x[mask]`` (a bool or a deprecated uint8 mask) and ``x[mask] = v`` turn the mask into
    indices, a count a GPU must report first; the recorder names them when r1fast code does
    it."""
    import importlib.util

    path = tmp_path / "r1fast" / "probe.py"  # a module whose frames look like r1fast code
    path.parent.mkdir()
    path.write_text("def read(x, m):\n    return x[m]\n\n\ndef write(x, m):\n    x[m] = 0.0\n")
    spec = importlib.util.spec_from_file_location("r1fast_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    x = torch.randn(6)
    with SyncRecorder(monkeypatch) as rec, pytest.warns(UserWarning, match="uint8"):
        probe.read(x, x > 0)
        probe.read(x, (x > 0).to(torch.uint8))
        probe.write(x, x > 0)
        x[x > 0]  # the test's own indexing is not r1fast's
    assert rec.calls == ["aten::index (boolean mask)"] * 2 + ["aten::index_put_ (boolean mask)"]


# ----------------------------------------------------------------------------- debug checks

@pytest.mark.parametrize("how", ["env", "argument"])
def test_value_checks_fire_in_debug_mode(how, monkeypatch):
    if how == "env":
        monkeypatch.setenv("R1FAST_DEBUG_CHECKS", "1")
        kw = {}
    else:
        monkeypatch.delenv("R1FAST_DEBUG_CHECKS", raising=False)
        kw = {"validate": True}
    x, idx, w = _permute_inputs()
    with pytest.raises(ValueError, match=r"expert ids in \[0, 8\)"):
        moe_permute(x, idx + 8, 8, impl="torch", **kw)
    rm = torch.zeros(7, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="row_map must be a permutation"):
        moe_unpermute(torch.randn(14, 3), rm, w, impl="torch", **kw)
    with pytest.raises(ValueError, match=r"replay_indices must hold expert ids in \[0, 16\)"):
        moe_route(torch.randn(2, 16), 2, replay_indices=torch.tensor([[0, 16], [1, 2]]),
                  impl="torch", **kw)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 13\)"):
        linear_logprob(torch.randn(2, 8), torch.randn(13, 8), torch.tensor([0, 13]),
                       impl="torch", **kw)


def test_value_checks_are_off_by_default_and_validate_false_wins(monkeypatch):
    monkeypatch.delenv("R1FAST_DEBUG_CHECKS", raising=False)
    assert not _dispatch.debug_checks()
    moe_unpermute(torch.randn(14, 3), torch.zeros(7, 2, dtype=torch.int64), torch.rand(7, 2),
                  impl="torch")  # not checked: no error
    monkeypatch.setenv("R1FAST_DEBUG_CHECKS", "1")
    assert _dispatch.debug_checks() and not _dispatch.debug_checks(False)
    moe_unpermute(torch.randn(14, 3), torch.zeros(7, 2, dtype=torch.int64), torch.rand(7, 2),
                  impl="torch", validate=False)


def test_shape_checks_always_run(monkeypatch):
    monkeypatch.delenv("R1FAST_DEBUG_CHECKS", raising=False)
    with pytest.raises(ValueError, match="row_map must have T\\*k = 9 entries"):
        moe_unpermute(torch.randn(9, 3), torch.zeros(7, 2, dtype=torch.int64), torch.rand(7, 2))
    with pytest.raises(ValueError, match=r"replay_indices must have shape \[2, 2\]"):
        moe_route(torch.randn(2, 16), 2, replay_indices=torch.zeros(2, 3, dtype=torch.int64))


# ----------------------------------------------------------------------------- env cache

@pytest.fixture
def fresh_cuda_ext_caches():
    real_environment_missing = _cuda_ext._environment_missing  # tests may patch it
    _cuda_ext.clear_caches()
    yield
    real_environment_missing.cache_clear()
    _cuda_ext.missing.cache_clear()
    _cuda_ext._loaded.clear()


def test_cuda_environment_checked_once_per_process(monkeypatch, fresh_cuda_ext_caches):
    """``missing``/``load`` on every op call must not start ``ninja --version`` (1-20 ms)
    each time: the environment is checked once, the answers are cached."""
    calls = []
    real = subprocess.check_output

    def counting(cmd, *a, **kw):
        calls.append(cmd)
        if cmd[:1] == ["ninja"]:
            return b"1.11.1\n"
        return real(cmd, *a, **kw)

    class FakeExtension:
        moe_route_fwd = moe_route_bwd = moe_scatter_rows = moe_gather_combine = object()
        moe_aux_scores_fwd = moe_aux_scores_bwd = object()

    builds = []
    monkeypatch.setattr(subprocess, "check_output", counting)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_cuda_ext, "_nvcc", lambda: "/usr/local/cuda/bin/nvcc")
    monkeypatch.setattr(_cuda_ext, "_build", lambda stem: builds.append(stem) or FakeExtension)
    for _ in range(50):
        for op in ("moe_route", "moe_aux_scores", "moe_permute", "moe_unpermute"):
            assert _dispatch.cuda_missing(torch.device("cuda"), op) is None
            assert _cuda_ext.load(op) is FakeExtension
    assert [c for c in calls if c[:1] == ["ninja"]] == [["ninja", "--version"]]
    assert len(builds) <= 8  # once per op in missing() and once in the first load()


def test_cuda_missing_answer_is_cached_too(monkeypatch, fresh_cuda_ext_caches):
    seen = []
    monkeypatch.setattr(_cuda_ext, "_environment_missing",
                        lambda: seen.append(1) or "no CUDA device is visible")
    for _ in range(20):
        assert _cuda_ext.missing("moe_route") == "no CUDA device is visible"
    assert len(seen) == 1


# ----------------------------------------------------------------------------- ties

def test_routing_agreement_accepts_ties_only():
    key = torch.tensor([[0.9, 0.5, 0.5, 0.1], [0.9, 0.6, 0.5, 0.1]], dtype=torch.float64)
    a = torch.tensor([[0, 1], [0, 1]])
    tie = torch.tensor([[0, 2], [0, 1]])  # row 0: experts 1 and 2 tie
    same = rows_agree_up_to_ties(a, tie, key, topk=2)
    assert same.tolist() == [False, True]
    with pytest.raises(AssertionError, match="row 1"):
        rows_agree_up_to_ties(a, torch.tensor([[0, 1], [0, 2]]), key, topk=2)
    # groups (2 groups of 2, keep 1, top 1 per group): group scores 0.9 and 0.9 tie at the cut
    gkey = torch.tensor([[0.9, 0.1, 0.2, 0.9]], dtype=torch.float64)
    assert rows_agree_up_to_ties(torch.tensor([[0]]), torch.tensor([[3]]), gkey, topk=1,
                                 groups=(2, 1)).tolist() == [False]
