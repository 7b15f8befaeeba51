"""Tests of the CUDA kernels of MoE routing and permutation (csrc/moe_route.cu), GPU only.

The checks are the very ones the Triton path passes (the case bodies of
tests/helpers/moe_route_cases.py and tests/helpers/moe_permute_cases.py), run with
``impl="cuda"`` and the CUDA launcher wrappers, plus what is specific to the CUDA kernels:
the E <= 512 / k <= 16 / n_groups <= 64 limits (groups >= 32 use the second register of group
scores), the vectorised and scalar row paths, and agreement with the Triton kernels. Without a CUDA device the module is skipped; with one, an extension that
fails to build fails the tests (it is not skipped).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import moe_permute_cases as P
from tests.helpers import moe_route_cases as R

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module", autouse=True)
def _extension_builds():
    from r1fast.ops import _cuda_ext

    for op in ("moe_route", "moe_aux_scores", "moe_permute", "moe_unpermute"):
        assert _cuda_ext.missing(op) is None, _cuda_ext.missing(op)


@pytest.mark.parametrize("case", R.GRID)
def test_cuda_matches_fp64_naive(case):
    R.check_matches_naive(case, "cuda")


@pytest.mark.parametrize("case", R.GRID[1::3])
def test_cuda_replay(case):
    R.check_replay(case, "cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("score,pre", [("softmax", False), ("softmax", True), ("sigmoid", False)])
def test_cuda_half_precision_logits(dtype, score, pre):
    R.check_half_precision(dtype, score, pre, "cuda")


def test_cuda_route_launchers_write_every_output():
    from r1fast.ops.moe_route import _CudaRoute

    R.check_launchers_write_every_output(_CudaRoute)


def test_cuda_route_bitwise_deterministic():
    R.check_deterministic("cuda")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(1, 5), E=st.sampled_from([4, 8]), k=st.integers(1, 3),
       score=st.sampled_from(["softmax", "sigmoid"]), pre=st.booleans(),
       grouped=st.booleans(), seed=st.integers(0, 2**16))
def test_cuda_ties_match_naive(T, E, k, score, pre, grouped, seed):
    R.check_ties(T, E, k, score, pre, grouped, seed, "cuda")


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 6), k=st.integers(1, 4), scaling=st.floats(0.25, 4.0),
       score=st.sampled_from(["softmax", "sigmoid"]), pre=st.booleans(),
       seed=st.integers(0, 2**16))
def test_cuda_normalised_weights_sum_to_scaling(T, k, scaling, score, pre, seed):
    R.check_weights_sum(T, k, scaling, score, pre, seed, "cuda")


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("T,E,k", [(7, 8, 2), (33, 64, 8), (257, 512, 16)])
def test_cuda_aux_scores(score, T, E, k):
    R.check_aux_scores(score, T, E, k, "cuda")


@pytest.mark.parametrize("case", [
    (63, 512, 16, "sigmoid", False, (64, 16), True, None),  # 64 groups: both score registers
    (257, 512, 16, "softmax", True, None, True, True),
    (33, 160, 6, "softmax", False, (8, 3), False, None),  # E not a power of two (DeepSeek-V2)
    (1, 1, 1, "softmax", True, None, False, None),
])
def test_cuda_limits_and_odd_shapes(case):
    R.check_matches_naive(case, "cuda")


def test_cuda_limits_fall_back_or_raise():
    from r1fast.ops.moe_route import moe_route

    logits = torch.randn(5, 520, device="cuda")
    got = moe_route(logits, 2)  # auto: CUDA cannot take E=520, Triton does
    assert torch.equal(got.indices, moe_route(logits, 2, impl="torch").indices)
    with pytest.raises(ValueError, match="supports at most 512 experts"):
        moe_route(logits, 2, impl="cuda")
    with pytest.raises(ValueError, match="supports topk <= 16"):
        moe_route(torch.randn(5, 64, device="cuda"), 17, impl="cuda")


def test_cuda_agrees_with_triton_at_scale():
    """Same choices up to ties: CUDA computes the sigmoid with IEEE ``expf``, Triton with
    ``ex2.approx``, so near-tied experts (or groups) may be exchanged in a few of the 4096
    rows; a row may differ only where its keys tie (``rows_agree_up_to_ties``), and every row
    that chose the same experts must have the same weights and gradients."""
    from r1fast.ops.moe_route import moe_route

    logits = torch.randn(4096, 256, device="cuda", requires_grad=True)
    bias = torch.randn(256, device="cuda") * 0.01
    kw = dict(score="sigmoid", n_groups=8, topk_groups=4, expert_bias=bias, scaling_factor=2.5)
    out = {}
    for impl in ("cuda", "triton"):
        r = moe_route(logits, 8, impl=impl, **kw)
        (g,) = torch.autograd.grad((r.weights * torch.arange(8.0, device="cuda")).sum(), logits)
        out[impl] = (r, g)
    (rc, gc), (rt, gt) = out["cuda"], out["triton"]
    key = R.selection_key(logits, "sigmoid", bias)
    same = R.rows_agree_up_to_ties(rc.indices, rt.indices, key, topk=8, groups=(8, 4))
    assert int((~same).sum()) <= 8, f"{int((~same).sum())} rows differ: more than ties explain"
    for r in (rc, rt):  # each implementation's counts match its own choices
        want = torch.bincount(r.indices.reshape(-1), minlength=256)
        assert torch.equal(r.tokens_per_expert, want)
    rows = same.cuda()
    assert torch.equal(rc.indices[rows], rt.indices[rows])
    torch.testing.assert_close(rc.weights[rows], rt.weights[rows], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gc[rows], gt[rows], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kw", R.NAN_ROUTES)
def test_cuda_nan_logits_still_pick_distinct_experts(kw):
    """The warp argmax orders NaN above every number: a total order, so every lane agrees on
    each winner (with ``k1 > k2`` alone an expert could be picked twice in a row)."""
    R.check_nan_logits(kw, "cuda")


# ----------------------------------------------------------------------------- permutation

@pytest.mark.parametrize("T,k,E,H", [(1, 1, 4, 1), (7, 2, 8, 63), (33, 8, 64, 257),
                                     (33, 8, 64, 256), (257, 16, 64, 4096)])
def test_cuda_permute_matches_fp64_loops(T, k, E, H):
    if T * k * E > 20000:  # the loop truth is slow; compare with the torch reference instead
        x, idx, w, ys, dout = P.make(T, k, E, H)
        got = P.pipeline(x, idx, w, ys, dout, E, "cuda")
        want = P.pipeline(x, idx, w, ys, dout, E, "torch")
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-5)
        return
    P.check_matches_fp64_loops("cuda", T, k, E, H)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_permute_half_precision(dtype):
    P.check_half_precision_rows("cuda", dtype)


@pytest.mark.parametrize("H", [63, 64, 300, 7168])  # scalar and 16-byte vector paths
def test_cuda_permute_launchers_write_every_output(H):
    from r1fast.ops.moe_permute import _CudaPermute

    P.check_launchers_write_every_output(_CudaPermute, H)


def test_cuda_permute_bitwise_deterministic():
    P.check_deterministic("cuda")


def test_cuda_permute_stable_order():
    P.check_repeated_expert_stable_order("cuda")


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 40), E=st.integers(1, 6), H=st.integers(1, 70),
       seed=st.integers(0, 2**16))
def test_cuda_k1_unit_weights_is_identity(T, E, H, seed):
    from r1fast.ops.moe_permute import moe_permute, moe_unpermute

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).cuda()
    idx = torch.randint(0, E, (T, 1), generator=g).cuda()
    perm, row_map, _ = moe_permute(x, idx, E, impl="cuda")
    assert torch.equal(moe_unpermute(perm, row_map, torch.ones(T, 1, device="cuda"),
                                     impl="cuda"), x)
