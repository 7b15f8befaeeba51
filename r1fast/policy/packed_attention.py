"""Packed-sequence core attention for megatron's local (non-TE) layer spec: each packed sequence
attends to itself, at a cost of sum(L_i^2), not T^2.

A packed micro-batch is one row of ``T`` tokens holding sequences of lengths ``L_i`` end to end
(``cu_seqlens`` marks the boundaries, r1fast.policy.packed). The explicit-mask way to keep them
apart builds a block-diagonal causal ``[T, T]`` mask and runs ordinary attention over the whole
row: every score of every pair of tokens is computed, then most are masked away. Here instead:

1. the policy hands megatron the boundaries as ``PackedSeqParams`` (``qkv_format='thd'``) and no
   mask (:func:`packed_inputs`, :func:`thd_params`); megatron's attention then squeezes the batch
   dimension (``[t, heads, d]``) and applies RoPE per token from the policy's table (whose rows
   are the restarted positions: the table is as long as the row, megatron's exact-offset case);
2. :class:`PackedDotProductAttention`, swapped for megatron's ``DotProductAttention`` in the
   layer spec (:func:`use_packed_core_attention`), computes :func:`segment_attention`: segments
   of similar length are gathered into a padded batch ``[G, heads, Lg, d]`` (each right-padded
   to the group's longest ``Lg`` by repeating its last token) and run through one causal
   ``scaled_dot_product_attention``. Right padding under a causal mask is exact: a real query
   ``i < L`` never sees a key ``j > i``, so the pads are invisible to it; the pads' own outputs
   are dropped (so their gradient is exactly 0). The real outputs are put back in row order.

Grouping: segments sorted longest first join the current group while the group's padded cost
``G * Lg^2`` stays within :data:`GROUP_SLACK` times its exact cost ``sum L_i^2`` (fewer, larger
calls; at most that much wasted attention work). Empty segments (a stacked ``cu_seqlens``
repeats T) are skipped.

Without ``packed_seq_params`` (right-padded rows, the rollout's prefill) the module is megatron's
``DotProductAttention`` unchanged, and the KV-cache decoder may swap it out like any core
attention. ``Policy.packed_attention = "mask"`` keeps the explicit-mask path (for comparison);
MLA keeps its own core attention (r1fast.policy.mla, the mask path); the Transformer Engine spec
(GPU) keeps the mask path too, with a warning, as its attention is not this module.
Scores follow SDPA's precision: fp32 accumulation for fp32/bf16 inputs (docs/DESIGN.md §4).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention

from r1fast.policy.packed import packed_layout

log = logging.getLogger("r1fast.policy")

GROUP_SLACK = 1.5
"""A group of segments may cost at most this many times the attention work of its segments
computed one by one (padded ``G * Lg^2`` vs exact ``sum L_i^2``)."""

MODES = ("segments", "mask")


def segment_groups(lengths: list[int], slack: float = GROUP_SLACK) -> list[list[int]]:
    """Indices of the non-empty segments, grouped longest first (module docstring)."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    exact = 0
    for i in order:
        n = lengths[i]
        if groups:
            top = lengths[groups[-1][0]]  # the group's longest: its padded length
            if (len(groups[-1]) + 1) * top * top <= slack * (exact + n * n):
                groups[-1].append(i)
                exact += n * n
                continue
        groups.append([i])
        exact = n * n
    return groups


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      cu_seqlens: torch.Tensor, scale: float,
                      slack: float = GROUP_SLACK) -> torch.Tensor:
    """Causal attention within each packed segment.

    query [T, nq, d], key / value [T, nkv, d] (nq a multiple of nkv: grouped-query attention),
    ``cu_seqlens`` [S+1] from 0 to T (non-decreasing), ``scale`` the softmax scale. Returns
    [T, nq, d]: token t of segment s attends to the tokens of s up to itself only.
    """
    T, nq, d = query.shape
    nkv = key.shape[1]
    if nq % nkv:
        raise ValueError(f"segment_attention: query heads ({nq}) must be a multiple of key/value "
                         f"heads ({nkv})")
    cu = cu_seqlens.reshape(-1).tolist()
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"segment_attention: cu_seqlens must rise from 0 to T={T}, got {cu}")
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    if T == 0:
        return query.clone()  # [0, nq, d]: nothing to attend
    gqa = nq != nkv
    dev = query.device
    outs, where = [], []
    for group in segment_groups(lengths, slack):
        lg = lengths[group[0]]
        starts = torch.tensor([cu[i] for i in group], device=dev)  # [G]
        lens = torch.tensor([lengths[i] for i in group], device=dev)  # [G]
        pos = torch.arange(lg, device=dev)
        # [G, Lg]: each segment right-padded by repeating its last token (finite, never seen)
        idx = starts[:, None] + torch.minimum(pos[None, :], lens[:, None] - 1)
        q, k, v = (x[idx].transpose(1, 2) for x in (query, key, value))  # [G, n, Lg, d]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                           enable_gqa=gqa)  # [G, nq, Lg, d]
        real = pos[None, :] < lens[:, None]  # [G, Lg]
        outs.append(o.transpose(1, 2)[real])  # [sum L, nq, d]
        where.append(idx[real])  # [sum L]: their rows in the packed order
    if len(outs) == 1 and len(lengths) and lengths.count(T) == 1:
        return outs[0]  # one segment covers the row: already in order
    where_all = torch.cat(where)  # a permutation of 0 .. T-1
    inverse = torch.empty_like(where_all)
    inverse[where_all] = torch.arange(T, device=dev)
    return torch.cat(outs)[inverse]


