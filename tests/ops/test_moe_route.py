"""Tests of MoE routing semantics on the torch reference path (``impl="torch"``): against the
independent fp64 per-token formula (``naive_moe_route``), against megatron-core's own router
functions, properties (hypothesis), replay, ties, the aux/z losses and every bad input.
The Triton and CUDA paths are held to the same truth in test_moe_route_triton.py and
test_moe_cuda.py."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r1fast.ops._dispatch import ImplUnavailableError
from r1fast.ops.moe_route import (
    MoERouteConfig,
    moe_aux_scores,
    moe_route,
    naive_moe_aux_scores,
    naive_moe_route,
    routing_to_dense,
)
from r1fast.ops.moe_losses import moe_aux_loss
from tests.helpers.moe_route_cases import NAN_ROUTES, check_nan_logits

# (score, pre_softmax, groups, normalize): every branch of the rule
CONFIGS = [
    ("softmax", False, None, None),
    ("softmax", True, None, None),
    ("softmax", True, None, True),
    ("sigmoid", False, None, None),
    ("sigmoid", False, (4, 2), None),
    ("softmax", False, (4, 2), None),
    ("softmax", True, (8, 4), None),
    ("softmax", True, (8, 3, 1), None),  # DeepSeek-V2's group_limited_greedy
    ("sigmoid", False, (4, 2, 3), None),
]


def route_kwargs(score, pre, groups, normalize, k, bias=None, scaling=1.0):
    kw = dict(score=score, pre_softmax=pre, normalize=normalize, scaling_factor=scaling,
              expert_bias=bias)
    if groups is not None:
        kw.update(n_groups=groups[0], topk_groups=groups[1])
        if len(groups) > 2:
            kw["group_score_topk"] = groups[2]
    return kw


def check_against_naive(logits, k, kw, grad_tol=1e-6, impl="torch"):
    x = logits.detach().clone().requires_grad_()
    got = moe_route(x, k, impl=impl, **kw)
    g = torch.randn(got.weights.shape, generator=torch.Generator().manual_seed(7))
    (got.weights * g.to(got.weights.device)).sum().backward()
    xr = logits.detach().cpu().double().requires_grad_()
    naive_kw = {**kw}
    if naive_kw.get("expert_bias") is not None:
        naive_kw["expert_bias"] = naive_kw["expert_bias"].cpu()
    if naive_kw.get("replay_indices") is not None:
        naive_kw["replay_indices"] = naive_kw["replay_indices"].cpu()
    want = naive_moe_route(xr, k, **naive_kw)
    (want.weights * g.double()).sum().backward()
    assert got.weights.dtype == torch.float32 and got.indices.dtype == torch.int64
    assert torch.equal(got.indices.cpu(), want.indices)
    assert torch.equal(got.tokens_per_expert.cpu(), want.tokens_per_expert)
    torch.testing.assert_close(got.weights.detach().cpu().double(), want.weights.detach(),
                               atol=1e-6, rtol=1e-5)
    scale = max(xr.grad.abs().max().item(), 1e-3)
    torch.testing.assert_close(x.grad.cpu().double(), xr.grad, atol=grad_tol * scale,
                               rtol=grad_tol * 10)
    return got


@pytest.mark.parametrize("score,pre,groups,normalize", CONFIGS)
@pytest.mark.parametrize("T,E,k", [(1, 8, 1), (7, 8, 2), (7, 64, 8), (33, 64, 2)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_matches_naive(score, pre, groups, normalize, T, E, k, with_bias):
    if groups is not None:  # fit the group rule to this (E, k): kg <= k, k <= kg * E/G
        G = min(groups[0], E)
        kg = min(groups[1], k, G)
        m = tuple(min(x, E // G) for x in groups[2:])  # a group's score: <= its experts
        groups = (G, kg, *m) if k <= kg * (E // G) else None
    logits = torch.randn(T, E) * 2
    bias = torch.randn(E) * 0.05 if with_bias else None
    check_against_naive(logits, k, route_kwargs(score, pre, groups, normalize, k, bias, 2.5))


@pytest.mark.parametrize("score,pre,groups,normalize", CONFIGS[:5])
def test_reference_gradcheck_fp64(score, pre, groups, normalize):
    logits = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    kw = route_kwargs(score, pre, groups, normalize, 2, scaling=1.5)
    assert torch.autograd.gradcheck(lambda l: moe_route(l, 2, impl="torch", **kw).weights,
                                    (logits,))


@pytest.mark.parametrize("score,pre,groups,bias", [
    ("softmax", False, None, False), ("softmax", True, None, False),
    ("sigmoid", False, None, True), ("sigmoid", False, (8, 4), True),
    ("softmax", True, (4, 2), False),
])
def test_matches_megatron_core(score, pre, groups, bias):
    """Same probs and routing map as megatron-core 0.16's unfused router (it takes the bias
    with sigmoid only; its top-k tie order is unspecified, random logits have no ties)."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    T, E, k = 33, 64, 8
    logits = torch.randn(T, E)
    b = torch.randn(E) * 0.05 if bias else None
    ng, kg = groups if groups else (None, None)
    probs, rmap = topk_routing_with_score_function(
        logits, k, use_pre_softmax=pre, num_groups=ng, group_topk=kg, scaling_factor=2.5,
        score_function=score, expert_bias=b)
    got = moe_route(logits, k, score=score, pre_softmax=pre, n_groups=ng, topk_groups=kg,
                    expert_bias=b, scaling_factor=2.5, impl="torch")
    my_probs, my_map = routing_to_dense(got.weights, got.indices, E)
    assert torch.equal(my_map, rmap)
    torch.testing.assert_close(my_probs, probs.float(), atol=1e-6, rtol=1e-5)
    assert torch.equal(got.tokens_per_expert, rmap.sum(0))


