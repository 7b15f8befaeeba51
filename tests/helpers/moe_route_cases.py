"""Shared cases of the MoE routing tests: the Triton path (tests/ops/test_moe_route_triton.py)
and the CUDA path (tests/ops/test_moe_cuda.py) run the same ``check_*`` bodies on the same
``GRID``, ``impl`` naming the path. Ground truth is the fp64 per-token formula
``naive_moe_route``; launchers get NaN / -1 filled outputs so an unwritten element shows.
"""
from __future__ import annotations

import pytest
import torch

from r1fast.ops.moe_route import (
    moe_aux_scores,
    moe_route,
    naive_moe_aux_scores,
    naive_moe_route,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

CODE = {("softmax", False): 0, ("softmax", True): 1, ("sigmoid", False): 2, ("sigmoid", True): 2}


# T, E, k, score, pre_softmax, groups (n_groups, topk_groups[, group_score_topk]), bias,
# normalize; (8, 3, 1) is DeepSeek-V2's group_limited_greedy (a group ranks by its best expert)
GRID = [
    (7, 8, 1, "softmax", False, None, False, None),
    (7, 8, 2, "sigmoid", False, None, True, None),
    (33, 8, 2, "softmax", True, (4, 2), False, True),
    (7, 64, 8, "sigmoid", False, (8, 4), True, None),
    (33, 64, 2, "softmax", False, None, True, None),
    (7, 64, 1, "softmax", True, None, False, None),
    (33, 64, 8, "softmax", False, (8, 4), False, None),
    (7, 256, 8, "sigmoid", False, (8, 4), True, None),
    (7, 256, 2, "softmax", True, None, True, True),
    (7, 256, 1, "sigmoid", False, None, False, None),
    (33, 64, 6, "softmax", True, (8, 3, 1), False, False),
    (7, 64, 8, "sigmoid", False, (8, 4, 3), True, None),
]


def make(T, E, k, score, pre, groups, bias, normalize, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, E, generator=g) * 2).to(dtype).to(DEVICE)
    kw = dict(score=score, pre_softmax=pre, normalize=normalize, scaling_factor=2.5)
    if groups:
        kw.update(n_groups=groups[0], topk_groups=groups[1])
        if len(groups) > 2:
            kw["group_score_topk"] = groups[2]
    if bias:
        kw["expert_bias"] = (torch.randn(E, generator=g) * 0.05).to(DEVICE)
    return logits, kw


def grad_atol(want_grad, g, scaling=2.5):
    """fp32 error of a routing gradient: relative to the largest entry, but never below the
    rounding of 1 - s for s close to 1 (sigmoid') times the upstream scale."""
    return max(2e-6 * want_grad.abs().max().item(), 1e-7 * scaling * g.abs().max().item())


