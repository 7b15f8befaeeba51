"""Tests of the Triton path of MoE routing (``r1fast.kernels.moe_route`` and its custom ops).

Without a GPU these run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so T is tiny and the grid of (E, k, score, groups, bias, replay) is a representative cut, not the
full product; on a GPU the same tests run natively. The case bodies
(``check_*``, shared with the CUDA tests) live in tests/helpers/moe_route_cases.py.
"""
from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r1fast.ops._dispatch import triton_missing
from r1fast.ops.moe_route import moe_route
from tests.helpers.moe_route_cases import (
    DEVICE,
    GRID,
    NAN_ROUTES,
    check_aux_scores,
    check_deterministic,
    check_half_precision,
    check_launchers_write_every_output,
    check_matches_naive,
    check_nan_logits,
    check_replay,
    check_ties,
    check_weights_sum,
)

pytestmark = pytest.mark.skipif(triton_missing(DEVICE) is not None,
                                reason=str(triton_missing(DEVICE)))


@pytest.mark.parametrize("case", GRID)
def test_triton_matches_fp64_naive(case):
    check_matches_naive(case, "triton")


@pytest.mark.parametrize("case", GRID[1::3])
def test_triton_replay(case):
    check_replay(case, "triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("score,pre", [("softmax", False), ("softmax", True), ("sigmoid", False)])
def test_triton_half_precision_logits(dtype, score, pre):
    check_half_precision(dtype, score, pre, "triton")


def test_launchers_write_every_output():
    from r1fast.kernels import moe_route as kernels

    check_launchers_write_every_output(kernels)


def test_triton_bitwise_deterministic():
    check_deterministic("triton")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(1, 5), E=st.sampled_from([4, 8]), k=st.integers(1, 3),
       score=st.sampled_from(["softmax", "sigmoid"]), pre=st.booleans(),
       grouped=st.booleans(), seed=st.integers(0, 2**16))
def test_triton_ties_match_naive(T, E, k, score, pre, grouped, seed):
    check_ties(T, E, k, score, pre, grouped, seed, "triton")


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(1, 6), k=st.integers(1, 4), scaling=st.floats(0.25, 4.0),
       score=st.sampled_from(["softmax", "sigmoid"]), pre=st.booleans(),
       seed=st.integers(0, 2**16))
def test_triton_normalised_weights_sum_to_scaling(T, k, scaling, score, pre, seed):
    check_weights_sum(T, k, scaling, score, pre, seed, "triton")


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("T,E,k", [(7, 8, 2), (33, 64, 8)])
def test_triton_aux_scores(score, T, E, k):
    check_aux_scores(score, T, E, k, "triton")


def test_custom_ops_pass_opcheck():
    """Schema, fake-tensor and autograd registrations of the fast-path ops are consistent
    (what torch.compile relies on)."""
    # importlib: r1fast.ops re-exports the function moe_route under the submodule's name
    M = importlib.import_module("r1fast.ops.moe_route")

    logits = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    bias = torch.randn(8, device=DEVICE)
    torch.library.opcheck(M._route_fwd_op, (logits, bias, None, 2, 2, 4, 2, 1, 2.5, True, "triton"),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
    torch.library.opcheck(M._aux_fwd_op, (logits, 2, False, "triton"),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


def test_auto_picks_a_fast_path_on_gpu():
    if DEVICE.type != "cuda":
        pytest.skip("auto uses the torch path on a CPU")
    logits = torch.randn(16, 64, device=DEVICE)
    ref = moe_route(logits, 8, impl="torch")
    got = moe_route(logits, 8)
    assert torch.equal(ref.indices, got.indices)


@pytest.mark.parametrize("kw", NAN_ROUTES)
def test_nan_logits_still_pick_distinct_experts(kw):
    check_nan_logits(kw, "triton")
