"""Triton kernel for group-relative advantages (GRPO, Dr.GRPO, RLOO).

One program per group. A group is a segment ``offsets[g] .. offsets[g+1]`` of a permutation of
the rewards (``perm``), or, for contiguous groups of a fixed size, ``g*G .. (g+1)*G`` of the
rewards themselves (no permutation read). The program makes three short passes over its
segment, all accumulating in fp32 in a fixed order:

1. sum of ``r - r0`` (``r0`` the group's first reward), min and max -> mean; "all equal" is
   ``min == max``. The shift makes the rounding error scale with the group's spread rather
   than with the rewards' magnitude;
2. (grpo only) sum of squared deviations from the mean -> unbiased std (two-pass);
3. write the advantage of each member at its original position.

Estimators (``n`` members, ``S`` their sum):
* grpo:   ``A = (r - S/n) / (std + eps)``
* drgrpo: ``A = r - S/n``
* rloo:   ``A = r - (S - r)/(n - 1)``, computed as ``n (r - S/n) / (n - 1)`` (equal, and free
  of the cancellation of two large numbers when the rewards share a large offset)
A group whose rewards are all equal (which includes a group of one) gets exactly 0: the
estimators are 0 there mathematically, and forcing it keeps rounding of the mean (``r - S/n``
need not be exactly 0 in floating point) from being amplified by ``1/eps``.

The launcher accepts a preallocated ``out`` so tests can fill it with NaN first and see any
position the kernel did not write.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1fast.kernels._launch import on_device_of

ESTIMATORS = {"grpo": 0, "drgrpo": 1, "rloo": 2}


@triton.jit
def _load_rewards(r_ptr, perm_ptr, j, inb, CONTIG: tl.constexpr):
    """Rewards at group positions ``j`` (fp32) and their indices in ``rewards``."""
    if CONTIG:
        idx = j
    else:
        idx = tl.load(perm_ptr + j, mask=inb, other=0)
    return tl.load(r_ptr + idx, mask=inb, other=0.0).to(tl.float32), idx


@triton.jit
def _group_advantages_kernel(r_ptr, perm_ptr, off_ptr, out_ptr, group_size, eps,
                             EST: tl.constexpr, CONTIG: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    if CONTIG:
        start = g * group_size
        end = start + group_size
    else:
        start = tl.load(off_ptr + g).to(tl.int64)
        end = tl.load(off_ptr + g + 1).to(tl.int64)
    n = (end - start).to(tl.float32)
    offs0 = tl.arange(0, BLOCK)
    # Shift by the group's first reward: sums of r - r0 lose precision relative to the spread of
    # the group, not to the magnitude of the rewards (which may share a large offset).
    # (an empty group reads nothing: the public op never makes one, a direct launch may)
    nonempty = end > start
    if CONTIG:
        first = start
    else:
        first = tl.load(perm_ptr + start, mask=nonempty, other=0)
    r0 = tl.load(r_ptr + first, mask=nonempty, other=0.0).to(tl.float32)

    acc = tl.zeros([BLOCK], dtype=tl.float32)
    v_min = tl.full([BLOCK], float("inf"), dtype=tl.float32)
    v_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for s in range(start, end, BLOCK):
        j = s + offs0
        inb = j < end
        r, idx = _load_rewards(r_ptr, perm_ptr, j, inb, CONTIG)
        acc += tl.where(inb, r - r0, 0.0)
        v_min = tl.minimum(v_min, tl.where(inb, r, float("inf")))
        v_max = tl.maximum(v_max, tl.where(inb, r, float("-inf")))
    mean = tl.sum(acc, axis=0) / n  # mean of r - r0
    constant = tl.min(v_min, axis=0) == tl.max(v_max, axis=0)
    nm1 = tl.maximum(n - 1.0, 1.0)  # only read when n > 1 (a group of one is constant)

    denom = 1.0
    if EST == 0:
        acc2 = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(start, end, BLOCK):
            j = s + offs0
            inb = j < end
            r, _ = _load_rewards(r_ptr, perm_ptr, j, inb, CONTIG)
            c = tl.where(inb, (r - r0) - mean, 0.0)
            acc2 += c * c
        denom = tl.sqrt(tl.sum(acc2, axis=0) / nm1) + eps
        denom = tl.where(denom > 0.0, denom, 1.0)  # eps = 0 and a constant group

    for s in range(start, end, BLOCK):
        j = s + offs0
        inb = j < end
        r, idx = _load_rewards(r_ptr, perm_ptr, j, inb, CONTIG)
        c = (r - r0) - mean
        if EST == 0:
            a = c / denom
        elif EST == 1:
            a = c
        else:
            a = c * (n / nm1)
        a = tl.where(constant, 0.0, a)
        tl.store(out_ptr + idx, a, mask=inb)


def group_advantages_fwd(
    rewards: torch.Tensor,  # [N] any float dtype, contiguous
    *,
    estimator: str,
    eps: float,
    group_size: int | None = None,  # contiguous groups of this size
    perm: torch.Tensor | None = None,  # [N] int64: reward indices sorted by group
    offsets: torch.Tensor | None = None,  # [G+1] int64: group g is perm[offsets[g]:offsets[g+1]]
    out: torch.Tensor | None = None,  # optional preallocated [N] fp32
    block: int | None = None,
) -> torch.Tensor:
    """Launch the kernel; exactly one of ``group_size`` / (``perm``, ``offsets``) is given.
    Inputs must already be validated (``r1fast.ops.advantages`` does that)."""
    n = rewards.numel()
    if out is None:
        out = torch.empty(n, dtype=torch.float32, device=rewards.device)
    contig = group_size is not None
    if contig:
        num_groups = n // group_size if group_size else 0
        typical = group_size
        perm = offsets = rewards  # placeholders; CONTIG keeps them unread
    else:
        num_groups = offsets.numel() - 1
        typical = n // max(num_groups, 1)
    if block is None:
        block = max(16, min(1024, triton.next_power_of_2(max(typical, 1))))
    if num_groups > 0:
        with on_device_of(rewards):
            _group_advantages_kernel[(num_groups,)](
                rewards, perm, offsets, out, int(group_size or 0), float(eps),
                EST=ESTIMATORS[estimator], CONTIG=contig, BLOCK=block, num_warps=4)
    return out
