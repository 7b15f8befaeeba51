"""Tests of MoE token permutation (``moe_permute`` / ``moe_unpermute``) on the torch reference
and the Triton kernels (interpreter on a CPU, native on a GPU): forward and every gradient
against the fp64 loop formulas, megatron-core's permute/unpermute, properties (identity for
k=1 with unit weights, expert-contiguous stable order), bitwise determinism, poisoned outputs
and bad inputs. CUDA kernels are held to the same checks in test_moe_cuda.py; the shared case
bodies live in tests/helpers/moe_permute_cases.py."""
from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r1fast.ops._dispatch import triton_missing
from r1fast.ops.moe_permute import moe_permute, moe_permute_rows, moe_unpermute
from tests.helpers.moe_permute_cases import (
    DEVICE,
    check_deterministic,
    check_half_precision_rows,
    check_launchers_write_every_output,
    check_matches_fp64_loops,
    check_repeated_expert_stable_order,
)

NO_TRITON = triton_missing(DEVICE)
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    NO_TRITON is not None, reason=str(NO_TRITON)))]
needs_triton = pytest.mark.skipif(NO_TRITON is not None, reason=str(NO_TRITON))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,k,E,H", [(1, 1, 4, 1), (7, 2, 8, 63), (7, 4, 16, 257),
                                     (7, 8, 8, 33), (33, 1, 8, 7)])
def test_matches_fp64_loops(impl, T, k, E, H):
    check_matches_fp64_loops(impl, T, k, E, H)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rows(impl, dtype):
    check_half_precision_rows(impl, dtype)


def test_order_matches_megatron_core():
    """Expert-contiguous, by token within an expert: Megatron's permute rows, and its
    unpermute (with routing probs) gives the same combine."""
    from megatron.core.transformer.moe.moe_utils import permute, unpermute

    from r1fast.ops.moe_route import moe_route, routing_to_dense

    T, E, k, H = 33, 8, 2, 16
    x = torch.randn(T, H)
    routing = moe_route(torch.randn(T, E), k, score="sigmoid", impl="torch")
    probs, rmap = routing_to_dense(routing.weights, routing.indices, E)
    mperm, _, sorted_idx = permute(x, rmap, num_out_tokens=T * k)
    perm, row_map, counts = moe_permute(x, routing.indices, E, impl="torch")
    assert torch.equal(perm, mperm)
    assert torch.equal(counts, rmap.sum(0))
    y = torch.randn(T * k, H)
    mout = unpermute(y, sorted_idx, x.shape, probs=probs, routing_map=rmap)
    torch.testing.assert_close(moe_unpermute(y, row_map, routing.weights, impl="torch"), mout)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(1, 12), E=st.integers(1, 6), H=st.integers(1, 9),
       impl=st.sampled_from(["torch", "triton"] if NO_TRITON is None else ["torch"]),
       seed=st.integers(0, 2**16))
def test_property_k1_unit_weights_is_identity(T, E, H, impl, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(DEVICE)
    idx = torch.randint(0, E, (T, 1), generator=g).to(DEVICE)
    perm, row_map, counts = moe_permute(x, idx, E, impl=impl)
    back = moe_unpermute(perm, row_map, torch.ones(T, 1, device=DEVICE), impl=impl)
    assert torch.equal(back, x)
    # expert-contiguous and stable: experts ascend, tokens ascend within an expert
    src = torch.empty(T, dtype=torch.int64, device=DEVICE)
    src[row_map[:, 0]] = torch.arange(T, device=DEVICE)
    keys = (idx[src, 0] * T + src).tolist()
    assert keys == sorted(keys) and int(counts.sum()) == T


@pytest.mark.parametrize("impl", IMPLS)
def test_repeated_expert_in_a_row_and_stable_slot_order(impl):
    check_repeated_expert_stable_order(impl)


@needs_triton
def test_triton_bitwise_deterministic():
    check_deterministic("triton")


@needs_triton
def test_launchers_write_every_output():
    from r1fast.kernels import moe_permute as kernels

    check_launchers_write_every_output(kernels, 300)


@needs_triton
def test_custom_ops_pass_opcheck():
    M = importlib.import_module("r1fast.ops.moe_permute")
    x = torch.randn(5, 7, device=DEVICE, requires_grad=True)
    row_map = torch.randperm(10, device=DEVICE).view(5, 2)
    w = torch.rand(5, 2, device=DEVICE, requires_grad=True)
    y = torch.randn(10, 7, device=DEVICE, requires_grad=True)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(M._permute_rows_op, (x, row_map, "triton"), test_utils=utils)
    torch.library.opcheck(M._combine_rows_op, (y, row_map, w, "triton"), test_utils=utils)
    torch.library.opcheck(M._combine_rows_op, (y, row_map, None, "triton"), test_utils=utils)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,k,H", [(1, 1, 1), (7, 3, 63), (33, 2, 257), (0, 2, 5)])
def test_permute_rows_by_any_row_map_matches_fp64(impl, T, k, H):
    """``moe_permute_rows`` takes any permutation as the row map (not only an expert-sorted
    one): ``out[row_map[t, j]] = x[t]`` exactly, and ``dx[t] = sum_j dout[row_map[t, j]]``
    against an fp64 loop."""
    g = torch.Generator().manual_seed(T * 31 + k)
    x = torch.randn(T, H, generator=g).to(DEVICE).requires_grad_(True)
    row_map = torch.randperm(T * k, generator=g).view(T, k).to(DEVICE)
    out = moe_permute_rows(x, row_map, impl=impl)
    assert out.shape == (T * k, H)
    for t in range(T):
        for j in range(k):
            assert torch.equal(out[row_map[t, j]], x[t].detach())
    dout = torch.randn(T * k, H, generator=g).to(DEVICE)
    out.backward(dout)
    exact = torch.stack([sum(dout[row_map[t, j]].double() for j in range(k)) for t in range(T)]) \
        if T else torch.zeros(0, H, dtype=torch.float64)
    torch.testing.assert_close(x.grad.double(), exact.to(DEVICE), rtol=1e-6, atol=1e-6)


BAD_PERMUTE_ROWS = [
    (dict(x=torch.randn(8)), "x must be 2-D"),
    (dict(row_map=torch.randperm(10).view(5, 2)), r"row_map must have shape \[4, k\]"),
    (dict(row_map=torch.zeros(4, 2, dtype=torch.int64)), "row_map must be a permutation"),
    (dict(row_map=torch.zeros(4, 2)), "row_map must have dtype"),
]


@pytest.mark.parametrize("kwargs,match", BAD_PERMUTE_ROWS, ids=[m for _, m in BAD_PERMUTE_ROWS])
def test_bad_permute_rows_input(kwargs, match, monkeypatch):
    monkeypatch.setenv("R1FAST_DEBUG_CHECKS", "1")  # the permutation check is debug-only
    kw = {"x": X, "row_map": torch.randperm(8).view(4, 2), **kwargs}
    with pytest.raises(ValueError, match=match):
        moe_permute_rows(kw.pop("x"), kw.pop("row_map"))


def test_empty_batch():
    perm, row_map, counts = moe_permute(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.int64),
                                        3, impl="torch")
    assert perm.shape == (0, 4) and counts.tolist() == [0, 0, 0]
    assert moe_unpermute(perm, row_map, torch.zeros(0, 2), impl="torch").shape == (0, 4)