def test_replay_recomputes_weights_from_current_logits():
    T, E, k = 7, 16, 2
    logits = torch.randn(T, E)
    first = moe_route(logits, k, score="sigmoid", impl="torch")
    again = moe_route(logits, k, score="sigmoid", replay_indices=first.indices, impl="torch")
    assert torch.equal(again.indices, first.indices)
    torch.testing.assert_close(again.weights, first.weights, atol=0, rtol=0)
    # New logits, old choices: weights follow the new logits at the replayed experts, and the
    # counts are those of the replayed indices, not of a fresh top-k.
    new = torch.randn(T, E)
    replay = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    got = check_against_naive(new, k, dict(score="sigmoid", replay_indices=replay))
    assert torch.equal(got.tokens_per_expert, torch.bincount(replay.reshape(-1), minlength=E))


def test_replay_accepts_int32_and_ignores_bias_and_groups():
    logits = torch.randn(7, 16)
    replay = torch.stack([torch.randperm(16)[:4] for _ in range(7)]).to(torch.int32)
    got = moe_route(logits, 4, score="sigmoid", n_groups=4, topk_groups=2,
                    expert_bias=torch.full((16,), 5.0), replay_indices=replay, impl="torch")
    assert torch.equal(got.indices, replay.long())


@pytest.mark.parametrize("score,pre", [("softmax", False), ("softmax", True), ("sigmoid", False)])
def test_ties_break_to_lowest_index(score, pre):
    # Every logit equal: the chosen experts must be 0..k-1 in order.
    got = moe_route(torch.zeros(3, 8), 3, score=score, pre_softmax=pre, impl="torch")
    assert got.indices.tolist() == [[0, 1, 2]] * 3
    # Equal groups too: with 4 groups of equal scores, groups 0 and 1 win.
    got = moe_route(torch.zeros(2, 16), 4, score=score, pre_softmax=pre, n_groups=4,
                    topk_groups=2, impl="torch")
    assert got.indices.tolist() == [[0, 1, 2, 3]] * 2
    # Two tied maxima among distinct values: the lower index comes first.
    l = torch.tensor([[0.0, 3.0, 1.0, 3.0, 2.0]])
    assert moe_route(l, 2, score=score, pre_softmax=pre, impl="torch").indices.tolist() == [[1, 3]]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(1, 9), E=st.sampled_from([4, 8, 12]), k=st.integers(1, 4),
       score=st.sampled_from(["softmax", "sigmoid"]), pre=st.booleans(),
       scaling=st.floats(0.1, 4.0), seed=st.integers(0, 2**16))
def test_property_normalised_weights_sum_to_scaling(T, E, k, score, pre, scaling, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) * 3
    got = moe_route(logits, k, score=score, pre_softmax=pre, normalize=True,
                    scaling_factor=scaling, impl="torch")
    torch.testing.assert_close(got.weights.sum(-1), torch.full((T,), scaling), atol=1e-5,
                               rtol=1e-5)
    assert bool((got.weights >= 0).all())
    assert all(len(set(r)) == k for r in got.indices.tolist())
    assert int(got.tokens_per_expert.sum()) == T * k


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 6), E=st.sampled_from([4, 8]), k=st.integers(1, 3),
       score=st.sampled_from(["softmax", "sigmoid"]), pre=st.booleans(),
       seed=st.integers(0, 2**16))
