"""Vocabulary-parallel ``linear_logprob``: 2 gloo ranks, each holding half the LM head: on a CPU,
or both on the one GPU of a ``make gpu-check`` machine (NCCL refuses two ranks on one device;
gloo all-reduces CUDA tensors), where the Triton paths run compiled.

Each rank (``tests.helpers.spawn.run_gloo``) builds the same inputs (seeded), runs the
unsharded op and the sharded op (``tp_group``), with one temperature and with one per row, and
checks that logp, entropy and dx are the unsharded values and that its dW is its shard's rows
of the unsharded dW, for the torch reference and the Triton path (interpreter on CPU).
Targets fall on both shards, and some rows are ignored.
"""
from __future__ import annotations

import itertools
import math
import os
import re

import pytest
import torch
import torch.distributed as dist

from r1fast.ops._dispatch import triton_missing
from r1fast.ops.linear_logprob import linear_logprob, naive_linear_logprob
from tests.helpers.spawn import run_gloo

WORLD = 2
IGNORE = -100
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(T, H, V, dtype):
    g = torch.Generator().manual_seed(1234)  # same on every rank: hidden/targets replicated
    hidden = torch.randn(T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (3.0 / math.sqrt(H))).to(dtype)
    targets = torch.randint(0, V, (T,), generator=g)
    targets[[1, 5]] = IGNORE
    targets[0], targets[2] = 0, V - 1  # first row of shard 0, last row of the last shard
    out = hidden, weight, targets, torch.randn(T, generator=g), torch.randn(T, generator=g)
    return tuple(t.to(DEVICE) for t in out)


def _run(hidden, weight, targets, g, h, tau, **kw):
    x = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, ent = linear_logprob(x, w, targets, tau, True, **kw)
    ((logp * g).sum() + (ent * h).sum()).backward()
    return logp.detach(), ent.detach(), x.grad, w.grad


def _worker(rank: int, impl: str, tiles: str) -> None:
    T, H, v_local = 13, 9, 37
    V = v_local * WORLD
    rows = slice(rank * v_local, (rank + 1) * v_local)
    row_tau = torch.linspace(0.4, 2.0, T, device=DEVICE)  # one temperature per row
    for (dtype, tol), tau in itertools.product(((torch.float32, 2e-5), (torch.bfloat16, 2e-2)),
                                               (0.8, row_tau)):
        hidden, weight, targets, g, h = _inputs(T, H, V, dtype)
        kw = dict(impl=impl, chunk_tokens=8, chunk_vocab=32,  # 2 x 3 chunks unsharded
                  tiles=tiles)
        full = _run(hidden, weight, targets, g, h, tau, **kw)
        shard = _run(hidden, weight[rows].contiguous(), targets, g, h, tau,
                     tp_group=dist.group.WORLD, **kw)
        want = (*full[:3], full[3][rows])
        for name, a, b in zip(("logp", "entropy", "dx", "dW"), shard, want):
            assert a.dtype == b.dtype, name
            scale = max(1.0, b.abs().max().item()) if name in ("dx", "dW") else 1.0
            torch.testing.assert_close(a.float(), b.float(), atol=tol * scale, rtol=tol,
                                       msg=lambda m, n=name: f"{impl} {tiles} {dtype} "
                                                               f"{type(tau)} {n}: {m}")
        # and the unsharded values are right (fp64 full-logits formula)
        naive_tau = tau.double() if isinstance(tau, torch.Tensor) else tau
        naive = naive_linear_logprob(hidden.double(), weight.double(), targets, naive_tau, True)
        for a, b in zip(shard[:2], naive):
            torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=2e-5)
    # targets are checked against the full vocabulary, not the shard
    hidden, weight, targets, _, _ = _inputs(T, H, V, torch.float32)
    targets[3] = V
    with pytest.raises(ValueError, match=re.escape(f"targets must be in [0, {V})")):
        linear_logprob(hidden, weight[rows], targets, impl=impl, tp_group=dist.group.WORLD,
                       validate=True)
    # shards of unequal size used to score targets against the wrong rows, without a word
    uneven = weight[:v_local] if rank == 0 else weight[v_local:V - 1]
    with pytest.raises(ValueError, match=re.escape(f"got {[v_local, v_local - 1]} rows per rank")):
        linear_logprob(hidden, uneven, targets.clamp(max=V - 2), impl=impl,
                       tp_group=dist.group.WORLD, validate=True)


@pytest.mark.multiproc
@pytest.mark.parametrize("impl,tiles", [("torch", "fused"), ("triton", "fused"),
                                        ("triton", "gemm")])
def test_vocab_parallel_matches_unsharded(impl, tiles, tmp_path):
    if impl == "triton" and triton_missing(DEVICE) is not None:
        pytest.skip(str(triton_missing(DEVICE)))
    # on a CPU the children inherit TRITON_INTERPRET from this process (set by conftest)
    assert impl == "torch" or DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    run_gloo(WORLD, str(tmp_path / "store"), _worker, impl, tiles)