class PackedDotProductAttention(DotProductAttention):
    """megatron's local core attention; with ``packed_seq_params`` (``thd``: query [t, nq, d],
    key/value [t, nkv, d], batch of 1) it attends per packed sequence (:func:`segment_attention`)
    and returns [t, nq * d]. Without, it is ``DotProductAttention`` itself."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Any = None,
                attention_bias: Optional[torch.Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> torch.Tensor:
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias)
        name = "PackedDotProductAttention"
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"{name}: packed_seq_params.qkv_format must be 'thd', got "
                             f"{packed_seq_params.qkv_format!r}")
        if attention_mask is not None or attention_bias is not None:
            raise ValueError(f"{name}: packed sequences take their boundaries from cu_seqlens; "
                             f"got an attention mask or bias as well")
        if self.training and self.attention_dropout.p > 0:
            raise ValueError(f"{name}: attention dropout must be 0 on packed sequences, got "
                             f"{self.attention_dropout.p}")
        if self.softmax_offset is not None or self.scale_mask_softmax.window_size is not None:
            raise ValueError(f"{name}: softmax_type {self.config.softmax_type!r} / sliding "
                             f"windows are not supported on packed sequences")
        # query-key layer scaling divides the scale by a coefficient the softmax multiplies back
        scale = self.softmax_scale * (self.scale_mask_softmax.scale or 1.0)
        out = segment_attention(query, key, value, packed_seq_params.cu_seqlens_q, scale)
        return out.reshape(out.shape[0], -1)  # [t, nq * d]


def use_packed_core_attention(spec) -> None:
    """Swap megatron's local ``DotProductAttention`` for :class:`PackedDotProductAttention` in
    every layer of ``spec`` (a block spec); other core attentions (MLA's, TE's) are kept."""
    for layer in spec.layer_specs:
        sub = getattr(layer.submodules.self_attention, "submodules", None)
        if getattr(sub, "core_attention", None) is DotProductAttention:
            sub.core_attention = PackedDotProductAttention


def _segments_supported(policy) -> bool:
    """Whether every attention layer of ``policy`` runs :class:`PackedDotProductAttention`."""
    layers = policy.gpt.decoder.layers
    return len(layers) == 0 or all(
        isinstance(layer.self_attention.core_attention, PackedDotProductAttention)
        for layer in layers)


def packed_inputs(policy, cu_seqlens: torch.Tensor, length: int):
    """``(position_ids [1, T], attention_mask, packed_seq_params)`` of one packed micro-batch of
    ``T = length`` tokens for ``policy`` (on its device): restarted positions, then either the
    block-diagonal mask [1, 1, T', T'] (``policy.packed_attention == "mask"``, MLA, the TE
    spec; T' = T padded for sequence parallelism, the pads hidden) and None, or None and the
    boundaries as :func:`thd_params` (``"segments"``)."""
    mode = getattr(policy, "packed_attention", "segments")
    if mode not in MODES:
        raise ValueError(f"Policy.packed_attention must be one of {MODES}, got {mode!r}")
    if cu_seqlens.dim() == 2 and cu_seqlens.shape[0] != 1:
        raise ValueError(f"cu_seqlens: one packed row per micro-batch, got "
                         f"{list(cu_seqlens.shape)}")
    if mode == "segments" and not policy.model_cfg.is_mla and not _segments_supported(policy):
        if not getattr(policy, "_warned_packed_mask", False):
            policy._warned_packed_mask = True
            log.warning("WARNING: packed_attention='segments' needs r1fast's local core "
                        "attention; this policy's layers have another (Transformer Engine), "
                        "so packed rows run the explicit [T, T] block-diagonal mask instead")
        mode = "mask"
    pos, mask = packed_layout(cu_seqlens, length, policy.device)
    padded = policy._padded_len(length)
    if mode == "mask" or policy.model_cfg.is_mla:  # MLA: its own core attention takes the mask
        if padded > length:  # pads see nothing real, and nothing real sees them
            mask = F.pad(mask, (0, padded - length, 0, padded - length), value=True)
        return pos, mask, None
    return pos, None, thd_params(cu_seqlens.reshape(-1).to(policy.device, torch.int32), padded)


def thd_params(cu_seqlens: torch.Tensor, padded_len: int) -> PackedSeqParams:
    """megatron's ``PackedSeqParams`` (``thd``) of packed boundaries ``cu_seqlens`` [S+1], with
    the pads up to ``padded_len`` (sequence parallelism) as one more sequence."""
    cu = cu_seqlens
    if padded_len > int(cu[-1]):  # the pads attend among themselves (their outputs are unused)
        cu = torch.cat([cu, cu.new_tensor([padded_len])])
    longest = int(cu.diff().max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)