def test_property_ties_on_integer_logits(T, E, k, score, pre, seed):
    """Integer logits in a tiny range make ties common: the reference must equal the naive
    formula's (-key, index) order exactly."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(-2, 3, (T, E), generator=g).float()
    got = moe_route(logits, k, score=score, pre_softmax=pre, impl="torch")
    want = naive_moe_route(logits, k, score=score, pre_softmax=pre)
    assert torch.equal(got.indices, want.indices)


def test_default_normalize_follows_megatron():
    assert MoERouteConfig(topk=2, score="sigmoid").normalize_resolved
    assert not MoERouteConfig(topk=1, score="sigmoid").normalize_resolved
    assert not MoERouteConfig(topk=2, score="softmax", pre_softmax=True).normalize_resolved
    w = moe_route(torch.randn(5, 8), 1, score="sigmoid", impl="torch").weights
    assert bool((w < 1).all())  # k=1 sigmoid keeps the raw score


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_aux_scores_and_loss_match_naive_and_megatron(score):
    from megatron.core.transformer.moe.moe_utils import (
        compute_routing_scores_for_aux_loss,
        switch_load_balancing_loss_func,
    )

    T, E, k = 33, 16, 4
    logits = torch.randn(T, E, requires_grad=True)
    p, counts = moe_aux_scores(logits, k, score=score, impl="torch")
    xr = logits.detach().double().requires_grad_()
    p_naive, c_naive = naive_moe_aux_scores(xr, k, score)
    torch.testing.assert_close(p.double(), p_naive, atol=1e-6, rtol=1e-5)
    assert torch.equal(counts, c_naive)
    loss = moe_aux_loss(p, counts, k, 0.01)
    naive = 0.01 * E / (k * T * T) * sum(float(c_naive[e]) * p_naive[:, e].sum()
                                         for e in range(E))
    torch.testing.assert_close(loss.double(), naive, atol=1e-9, rtol=1e-5)
    loss.backward()
    naive.backward()
    torch.testing.assert_close(logits.grad.double(), xr.grad, atol=1e-8, rtol=1e-4)
    rmap, scores = compute_routing_scores_for_aux_loss(logits.detach(), k, score)
    mega = switch_load_balancing_loss_func(scores, rmap.sum(0), T, k, E, 0.01)
    torch.testing.assert_close(loss.detach(), mega.float(), atol=1e-7, rtol=1e-5)


def test_bf16_logits_compute_in_fp32():
    logits = torch.randn(7, 16)
    got = moe_route(logits.bfloat16(), 2, score="sigmoid", impl="torch")
    want = naive_moe_route(logits.bfloat16(), 2, score="sigmoid")
    assert got.weights.dtype == torch.float32
    torch.testing.assert_close(got.weights.double(), want.weights, atol=1e-6, rtol=1e-5)


def test_empty_batch():
    got = moe_route(torch.zeros(0, 8), 2, impl="torch")
    assert got.weights.shape == (0, 2) and got.tokens_per_expert.tolist() == [0] * 8


def test_auto_is_torch_on_cpu_and_cuda_names_what_is_missing():
    logits = torch.randn(3, 8)
    torch.testing.assert_close(moe_route(logits, 2).weights,
                               moe_route(logits, 2, impl="torch").weights, atol=0, rtol=0)
    if not torch.cuda.is_available():
        with pytest.raises(ImplUnavailableError, match="CUDA tensors"):
            moe_route(logits, 2, impl="cuda")


L = torch.randn(4, 8)
BAD_ROUTE = [
    (dict(logits=torch.randn(8)), "logits must be 2-D"),
    (dict(logits=torch.zeros(4, 8, dtype=torch.int64)), "logits must have dtype"),
    (dict(logits=torch.zeros(4, 0)), "at least one expert"),
    (dict(topk=0), r"topk must be in \[1, 8\]"),
    (dict(topk=9), r"topk must be in \[1, 8\]"),
    (dict(topk=2.0), "topk must be an int"),
    (dict(score="relu"), "score must be one of"),
    (dict(n_groups=4), "n_groups and topk_groups must be given together"),
    (dict(n_groups=3, topk_groups=1), "n_groups must divide the number of experts 8"),
    (dict(n_groups=4, topk_groups=3), r"topk_groups must be in \[1, 2\]"),
    (dict(topk=4, n_groups=4, topk_groups=1), r"topk=4 must be <= topk_groups\*experts_per_group"),
    (dict(n_groups=4, topk_groups=2, group_score_topk=3), r"group_score_topk must be in \[1, 2\]"),
    (dict(group_score_topk=1), "group_score_topk needs group-limited routing"),
    (dict(expert_bias=torch.zeros(7)), r"expert_bias must have shape \[8\]"),
    (dict(expert_bias=torch.zeros(8, dtype=torch.float64)), "expert_bias must have dtype"),
    (dict(scaling_factor=0.0), r"scaling_factor must be in \(0.0, inf\]"),
    (dict(normalize="yes"), "normalize must be None or a bool"),
    (dict(replay_indices=torch.zeros(4, 3, dtype=torch.int64)),
     r"replay_indices must have shape \[4, 2\]"),
    (dict(replay_indices=torch.zeros(4, 2)), "replay_indices must have dtype"),
    (dict(replay_indices=torch.tensor([[0, 8]] * 4)), r"expert ids in \[0, 8\)"),
    (dict(replay_indices=torch.tensor([[1, 1]] * 4)), "k distinct experts"),
    (dict(impl="fast"), "impl must be one of"),
    (dict(logits=torch.randn(4, 8, dtype=torch.float64), impl="triton"),
     "takes logits of dtype float32, bfloat16 or float16"),
]


@pytest.mark.parametrize("kwargs,match", BAD_ROUTE, ids=[m for _, m in BAD_ROUTE])
def test_bad_route_input(kwargs, match, monkeypatch):
    monkeypatch.setenv("R1FAST_DEBUG_CHECKS", "1")  # replayed ids' values are debug-only
    kw = {"logits": L, "topk": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        moe_route(kw.pop("logits"), kw.pop("topk"), **kw)


BAD_LOSS = [
    (lambda: moe_aux_scores(torch.randn(4, 8), 0), r"topk must be in \[1, 8\]"),
    (lambda: moe_aux_scores(torch.randn(4, 8), 2, score="tanh"), "score must be one of"),
    (lambda: routing_to_dense(torch.rand(4, 2), torch.zeros(4, 3, dtype=torch.int64), 8),
     r"indices must have shape \[4, 2\]"),
]


@pytest.mark.parametrize("call,match", BAD_LOSS, ids=[m for _, m in BAD_LOSS])
def test_bad_loss_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_group_limited_greedy_matches_transformers_deepseek_v2():
    """group_score_topk=1 with the full softmax is DeepSeek-V2's group_limited_greedy: the same
    experts and weights as transformers' own DeepseekV2TopkRouter (an independent
    implementation: groups masked to 0 after the softmax, torch.topk)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    E, k, H = 64, 6, 32
    cfg = transformers.DeepseekV2Config(hidden_size=H, n_routed_experts=E, num_experts_per_tok=k,
                                        topk_method="group_limited_greedy", n_group=8,
                                        topk_group=3, routed_scaling_factor=16.0)
    router = DeepseekV2TopkRouter(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, H, generator=g))
    hidden = torch.randn(97, H, generator=g)
    logits, hf_w, hf_idx = router(hidden)
    got = moe_route(logits, k, score="softmax", pre_softmax=True, n_groups=8, topk_groups=3,
                    group_score_topk=1, scaling_factor=16.0, normalize=False, impl="torch")
    order = hf_idx.argsort(dim=-1)  # transformers' top-k is unsorted; compare as sets
    mine = got.indices.argsort(dim=-1)
    assert torch.equal(got.indices.gather(1, mine), hf_idx.gather(1, order))
    torch.testing.assert_close(got.weights.gather(1, mine), hf_w.gather(1, order))
    # and it is not the sum-of-top-2 rule (k // topk_groups = 2) on these tokens
    v3 = moe_route(logits, k, score="softmax", pre_softmax=True, n_groups=8, topk_groups=3,
                   scaling_factor=16.0, normalize=False, impl="torch")
    assert not torch.equal(v3.indices, got.indices)


@pytest.mark.parametrize("kw", NAN_ROUTES)
def test_nan_logits_still_pick_distinct_experts(kw):
    check_nan_logits(kw, "torch")
