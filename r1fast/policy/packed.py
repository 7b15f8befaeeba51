"""The packed-sequence layout of one micro-batch, as the policy's forward needs it.

Packed sequences lie end to end in one row of ``T`` tokens, with ``cu_seqlens`` [S+1] marking
their boundaries (0 = cu[0] <= ... <= cu[S] = T; empty sequences are allowed, so a batch of
packed rows can share one padded ``cu_seqlens`` width). Each sequence must look to the model
as if it were alone: RoPE positions restart at 0 at every boundary, and attention is causal
within a sequence and blocked across sequences (a block-diagonal causal mask). On megatron's
local attention the mask is explicit ([1, 1, T, T] bool, True = hidden); Transformer Engine's
THD format would take ``cu_seqlens`` directly.

Where the boundaries live: the trainer packs on the host, so ``cu_seqlens`` arrives as a CPU
tensor and everything derived from it (positions, segment ids, the segment plan of
r1fast.policy.packed_attention) is computed there and sent to the GPU in one pinned,
non-blocking copy (r1fast.policy.transfer). Deriving them on the GPU instead needs
data-dependent shapes (``repeat_interleave``, ``nonzero``, a length read to the host), each a
wait for the GPU to drain, a few per micro-batch.
"""
from __future__ import annotations

import torch

from r1fast.policy.transfer import to_device_once


def packed_layout(cu_seqlens: torch.Tensor, length: int, device: torch.device | None = None,
                  mask: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(position_ids [1, T], attention_mask [1, 1, T, T])`` of packed sequences (no mask,
    None, with ``mask=False``)."""
    cu = cu_seqlens.reshape(-1).to("cpu", torch.int64)  # the trainer's host copy: no wait
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != length or bool((cu.diff() < 0).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to the packed length {length}, got "
                         f"{cu.tolist()}")
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu.diff())  # [T] on the host
    positions = torch.arange(length) - cu[seg]
    if not mask:
        return to_device_once(device or cu_seqlens.device, [positions])[0][None], None
    positions, seg = to_device_once(device or cu_seqlens.device, [positions, seg])
    idx = torch.arange(length, device=seg.device)
    allowed = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])  # [T, T]
    return positions[None], ~allowed[None, None]
