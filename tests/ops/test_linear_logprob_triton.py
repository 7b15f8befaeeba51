"""Tests of the Triton path of ``linear_logprob`` (kernels and custom ops).

Without a GPU these run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before any kernel is imported), so shapes are small; on a GPU the same tests run natively.
Ground truth is the fp64 full-logits formula; launchers are given NaN-filled output buffers
so an element a kernel forgets to write shows up.
"""
from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r1fast.ops._dispatch import triton_missing
from r1fast.ops.linear_logprob import linear_logprob, merge_partials, naive_linear_logprob

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(triton_missing(DEVICE) is not None,
                                reason=str(triton_missing(DEVICE)))
IGNORE = -100
# the two ways impl="triton" computes logit tiles (fused epilogue; cuBLAS tiles + row kernels)
TILES = ["fused", "gemm"]


def make_inputs(T, H, V, dtype=torch.float32, n_ignored=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (3.0 / math.sqrt(max(H, 1)))
    targets = torch.randint(0, V, (T,), generator=g)
    if n_ignored:
        targets[torch.randperm(T, generator=g)[:n_ignored]] = IGNORE
    g_logp, g_ent = torch.randn(T, generator=g), torch.randn(T, generator=g)
    return [t.to(DEVICE) for t in (hidden.to(dtype), weight.to(dtype), targets, g_logp, g_ent)]


def fp64_truth(hidden, weight, targets, tau, g, h, ignore_index=IGNORE):
    x = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logp, ent = naive_linear_logprob(x, w, targets, tau, True, ignore_index)
    ((logp * g.double()).sum() + (ent * h.double()).sum()).backward()
    return logp.detach(), ent.detach(), x.grad, w.grad


def run_op(hidden, weight, targets, tau, g, h, **kw):
    x = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logp, ent = linear_logprob(x, w, targets, tau, True, **kw)
    ((logp * g).sum() + (ent * h).sum()).backward()
    return logp.detach(), ent.detach(), x.grad, w.grad


def assert_close_to_truth(got, truth, out_tol, grad_rel):
    for a, b in zip(got[:2], truth[:2]):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, atol=out_tol, rtol=out_tol)
    for a, b in zip(got[2:], truth[2:]):
        scale = max(b.abs().max().item(), 1e-3)
        torch.testing.assert_close(a.double(), b, atol=grad_rel * scale, rtol=grad_rel)


def _kernels():
    from r1fast.kernels import linear_logprob as K

    return K


# ----------------------------------------------------------------------------- kernels

