#!/usr/bin/env python3
"""Every r1fast op once, forward and backward, on small odd shapes: the program that
``compute-sanitizer`` watches for out-of-bounds accesses (``--tool memcheck``) and shared-memory
races (``--tool racecheck``) in the Triton and CUDA kernels (issue #18).

Usage::

    compute-sanitizer --tool memcheck --error-exitcode 3 python scripts/sanitize_ops.py
    python scripts/sanitize_ops.py          # no sanitizer: the same calls, e.g. on a CPU

Shapes are small (a sanitizer slows kernels down a hundredfold) but odd, so every kernel runs
its masked edge tiles: T=37 tokens, H=72, V=1000 (several vocabulary splits and chunks), 33
packed sequences, E=64 experts with groups, k=6. Each op runs on the Triton path and, where the
CUDA extension builds, on the CUDA path. On a CPU the Triton kernels run under the interpreter
(``TRITON_INTERPRET=1`` is set here when there is no GPU) and the CUDA path is left out. Prints
one ``SANITIZE_OK <op> <impl>`` line per op, and exits non-zero on the first error.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r1fast import ops  # noqa: E402
from r1fast.ops._dispatch import cuda_missing  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear_logprob(impl: str) -> None:
    g = _g(0)
    x = torch.randn(37, 72, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    w = (torch.randn(1000, 72, generator=g) * 0.3).to(DEVICE, torch.bfloat16).requires_grad_()
    y = torch.randint(0, 1000, (37,), generator=g).to(DEVICE)
    y[::5] = -100
    logp, ent = ops.linear_logprob(x, w, y, 0.9, True, impl=impl, chunk_tokens=16,
                                   chunk_vocab=384)
    (logp.sum() + ent.sum()).backward()


def policy_loss(impl: str) -> None:
    g = _g(1)
    lens = torch.randint(0, 9, (33,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(DEVICE)
    n = int(lens.sum())
    logp = (-torch.rand(n, generator=g)).to(DEVICE).requires_grad_()
    old = logp.detach() + 0.1
    cfg = ops.PolicyLossConfig(kl="k3", kl_coef=0.01, tis_cap=2.0, agg="seq-mean-token-mean")
    loss, _ = ops.policy_loss(logp, old, torch.randn(33, generator=g).to(DEVICE),
                              torch.ones(n, dtype=torch.bool, device=DEVICE), cfg,
                              ref_logp=old, rollout_logp=old, cu_seqlens=cu, impl=impl)
    loss.backward()


def group_advantages(impl: str) -> None:
    r = torch.rand(37 * 5, generator=_g(2)).to(DEVICE)
    ops.group_advantages(r, group_size=5, impl=impl)


def moe_route(impl: str) -> None:
    g = _g(3)
    logits = torch.randn(37, 64, generator=g).to(DEVICE).requires_grad_()
    bias = (torch.randn(64, generator=g) * 0.05).to(DEVICE)
    r = ops.moe_route(logits, 6, score="sigmoid", n_groups=8, topk_groups=3, expert_bias=bias,
                      scaling_factor=2.5, impl=impl)
    r.weights.sum().backward()


def moe_permute(impl: str) -> None:
    g = _g(4)
    x = torch.randn(37, 72, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    idx = torch.stack([torch.randperm(64, generator=g)[:6] for _ in range(37)]).to(DEVICE)
    w = torch.rand(37, 6, generator=g).to(DEVICE).requires_grad_()
    p = ops.moe_permute(x, idx, 64, impl=impl)
    ops.moe_unpermute(p.permuted, p.row_map, w, impl=impl).float().sum().backward()


OPS = {"linear_logprob": (linear_logprob, None), "policy_loss": (policy_loss, None),
       "group_advantages": (group_advantages, None), "moe_route": (moe_route, "moe_route"),
       "moe_permute": (moe_permute, "moe_permute")}


def main() -> int:
    for name, (run, cuda_op) in OPS.items():
        impls = ["triton"]
        if cuda_op is not None and DEVICE.type == "cuda":
            why = cuda_missing(DEVICE, cuda_op)
            if why is not None:  # the build stage records the reason; say it here too
                print(f"SANITIZE_SKIP {name} cuda: {why}", flush=True)
            else:
                impls.append("cuda")
        for impl in impls:
            run(impl)
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()  # a kernel fault surfaces here, inside this op
            print(f"SANITIZE_OK {name} {impl}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