X = torch.randn(4, 8)
IDX = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]])
BAD_PERMUTE = [
    (dict(x=torch.randn(8)), "x must be 2-D"),
    (dict(x=torch.zeros(4, 8, dtype=torch.int32)), "x must have dtype"),
    (dict(indices=torch.zeros(4, 2)), "indices must have dtype"),
    (dict(indices=torch.zeros(5, 2, dtype=torch.int64)), r"indices must have shape \[4, k\]"),
    (dict(indices=torch.zeros(4, 0, dtype=torch.int64)), "at least one slot"),
    (dict(indices=IDX * 0 - 1), r"expert ids in \[0, 4\)"),
    (dict(num_experts=3), r"expert ids in \[0, 3\)"),
    (dict(num_experts=0), "num_experts must be a positive int"),
    (dict(impl="gpu"), "impl must be one of"),
    (dict(x=torch.randn(4, 8, dtype=torch.float64), impl="triton"),
     "takes float32, bfloat16 or float16 rows"),
]


@pytest.mark.parametrize("kwargs,match", BAD_PERMUTE, ids=[m for _, m in BAD_PERMUTE])
def test_bad_permute_input(kwargs, match, monkeypatch):
    monkeypatch.setenv("R1FAST_DEBUG_CHECKS", "1")  # the ids' range check is debug-only
    kw = {"x": X, "indices": IDX, "num_experts": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        moe_permute(kw.pop("x"), kw.pop("indices"), kw.pop("num_experts"), **kw)


Y = torch.randn(8, 5)
RM = torch.randperm(8).view(4, 2)
BAD_UNPERMUTE = [
    (dict(y=torch.randn(8)), "y must be 2-D"),
    (dict(y=torch.randn(9, 5)), "row_map must have T\\*k = 9 entries"),
    (dict(row_map=torch.zeros(4, 2)), "row_map must have dtype"),
    (dict(row_map=torch.zeros(4, 2, dtype=torch.int64)), "row_map must be a permutation"),
    (dict(row_map=RM + 1), "row_map must be a permutation"),
    (dict(weights=torch.rand(2, 4)), r"weights must have shape \[4, 2\]"),
    (dict(weights=torch.ones(4, 2, dtype=torch.int64)), "weights must have dtype"),
    (dict(impl="cuda"), "impl='cuda'" if torch.cuda.is_available() else "CUDA tensors"),
]


@pytest.mark.parametrize("kwargs,match", BAD_UNPERMUTE, ids=[m for _, m in BAD_UNPERMUTE])
def test_bad_unpermute_input(kwargs, match, monkeypatch):
    monkeypatch.setenv("R1FAST_DEBUG_CHECKS", "1")  # the permutation check is debug-only
    if kwargs.get("impl") == "cuda" and torch.cuda.is_available():
        pytest.skip("impl='cuda' is a valid choice on a GPU")
    kw = {"y": Y, "row_map": RM, "weights": torch.rand(4, 2), **kwargs}
    with pytest.raises((ValueError, RuntimeError), match=match):
        moe_unpermute(kw.pop("y"), kw.pop("row_map"), kw.pop("weights"), **kw)