@pytest.mark.parametrize("T,H,V", [(1, 7, 1), (7, 33, 257), (63, 7, 100)])
@pytest.mark.parametrize("num_splits", [1, 3, 12])
def test_forward_partials_every_element_written(T, H, V, num_splits):
    """12 splits exceed the vocabulary blocks of the small shapes: empty splits must merge to
    nothing (m = -inf, s = S = 0)."""
    K = _kernels()
    hidden, weight, targets, _, _ = make_inputs(T, H, V, n_ignored=T // 3)
    out = tuple(torch.full((num_splits, T), math.nan, device=DEVICE) for _ in range(4))
    got = K.forward_partials(hidden, weight, targets, 1 / 0.7, 0, num_splits=num_splits, out=out)
    assert all(g is o for g, o in zip(got, out))
    assert not any(t.isnan().any() for t in out)
    m, s, sz, zy = merge_partials(torch.stack(out, dim=1)).double()
    z = hidden.double() @ weight.double().T / 0.7  # [T, V]
    lse = torch.logsumexp(z, 1)
    torch.testing.assert_close(m + s.log(), lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sz / s, (torch.softmax(z, 1) * z).sum(1), atol=1e-5, rtol=1e-5)
    valid = targets != IGNORE
    want_zy = z.gather(1, targets.clamp(0)[:, None])[:, 0] * valid
    torch.testing.assert_close(zy * valid, want_zy, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dz_chunk_matches_formula(dtype):
    K = _kernels()
    T, H, V, tau, v0 = 19, 9, 45, 0.8, 20
    hidden, weight, targets, g, h = make_inputs(T, H, V, dtype=dtype)
    z = hidden.double() @ weight.double().T / tau
    lse = torch.logsumexp(z, 1)
    p = torch.softmax(z, 1)
    ent = lse - (p * z).sum(1)
    gd, hd = g.double()[:, None], h.double()[:, None]
    want = -p * (gd + hd * (z - lse[:, None] + ent[:, None]))  # [T, V]
    want[torch.arange(T), targets] += g.double()
    want = (want / tau)[:, v0:]  # the chunk of vocabulary rows [v0, V)
    ws = torch.full((T + 3, V), math.nan, device=DEVICE, dtype=dtype)  # wider than the chunk
    out = ws[:T, : V - v0]
    K.dz_chunk(hidden, weight[v0:], targets, lse.float(), ent.float(), g, h, 1 / tau, v0, out)
    assert not out.isnan().any() and ws[T:].isnan().all()  # writes exactly its rows
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunks", [(64, 1000), (5, 40)])
def test_backward_launcher_poisoned_outputs(dtype, chunks):
    """(5, 40): several token chunks (fp32 dW accumulator) and vocabulary chunks (dx += ...)."""
    K = _kernels()
    T, H, V, tau = 13, 17, 90, 1.3
    hidden, weight, targets, g, h = make_inputs(T, H, V, dtype=dtype, n_ignored=3)
    t_logp, t_ent, t_dx, t_dw = fp64_truth(hidden, weight, targets, tau, g, h)
    z = hidden.double() @ weight.double().T / tau
    lse = torch.logsumexp(z, 1).float()
    ent = (lse.double() - (torch.softmax(z, 1) * z).sum(1)).float()
    valid = targets != IGNORE
    dx = torch.full((T, H), math.nan, device=DEVICE)
    dw = torch.full((V, H), math.nan, device=DEVICE, dtype=dtype)
    K.backward(hidden, weight, targets, lse, ent, g * valid, h * valid, 1 / tau, 0, *chunks,
               grad_hidden=dx, grad_weight=dw)
    assert not dx.isnan().any() and not dw.isnan().any()
    rel = 2e-5 if dtype == torch.float32 else 1.5e-2
    for a, b in ((dx, t_dx), (dw, t_dw)):
        torch.testing.assert_close(a.double(), b, atol=rel * b.abs().max().item(), rtol=rel)


def test_launchers_allocate_no_tokens_times_vocab_tensor():
    """Every tensor the launchers create (outputs, split partials, the dz workspace, the fp32 dW
    accumulator) is bounded by a chunk, the weight or hidden, never by T*V. Measured in bytes:
    the interpreter moves data through byte views of whole storages."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Record(TorchDispatchMode):
        biggest = (0, "")

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    nbytes = t.numel() * t.element_size()
                    Record.biggest = max(Record.biggest, (nbytes, str(func)))
            return out

    K = _kernels()
    T, H, V, ct, cv = 64, 8, 96, 16, 24
    hidden, weight, targets, g, h = make_inputs(T, H, V, dtype=torch.bfloat16)
    lse, ent = torch.zeros(T, device=DEVICE), torch.zeros(T, device=DEVICE)
    runs = 2 if DEVICE.type == "cuda" else 1  # on a GPU, autotune first (its benchmark
    for i in range(runs):                       # allocates a large L2-flush buffer)
        with Record() if i == runs - 1 else contextlib.nullcontext():
            K.forward_partials(hidden, weight, targets, 1.0, 0)
            K.backward(hidden, weight, targets, lse, ent, g, h, 1.0, 0, ct, cv)
    biggest, where = Record.biggest
    # fp32 at most: dz workspace (bf16 here), dW accumulator [V, H], dx [T, H]; logits: 2*T*V
    assert 0 < biggest <= 4 * max(ct * cv, V * H, T * H) < 2 * T * V, (biggest, where)


# ----------------------------------------------------------------------------- the op

@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("T,H,V", [(1, 7, 1), (7, 33, 257), (63, 7, 100)])
@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_fp32_matches_fp64_naive(T, H, V, tau, tiles):
    hidden, weight, targets, g, h = make_inputs(T, H, V, n_ignored=T // 3)
    got = run_op(hidden, weight, targets, tau, g, h, impl="triton", chunk_tokens=32,
                 chunk_vocab=64, tiles=tiles)
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    assert_close_to_truth(got, fp64_truth(hidden, weight, targets, tau, g, h), 2e-5, 2e-5)


def row_temperatures(T, ignored=None, seed=1):
    """[T] per-row temperatures in [0.3, 2.3), 0 (invalid) on ``ignored`` rows: the op must
    not read them."""
    tau = torch.rand(T, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3
    if ignored is not None:
        tau[ignored.cpu()] = 0.0
    return tau.to(DEVICE)


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("T,H,V", [(1, 7, 1), (7, 33, 257), (63, 7, 100)])
def test_per_row_temperature_matches_fp64_naive(T, H, V, tiles):
    """One temperature per row (chunk_tokens=32 splits the 63 rows: each chunk reads its own
    slice of them), every gradient against fp64."""
    hidden, weight, targets, g, h = make_inputs(T, H, V, n_ignored=T // 3)
    tau = row_temperatures(T, ignored=targets == IGNORE)
    got = run_op(hidden, weight, targets, tau, g, h, impl="triton", chunk_tokens=32,
                 chunk_vocab=64, tiles=tiles)
    truth_tau = torch.where(targets == IGNORE, 1.0, tau).double()
    assert_close_to_truth(got, fp64_truth(hidden, weight, targets, truth_tau, g, h), 2e-5, 2e-5)


@pytest.mark.parametrize("tiles", TILES)
def test_per_row_temperature_half_inputs(tiles):
    T, H, V = 21, 33, 70
    hidden, weight, targets, g, h = make_inputs(T, H, V, dtype=torch.bfloat16, n_ignored=4)
    tau = row_temperatures(T, ignored=targets == IGNORE)
    got = run_op(hidden, weight, targets, tau.to(torch.bfloat16), g, h, impl="triton",
                 chunk_tokens=8, chunk_vocab=48, tiles=tiles)
    truth_tau = torch.where(targets == IGNORE, 1.0, tau.to(torch.bfloat16).double())
    eps = torch.finfo(torch.bfloat16).eps
    assert_close_to_truth(got, fp64_truth(hidden, weight, targets, truth_tau, g, h), 2e-5,
                          4 * eps)


@settings(max_examples=5, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.integers(1, 9), H=st.integers(1, 12), V=st.integers(1, 40),
       seed=st.integers(0, 2**16))
def test_each_row_is_its_own_temperature_call(T, H, V, seed):
    """A row's log-prob and entropy under per-row temperatures are those of a call with its
    temperature for every row: rows never mix in the forward, and the one-float path
    multiplies by the same fp32 factor. Bitwise under the interpreter (the same tiles); on a
    GPU the autotuner may give the two kernel variants different tiles (another summation
    order), so there to 1e-6 of the logits' size."""
    hidden, weight, targets, _, _ = make_inputs(T, H, V, seed=seed)
    # powers of two: 1/tau is exact both ways (an fp32 reciprocal of the tensor, an fp64
    # reciprocal of the float rounded to fp32), so both paths multiply by the same factor
    gen = torch.Generator().manual_seed(seed)
    tau = (2.0 ** torch.randint(-2, 3, (T,), generator=gen)).to(DEVICE)  # [T] in 1/4 .. 4
    for tiles in TILES:
        logp, ent = linear_logprob(hidden, weight, targets, tau, True, impl="triton",
                                   tiles=tiles, chunk_vocab=16)
        for t in range(T):
            one_lp, one_ent = linear_logprob(hidden, weight, targets, float(tau[t]), True,
                                             impl="triton", tiles=tiles, chunk_vocab=16)
            # fp32 rounding of the log-sum-exp, whose size is that of the scaled logits:
            # logp = z_y - lse can be near 0 while lse is ~30 (an ulp there is ~2e-6)
            lse = (hidden[t].float() @ weight.float().t()).abs().max() / tau[t]
            tol = 0 if DEVICE.type == "cpu" else 1e-6 * max(1.0, float(lse))
            torch.testing.assert_close(logp[t], one_lp[t], atol=tol, rtol=1e-6 if tol else 0)
            torch.testing.assert_close(ent[t], one_ent[t], atol=tol, rtol=1e-6 if tol else 0)


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype, tiles):
    T, H, V = 21, 33, 70
    hidden, weight, targets, g, h = make_inputs(T, H, V, dtype=dtype, n_ignored=4)
    got = run_op(hidden, weight, targets, 0.9, g, h, impl="triton", chunk_tokens=8,
                 chunk_vocab=48, tiles=tiles)
    assert got[2].dtype == dtype and got[3].dtype == dtype
    # the dz workspace is 16-bit (tensor-core GEMMs): gradients carry ~2 roundings of eps
    eps = torch.finfo(dtype).eps
    assert_close_to_truth(got, fp64_truth(hidden, weight, targets, 0.9, g, h), 2e-5, 4 * eps)


@pytest.mark.parametrize("tiles", TILES)
def test_matches_torch_reference_and_ignore_index_in_vocab(tiles):
    T, H, V = 17, 10, 77
    hidden, weight, targets, g, h = make_inputs(T, H, V)
    targets[[2, 9]] = 5
    kw = dict(ignore_index=5, chunk_tokens=6, chunk_vocab=30)
    tri = run_op(hidden, weight, targets, 1.7, g, h, impl="triton", tiles=tiles, **kw)
    ref = run_op(hidden, weight, targets, 1.7, g, h, impl="torch", **kw)
    assert tri[0][[2, 9]].eq(0).all() and tri[1][[2, 9]].eq(0).all()
    assert tri[2][[2, 9]].eq(0).all()
    for a, b in zip(tri, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("tiles", TILES)
def test_logp_only_frozen_weight_and_default_chunks(tiles):
    T, H, V = 9, 8, 40
    hidden, weight, targets, g, _ = make_inputs(T, H, V, n_ignored=2)
    x = hidden.clone().requires_grad_()
    logp = linear_logprob(x, weight, targets, impl="triton", tiles=tiles)
    (logp * g).sum().backward()
    t_logp, _, t_dx, _ = fp64_truth(hidden, weight, targets, 1.0, g, torch.zeros_like(g))
    torch.testing.assert_close(logp.detach().double(), t_logp, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(x.grad.double(), t_dx, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("tiles", TILES)
def test_empty_batch(tiles):
    hidden, weight, targets, g, h = make_inputs(0, 4, 6)
    logp, ent, dx, dw = run_op(hidden, weight, targets, 1.0, g, h, impl="triton", tiles=tiles)
    assert logp.shape == (0,) and dx.shape == (0, 4) and dw.eq(0).all()


def test_fp64_rejected_for_triton():
    hidden, weight, targets, _, _ = make_inputs(3, 4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="hidden must have dtype in .* for impl='triton'"):
        linear_logprob(hidden, weight, targets, impl="triton")


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.integers(1, 3), H=st.integers(1, 20), V=st.integers(1, 40),
       tau=st.floats(0.3, 3.0), seed=st.integers(0, 2**16))
def test_probabilities_over_the_vocabulary_sum_to_one(T, H, V, tau, seed):
    hidden, weight, _, _, _ = make_inputs(T, H, V, seed=seed)
    rows = hidden.repeat_interleave(V, dim=0)  # [T*V, H]
    ids = torch.arange(V, device=DEVICE).repeat(T)  # [T*V]
    for tiles in TILES:
        logp = linear_logprob(rows, weight, ids, tau, impl="triton", tiles=tiles,
                              chunk_vocab=16).double().view(T, V)
        torch.testing.assert_close(torch.logsumexp(logp, 1),
                                   torch.zeros(T, dtype=torch.float64, device=DEVICE),
                                   atol=1e-5, rtol=0, msg=lambda m, t=tiles: f"{t}: {m}")


# ----------------------------------------------------------------------------- torch.library

def test_opcheck_custom_ops():
    T, H, V = 5, 6, 20
    hidden, weight, targets, g, h = make_inputs(T, H, V, n_ignored=1)
    hidden.requires_grad_()
    weight.requires_grad_()
    ops = torch.ops.r1fast
    rows = torch.linspace(0.5, 2.0, T, device=DEVICE)  # per-row 1/tau
    for tiles, tau_rows in itertools.product(TILES, (None, rows)):
        torch.library.opcheck(ops.linear_logprob,
                              (hidden, weight, targets, 1.25, tau_rows, IGNORE, 4, 8, tiles))
        args = (hidden.detach(), weight.detach(), targets, 1.25, tau_rows, 3, tiles, 4, 8)
        stats = ops.linear_logprob_partials(*args)
        torch.library.opcheck(ops.linear_logprob_partials, args)
        lse = stats[0] + stats[1].log()
        ent = lse - stats[2] / stats[1]
        for need_dw in (True, False):
            torch.library.opcheck(ops.linear_logprob_grads,
                                  (hidden.detach(), weight.detach(), targets, lse, ent, g, h,
                                   1.25, tau_rows, 3, 4, 8, need_dw, tiles))


def test_custom_ops_refuse_row_factors_they_would_misread():
    """The kernels read row t's 1/tau at offset t of an fp32 buffer: the public custom ops
    refuse anything else rather than read the wrong rows or past the end."""
    T, H, V = 5, 6, 20
    hidden, weight, targets, _, _ = make_inputs(T, H, V)
    good = torch.ones(T, device=DEVICE)
    bad = {"stride": (torch.ones(T, 2, device=DEVICE)[:, 0], "must be contiguous"),
           "dtype": (good.to(torch.bfloat16), r"must have dtype in \(float32\)"),
           "length": (good[:-1], r"must have shape \[5\], got \[4\]")}
    for rows, message in bad.values():
        with pytest.raises(ValueError, match="inv_temperature_rows " + message):
            torch.ops.r1fast.linear_logprob(hidden, weight, targets, 1.0, rows, IGNORE, 4, 8,
                                            "fused")


@pytest.mark.parametrize("backend",
                         ["aot_record", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile(backend):
    """The custom ops trace through dynamo + AOTAutograd (fake impls, registered autograd) and
    the compiled forward and backward both call them. Inductor's first C++ build takes ~30 s."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    T, H, V = 6, 8, 24
    hidden, weight, targets, g, h = make_inputs(T, H, V, n_ignored=1)
    seen: set[str] = set()

    def record(gm, _example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm)

    def loss_fn(x, w):
        logp, ent = linear_logprob(x, w, targets, 0.9, True, impl="triton")
        return (logp * g).sum() + (ent * h).sum()

    torch._dynamo.reset()
    be = aot_autograd(fw_compiler=record, bw_compiler=record) if backend == "aot_record" \
        else backend
    compiled = torch.compile(loss_fn, fullgraph=False, backend=be)
    grads = []
    for fn in (loss_fn, compiled):
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(x, w)
        loss.backward()
        grads.append((loss.detach(), x.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    if backend == "aot_record":
        assert "r1fast.linear_logprob.default" in seen, seen
        assert "r1fast.linear_logprob_grads.default" in seen, seen


def test_tiles_are_checked_and_belong_to_the_triton_impl():
    hidden, weight, targets, _, _ = make_inputs(3, 4, 5)
    with pytest.raises(ValueError, match=r"tiles must be one of \('fused', 'gemm'\), got 'cublas'"):
        linear_logprob(hidden, weight, targets, impl="triton", tiles="cublas")
    with pytest.raises(ValueError, match="tiles='gemm' is a way of running impl='triton'"):
        linear_logprob(hidden, weight, targets, impl="torch", tiles="gemm")


@pytest.mark.parametrize("setting", ["medium", "new-api-tf32"])
def test_gemm_tiles_keep_the_callers_precision_setting(setting):
    """The tiles wrote the legacy allow_tf32 flag: after set_float32_matmul_precision("medium")
    that left torch in a mixed state whose getter raised for the rest of the process, and
    after torch.backends.cuda.matmul.fp32_precision = "tf32" reading the flag raised."""
    matmul = torch.backends.cuda.matmul
    before = torch.get_float32_matmul_precision()
    try:
        if setting == "medium":
            torch.set_float32_matmul_precision("medium")
        else:
            matmul.fp32_precision = "tf32"
        hidden, weight, targets, g, h = make_inputs(11, 24, 90, n_ignored=2)
        got = run_op(hidden, weight, targets, 0.8, g, h, impl="triton", tiles="gemm",
                     chunk_tokens=4, chunk_vocab=32)
        assert matmul.fp32_precision == "tf32"
        if setting == "medium":
            assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.backends.fp32_precision = "none"  # out of the new API, then the old setting
        torch.set_float32_matmul_precision(before)
    assert_close_to_truth(got, fp64_truth(hidden, weight, targets, 0.8, g, h), 2e-5, 2e-5)


def test_gemm_tiles_run_fp32_without_tf32_and_leave_the_flag_as_it_was():
    """fp32 GEMM tiles are exact in fp32 whatever the caller's TF32 setting (on a GPU the flag
    would round them to TF32), and the setting is put back afterwards."""
    matmul = torch.backends.cuda.matmul  # a settings object: monkeypatch cannot restore it
    before = matmul.allow_tf32
    matmul.allow_tf32 = True
    try:
        T, H, V = 11, 24, 90
        hidden, weight, targets, g, h = make_inputs(T, H, V, n_ignored=2)
        got = run_op(hidden, weight, targets, 0.8, g, h, impl="triton", tiles="gemm",
                     chunk_tokens=4, chunk_vocab=32)
        assert matmul.allow_tf32 is True
    finally:
        matmul.allow_tf32 = before
    assert_close_to_truth(got, fp64_truth(hidden, weight, targets, 0.8, g, h), 2e-5, 2e-5)
