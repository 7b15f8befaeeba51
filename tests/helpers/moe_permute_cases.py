"""Shared cases of the MoE permutation tests: the torch/Triton paths
(tests/ops/test_moe_permute.py) and the CUDA path (tests/ops/test_moe_cuda.py) run the same
``check_*`` bodies, ``impl`` naming the path. ``truth`` is the fp64 loop formula
(``naive_moe_permute`` / ``naive_moe_unpermute``); ``pipeline`` runs permute -> a fake
elementwise expert -> unpermute and the backward on the chosen path."""
from __future__ import annotations

import torch

from r1fast.ops.moe_permute import (
    moe_permute,
    moe_unpermute,
    naive_moe_permute,
    naive_moe_unpermute,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make(T, k, E, H, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else \
        torch.zeros(0, k, dtype=torch.int64)
    w = torch.rand(T, k, generator=g)
    y_scale = torch.randn(T * k, H, generator=g)  # expert "outputs" = permuted * y_scale
    dout = torch.randn(T, H, generator=g)
    return x, idx, w, y_scale, dout


def pipeline(x, idx, w, y_scale, dout, E, impl):
    """permute -> fake expert (elementwise) -> unpermute, then backward; returns every piece."""
    xd = x.detach().clone().to(DEVICE).requires_grad_()
    wd = w.detach().clone().to(DEVICE).requires_grad_()
    perm, row_map, counts = moe_permute(xd, idx.to(DEVICE), E, impl=impl)
    y = perm * y_scale.to(DEVICE, perm.dtype)
    out = moe_unpermute(y, row_map, wd, impl=impl)
    (out.double() * dout.to(DEVICE).double()).sum().backward()
    return perm.detach(), row_map, counts, out.detach(), xd.grad, wd.grad


def truth(x, idx, w, y_scale, dout, E):
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    perm, row_map, counts = naive_moe_permute(xr, idx, E)
    y = perm * y_scale.double()
    out = naive_moe_unpermute(y, row_map, wr)
    (out * dout.double()).sum().backward()
    return perm.detach(), row_map, counts, out.detach(), xr.grad, wr.grad


def check_matches_fp64_loops(impl, T, k, E, H):
    x, idx, w, ys, dout = make(T, k, E, H)
    got = pipeline(x, idx, w, ys, dout, E, impl)
    want = truth(x, idx, w, ys, dout, E)
    assert torch.equal(got[0].cpu().double(), want[0])  # permute is an exact copy
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[2].cpu(), want[2])
    for a, b in zip(got[3:], want[3:]):
        torch.testing.assert_close(a.cpu().double(), b, atol=1e-5, rtol=1e-5)


def check_half_precision_rows(impl, dtype):
    T, k, E, H = 7, 2, 8, 63
    x, idx, w, ys, dout = make(T, k, E, H, dtype=dtype)
    got = pipeline(x, idx, w, ys, dout, E, impl)
    want = truth(x, idx, w, ys.to(dtype).float(), dout, E)
    assert got[0].dtype == dtype and got[3].dtype == dtype and got[4].dtype == dtype
    assert torch.equal(got[0].cpu().double(), want[0])
    ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    for a, b in zip(got[3:5], want[3:5]):  # rounded once to the row dtype (2 ulp: y, out)
        torch.testing.assert_close(a.cpu().double(), b, atol=4 * ulp * b.abs().max().item(),
                                   rtol=4 * ulp)
    # dw sums products of half rows: its error is that of y's rounding
    torch.testing.assert_close(got[5].cpu().double(), want[5], atol=4 * ulp * H ** 0.5,
                               rtol=4 * ulp)


def check_repeated_expert_stable_order(impl):
    x = torch.arange(6.0).view(3, 2).to(DEVICE)
    idx = torch.tensor([[1, 1], [0, 1], [1, 0]], device=DEVICE)
    perm, row_map, counts = moe_permute(x, idx, 2, impl=impl)
    # expert 0: (t1,j0), (t2,j1); expert 1: (t0,j0), (t0,j1), (t1,j1), (t2,j0)
    assert row_map.tolist() == [[2, 3], [0, 4], [5, 1]]
    assert perm[:, 0].tolist() == [2.0, 4.0, 0.0, 0.0, 2.0, 4.0] and counts.tolist() == [2, 4]


def check_deterministic(impl):
    x, idx, w, ys, dout = make(9, 4, 16, 65, seed=3)
    a = pipeline(x, idx, w, ys, dout, 16, impl)
    b = pipeline(x, idx, w, ys, dout, 16, impl)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def check_launchers_write_every_output(K, H):
    """NaN-poisoned outputs must be fully written. ``K``: Triton kernels or CUDA wrappers."""
    T, k = 7, 2
    x = torch.randn(T, H, device=DEVICE)
    row_map = torch.randperm(T * k, device=DEVICE).view(T, k)
    w = torch.rand(T, k, device=DEVICE)
    y = torch.randn(T * k, H, device=DEVICE)
    out = torch.full((T * k, H), float("nan"), device=DEVICE)
    dw = torch.full((T, k), float("nan"), device=DEVICE)
    K.scatter_rows(x, row_map, w, y, out=out, dw=dw)
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(dw).all())
    comb = torch.full((T, H), float("nan"), device=DEVICE)
    K.gather_combine(y, row_map, w, out=comb)
    assert bool(torch.isfinite(comb).all())