def run(logits, k, kw, impl):
    x = logits.detach().clone().requires_grad_()
    r = moe_route(x, k, impl=impl, **kw)
    g = torch.randn(r.weights.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    (r.weights * g).sum().backward()
    return r, x.grad, g


def naive(logits, k, kw, g):
    xr = logits.detach().cpu().double().requires_grad_()
    nkw = {key: (v.cpu() if isinstance(v, torch.Tensor) else v) for key, v in kw.items()}
    want = naive_moe_route(xr, k, **nkw)
    (want.weights * g.cpu().double()).sum().backward()
    return want, xr.grad


def check_matches_naive(case, impl):
    T, E, k, score, pre, groups, bias, normalize = case
    logits, kw = make(T, E, k, score, pre, groups, bias, normalize)
    got, grad, g = run(logits, k, kw, impl)
    want, want_grad = naive(logits, k, kw, g)
    assert torch.equal(got.indices.cpu(), want.indices)
    assert torch.equal(got.tokens_per_expert.cpu(), want.tokens_per_expert)
    torch.testing.assert_close(got.weights.detach().cpu().double(), want.weights.detach(),
                               atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(grad.cpu().double(), want_grad, atol=grad_atol(want_grad, g),
                               rtol=1e-5)
    # and the reference gives the same choices (selection on the same fp32 keys)
    ref = moe_route(logits, k, impl="torch", **kw)
    assert torch.equal(ref.indices, got.indices)


def check_replay(case, impl):
    T, E, k, score, pre, groups, bias, normalize = case
    logits, kw = make(T, E, k, score, pre, groups, bias, normalize, seed=1)
    g = torch.Generator().manual_seed(5)
    replay = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(DEVICE)
    kw["replay_indices"] = replay
    got, grad, gw = run(logits, k, kw, impl)
    want, want_grad = naive(logits, k, kw, gw)
    assert torch.equal(got.indices.cpu(), replay.cpu())
    assert torch.equal(got.tokens_per_expert.cpu(), want.tokens_per_expert)
    torch.testing.assert_close(got.weights.detach().cpu().double(), want.weights.detach(),
                               atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(grad.cpu().double(), want_grad, atol=grad_atol(want_grad, gw),
                               rtol=1e-5)


def check_half_precision(dtype, score, pre, impl):
    logits, kw = make(7, 64, 8, score, pre, None, False, None, dtype=dtype)
    got, grad, g = run(logits, 8, kw, impl)
    want, want_grad = naive(logits, 8, kw, g)  # the fp64 truth of the same rounded logits
    assert got.weights.dtype == torch.float32 and grad.dtype == dtype
    assert torch.equal(got.indices.cpu(), want.indices)
    torch.testing.assert_close(got.weights.detach().cpu().double(), want.weights.detach(),
                               atol=2e-6, rtol=1e-5)
    # the gradient is rounded to the logits' dtype once (the interpreter truncates: 1 ulp)
    ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    scale = want_grad.abs().max().item()
    torch.testing.assert_close(grad.cpu().double(), want_grad, atol=2 * ulp * scale, rtol=2 * ulp)


def check_launchers_write_every_output(K):
    """Outputs poisoned with NaN / -1 before the launch: every element must be written.
    ``K``: the launcher namespace (Triton kernels module, or the CUDA wrappers)."""
    T, E, k = 33, 64, 8
    logits, kw = make(T, E, k, "sigmoid", False, (8, 4), True, None)
    w = torch.full((T, k), float("nan"), device=DEVICE)
    idx = torch.full((T, k), -1, dtype=torch.int64, device=DEVICE)
    counts = torch.full((E,), -7, dtype=torch.int64, device=DEVICE)
    K.route_fwd(logits, k, 2, kw["expert_bias"], None, 8, 4, 2, 2.5, True, weights=w,
                indices=idx, counts=counts)
    assert bool(torch.isfinite(w).all()) and bool((idx >= 0).all())
    assert int(counts.sum()) == T * k
    dl = torch.full((T, E), float("nan"), device=DEVICE)
    for score in (0, 1, 2):
        dl.fill_(float("nan"))
        K.route_bwd(torch.randn(T, k, device=DEVICE), logits, idx, score, 2.5, True,
                    grad_logits=dl)
        assert bool(torch.isfinite(dl).all())
    p = torch.full((T, E), float("nan"), device=DEVICE)
    K.aux_scores_fwd(logits, k, True, scores=p, counts=counts)
    assert bool(torch.isfinite(p).all()) and int(counts.sum()) == T * k
    dl.fill_(float("nan"))
    K.aux_scores_bwd(torch.randn(T, E, device=DEVICE), logits, False, grad_logits=dl)
    assert bool(torch.isfinite(dl).all())


def check_deterministic(impl):
    logits, kw = make(33, 256, 8, "sigmoid", False, (8, 4), True, None)
    a, ga, _ = run(logits, 8, kw, impl)
    b, gb, _ = run(logits, 8, kw, impl)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.indices, b.indices)
    assert torch.equal(a.tokens_per_expert, b.tokens_per_expert) and torch.equal(ga, gb)


def check_ties(T, E, k, score, pre, grouped, seed, impl):
    """Integer logits make ties common: lowest index first, in the group choice too."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(-2, 3, (T, E), generator=g).float()
    kw = dict(score=score, pre_softmax=pre)
    if grouped:
        kw.update(n_groups=E // 2, topk_groups=1)
        k = min(k, 2)
    got = moe_route(logits.to(DEVICE), k, impl=impl, **kw)
    assert torch.equal(got.indices.cpu(), naive_moe_route(logits, k, **kw).indices)


def check_weights_sum(T, k, scaling, score, pre, seed, impl):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, 8, generator=g) * 3).to(DEVICE)
    got = moe_route(logits, k, score=score, pre_softmax=pre, normalize=True,
                    scaling_factor=scaling, impl=impl)
    torch.testing.assert_close(got.weights.sum(-1).cpu(), torch.full((T,), scaling),
                               atol=1e-5, rtol=1e-5)


def check_aux_scores(score, T, E, k, impl):
    logits = (torch.randn(T, E) * 2).to(DEVICE).requires_grad_()
    p, counts = moe_aux_scores(logits, k, score=score, impl=impl)
    gp = torch.randn(T, E).to(DEVICE)
    (p * gp).sum().backward()
    xr = logits.detach().cpu().double().requires_grad_()
    pn, cn = naive_moe_aux_scores(xr, k, score)
    (pn * gp.cpu().double()).sum().backward()
    torch.testing.assert_close(p.detach().cpu().double(), pn.detach(), atol=1e-6, rtol=1e-5)
    assert torch.equal(counts.cpu(), cn)
    scale = xr.grad.abs().max().item()
    torch.testing.assert_close(logits.grad.cpu().double(), xr.grad, atol=2e-6 * scale, rtol=1e-5)


#: the routing settings of :func:`check_nan_logits` (parametrize ``kw`` with them)
NAN_ROUTES = [pytest.param(dict(score="softmax"), id="post"),
              pytest.param(dict(score="softmax", pre_softmax=True), id="pre"),
              pytest.param(dict(score="sigmoid", n_groups=8, topk_groups=4, scaling_factor=2.5),
                           id="dsv3")]


def check_nan_logits(kw, impl):
    """A diverging run's NaN router logits (scattered, and whole rows): which experts win is
    unspecified, but every row holds k distinct in-range experts, the counts are theirs, and
    the aux-loss counts add up."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(96, 64, generator=g)
    logits[torch.rand(96, 64, generator=g) < 0.05] = float("nan")
    logits[:8] = float("nan")
    r = moe_route(logits.to(DEVICE), 8, impl=impl, **kw)
    idx = r.indices.long().cpu()
    assert ((idx >= 0) & (idx < 64)).all(), "an expert id out of range"
    assert (idx.sort(1).values.diff(dim=1) > 0).all(), "an expert chosen twice in a row"
    assert torch.equal(r.tokens_per_expert.cpu(), torch.bincount(idx.reshape(-1), minlength=64))
    _, counts = moe_aux_scores(logits.to(DEVICE), 8, score=kw["score"], impl=impl)
    assert int(counts.sum()) == 96 * 8


def selection_key(logits, score="sigmoid", expert_bias=None):
    """The fp64 key that the top-k selection ranks (score, plus the expert bias)."""
    x = logits.detach().double().cpu()
    s = torch.sigmoid(x) if score == "sigmoid" else x
    return s + expert_bias.detach().double().cpu() if expert_bias is not None else s


def rows_agree_up_to_ties(ind_a, ind_b, key, *, topk, groups=None, tol=1e-5):
    """Compare two implementations' choices ``ind_a``/``ind_b`` [T, k] on the fp64 selection
    ``key`` [T, E] and return the bool mask [T] of rows whose indices are identical. A row may
    differ only at a tie: its chosen keys, sorted, agree within ``tol`` (experts exchanged
    for equal-key experts), or, with ``groups=(n_groups, topk_groups)``, the group scores tie
    at the group cut-off within ``tol`` (a whole group exchanged). Anything else fails the
    assertion, naming the first offending row. Two kernels that compute the score with
    different exp() implementations (CUDA ``expf``, Triton ``ex2.approx``) flip near-ties
    now and then; that is not an error, a different choice of clearly unequal experts is."""
    a, b = ind_a.cpu().long(), ind_b.cpu().long()
    same = (a == b).all(-1)
    rows = (~same).nonzero().flatten().tolist()
    for t in rows:
        ka = key[t, a[t]].sort().values
        kb = key[t, b[t]].sort().values
        if torch.allclose(ka, kb, atol=tol, rtol=0):
            continue
        if groups is not None:
            G, kg = groups
            E = key.shape[1]
            m = topk // kg
            gs = key[t].view(G, E // G).topk(m, dim=-1).values.sum(-1).sort(descending=True)
            if kg < G and float(gs.values[kg - 1] - gs.values[kg]) <= tol:
                continue
        raise AssertionError(f"row {t}: indices {a[t].tolist()} vs {b[t].tolist()} choose keys "
                             f"{ka.tolist()} vs {kb.tolist()}: not a tie within {tol}")
    return same
