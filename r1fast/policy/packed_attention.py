"""Packed-sequence core attention for megatron's local (non-TE) layer spec: each packed sequence
attends to itself, at a cost of sum(L_i^2), not T^2.

A packed micro-batch is one row of ``T`` tokens holding sequences of lengths ``L_i`` end to end
(``cu_seqlens`` marks the boundaries, r1fast.policy.packed). The explicit-mask way to keep them
apart builds a block-diagonal causal ``[T, T]`` mask and runs ordinary attention over the whole
row: every score of every pair of tokens is computed, then most are masked away. Here instead:

1. the policy hands megatron the boundaries as :class:`SegmentedSeqParams` (megatron's
   ``PackedSeqParams`` with ``qkv_format='thd'``, plus the :func:`segment_plan` built once per
   micro-batch and the RoPE table of the restarted positions) and no mask or RoPE table of its
   own (:func:`packed_inputs`); megatron's attention squeezes the batch dimension
   (``[t, heads, d]``) and calls the core attention, which ropes query and key from that table
   (megatron's ``thd`` RoPE would apply the same angles through a Python loop over sequences);
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
MLA keeps its own core attention (r1fast.policy.mla), which calls :func:`segment_attention` on
the boundaries megatron's MLA finds in the restarted positions. Under the Transformer Engine
spec (a GPU with TE installed) packing is refused with an error naming the setting: megatron
builds TE's core attention with ``attn_mask_type=causal``, which does not take an explicit
mask, so the block-diagonal mask would be dropped (TE's own ``thd`` path is not wired yet).
Scores follow SDPA's precision: fp32 accumulation for fp32/bf16 inputs (docs/DESIGN.md §4).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention

from r1fast.policy.packed import packed_layout
from r1fast.policy.transfer import to_device_once


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


@dataclasses.dataclass(frozen=True)
class SegmentPlan:
    """Where each segment group of one packed row goes (:func:`segment_plan`): built once per
    micro-batch and shared by every layer."""

    length: int
    """T: tokens of the packed row."""
    groups: tuple
    """Per group: (``idx`` [G, Lg] rows of the padded batch in the packed row, ``real`` [G*Lg]
    flat positions of its real tokens)."""
    inverse: Optional[torch.Tensor]
    """[T]: row t of the packed row in the concatenated real outputs; None when they are
    already in order (one segment covers the row)."""


def segment_plan(cu_seqlens: torch.Tensor, length: int, device: torch.device | None = None,
                 slack: float = GROUP_SLACK) -> SegmentPlan:
    """The :class:`SegmentPlan` of boundaries ``cu_seqlens`` [S+1] (0 .. ``length``), for
    ``device``. Planned on the host and sent in one non-blocking copy (r1fast.policy.packed):
    give the host copy of ``cu_seqlens`` (a device tensor is read here, a wait)."""
    cu = cu_seqlens.reshape(-1).tolist()
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != length or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the packed length {length}, got {cu}")
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    host, where = [], []
    for group in segment_groups(lengths, slack):
        lg = lengths[group[0]]
        starts = torch.tensor([cu[i] for i in group])  # [G]
        lens = torch.tensor([lengths[i] for i in group])  # [G]
        pos = torch.arange(lg)
        # [G, Lg]: each segment right-padded by repeating its last token (finite, never seen)
        idx = starts[:, None] + torch.minimum(pos[None, :], lens[:, None] - 1)
        real = (pos[None, :] < lens[:, None]).reshape(-1).nonzero().squeeze(1)  # [sum L]
        host += [idx, real]
        where.append(idx.reshape(-1)[real])  # [sum L]: their rows in the packed order
    in_order = len(where) == 1 and lengths.count(length) == 1
    if not in_order and length:
        where_all = torch.cat(where)  # a permutation of 0 .. T-1
        inverse = torch.empty_like(where_all)
        inverse[where_all] = torch.arange(length)
        host.append(inverse)
    sent, n = to_device_once(device or cu_seqlens.device, host), 2 * len(where)
    inverse = sent[n] if len(sent) > n else None
    return SegmentPlan(length=length, groups=tuple(zip(sent[:n:2], sent[1:n:2])), inverse=inverse)


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      cu_seqlens: torch.Tensor, scale: float, slack: float = GROUP_SLACK,
                      plan: Optional[SegmentPlan] = None) -> torch.Tensor:
    """Causal attention within each packed segment.

    query / key [T, nq|nkv, d], value [T, nkv, dv] (nq a multiple of nkv: grouped-query
    attention; dv may differ from d, as in MLA),
    ``cu_seqlens`` [S+1] from 0 to T (non-decreasing), ``scale`` the softmax scale; ``plan``:
    the :func:`segment_plan` of ``cu_seqlens`` when already built. Returns [T, nq, dv]: token t
    of segment s attends to the tokens of s up to itself only.
    """
    T, nq, d = query.shape
    nkv = key.shape[1]
    if nq % nkv:
        raise ValueError(f"segment_attention: query heads ({nq}) must be a multiple of key/value "
                         f"heads ({nkv})")
    if plan is None:
        plan = segment_plan(cu_seqlens, T, query.device, slack)
    elif plan.length != T:
        raise ValueError(f"segment_attention: the plan is for {plan.length} tokens, got {T}")
    dv = value.shape[-1]
    if T == 0:
        return query.new_empty(0, nq, dv)  # nothing to attend
    outs = []
    for idx, real in plan.groups:
        g, lg = idx.shape
        q, k, v = (x[idx].transpose(1, 2) for x in (query, key, value))  # [G, n, Lg, d]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                           enable_gqa=nq != nkv)  # [G, nq, Lg, d]
        outs.append(o.transpose(1, 2).reshape(g * lg, nq, dv)[real])  # [sum L, nq, dv]
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out if plan.inverse is None else out[plan.inverse]


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
        table = getattr(packed_seq_params, "rotary_pos_emb", None)
        if table is not None:  # RoPE of the row's own positions (SegmentedSeqParams)
            from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
            from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
                _yarn_get_concentration_factor_from_config as yarn_mscale)

            query, key = (apply_rotary_pos_emb(x[:, None], table, config=self.config,
                                               mscale=yarn_mscale(self.config))[:, 0]
                          for x in (query, key))  # as megatron ropes [s, b=1, n, d]
        # query-key layer scaling divides the scale by a coefficient the softmax multiplies back
        scale = self.softmax_scale * (self.scale_mask_softmax.scale or 1.0)
        out = segment_attention(query, key, value, packed_seq_params.cu_seqlens_q, scale,
                                plan=getattr(packed_seq_params, "plan", None))
        return out.reshape(out.shape[0], -1)  # [t, nq * d]


def use_packed_core_attention(spec) -> None:
    """Swap megatron's local ``DotProductAttention`` for :class:`PackedDotProductAttention` in
    every layer of ``spec`` (a block spec); other core attentions (MLA's, TE's) are kept."""
    for layer in spec.layer_specs:
        sub = getattr(layer.submodules.self_attention, "submodules", None)
        if getattr(sub, "core_attention", None) is DotProductAttention:
            sub.core_attention = PackedDotProductAttention


def _cores_are(policy, core_type) -> bool:
    """Whether every attention layer of ``policy`` runs a core attention of ``core_type``
    (:class:`PackedDotProductAttention`, or r1fast's MLACoreAttention: the cores that attend
    per packed sequence)."""
    return all(isinstance(layer.self_attention.core_attention, core_type)
               for layer in policy.gpt.decoder.layers)


@dataclasses.dataclass
class SegmentedSeqParams(PackedSeqParams):
    """megatron's ``thd`` packed-sequence parameters plus what :class:`PackedDotProductAttention`
    reuses in every layer of one micro-batch."""

    plan: Optional[SegmentPlan] = None
    """The :func:`segment_plan` of ``cu_seqlens_q``."""
    rotary_pos_emb: Optional[torch.Tensor] = None
    """RoPE angles of the row's tokens [T, 1, 1, dim] (``Policy.rotary_table`` of the restarted
    positions). The policy then gives megatron no table, and the core attention ropes query
    and key itself: megatron's ``thd`` RoPE would slice the table per sequence (a Python loop
    per layer and per tensor) to apply the same angles."""


def packed_inputs(policy, cu_seqlens: torch.Tensor, length: int):
    """``(position_ids [1, T], attention_mask, packed_seq_params)`` of one packed micro-batch of
    ``T = length`` tokens for ``policy`` (on its device): restarted positions, then either the
    block-diagonal mask [1, 1, T', T'] (``policy.packed_attention == "mask"``; T' = T padded
    for sequence parallelism, the pads hidden) and None, or None and
    :class:`SegmentedSeqParams` (``"segments"``; the pads one more sequence), or, for MLA on
    r1fast's MLACoreAttention, no mask and the thd boundaries MLA would find in the positions
    (the sequence-parallel pads continue the last sequence, after every real token of it);
    there, a row that holds one sequence gives ``(None, None, None)``: its positions are the
    default ``0 .. T-1``, which MLA then takes without reading them off the device.
    Everything is derived on the host from ``cu_seqlens`` (give the host copy) and sent to
    the device without a wait (r1fast.policy.packed). Core attentions other than r1fast's
    (Transformer Engine's) are refused."""
    mode = getattr(policy, "packed_attention", "segments")
    if mode not in MODES:
        raise ValueError(f"Policy.packed_attention must be one of {MODES}, got {mode!r}")
    if cu_seqlens.dim() == 2 and cu_seqlens.shape[0] != 1:
        raise ValueError(f"cu_seqlens: one packed row per micro-batch, got "
                         f"{list(cu_seqlens.shape)}")
    from r1fast.policy.mla import MLACoreAttention, mla_thd_params

    if not (_cores_are(policy, PackedDotProductAttention)
            or _cores_are(policy, MLACoreAttention)):
        # Transformer Engine's core attention, built by megatron with attn_mask_type=causal,
        # does not take an explicit mask: packed sequences would attend to each other
        raise ValueError("packed micro-batches (parallel.max_tokens_per_microbatch > 0) need "
                         "r1fast's local core attention, and this policy's layers run "
                         "Transformer Engine's, whose causal attention does not take r1fast's "
                         "block-diagonal mask (the packed sequences would attend to each "
                         "other); set parallel.max_tokens_per_microbatch = 0 for padded rows")
    padded = policy._padded_len(length)
    if policy.model_cfg.is_mla and mode == "segments":
        # MLA ropes the restarted positions itself from thd boundaries (the ones
        # r1fast.policy.mla.mla_packed_params would read off the positions, built here on the
        # host); its core attention attends per sequence from them (no mask)
        thd = mla_thd_params(cu_seqlens, padded, policy.device)
        if thd is None:  # one sequence: explicit positions would only make MLA read them
            return None, None, None
        pos, _ = packed_layout(cu_seqlens, length, policy.device, mask=False)
        return pos, None, thd
    if mode == "mask":
        pos, mask = packed_layout(cu_seqlens, length, policy.device)
        if padded > length:  # pads see nothing real, and nothing real sees them
            mask = F.pad(mask, (0, padded - length, 0, padded - length), value=True)
        return pos, mask, None
    cu = cu_seqlens.reshape(-1).to("cpu", torch.int64)  # the trainer's host copy: no wait
    if padded > length:  # the pads attend among themselves (their outputs are unused)
        cu = torch.cat([cu, cu.new_tensor([padded])])
    params = thd_params(cu, padded, policy.device)  # checks the boundaries
    pos, _ = packed_layout(cu, padded, policy.device, mask=False)  # [1, T'], restarting
    params.rotary_pos_emb = policy.rotary_table(pos)
    return pos[:, :length], None, params


def thd_params(cu_seqlens: torch.Tensor, length: int,
               device: torch.device | None = None) -> SegmentedSeqParams:
    """:class:`SegmentedSeqParams` (megatron's ``thd``, with the segment plan) of packed
    boundaries ``cu_seqlens`` [S+1] rising from 0 to ``length``, on ``device`` (default: where
    ``cu_seqlens`` is); no RoPE table. Planned on the host (give the host copy: no wait)."""
    device = device or cu_seqlens.device
    host = cu_seqlens.reshape(-1).to("cpu", torch.int64)
    plan = segment_plan(host, length, device)
    longest = int(host.diff().max())  # on the host: no wait (segment_plan checked S >= 1)
    cu = to_device_once(device, [host])[0].to(torch.int32)
    return SegmentedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                              max_seqlen_q=longest, max_seqlen_kv=longest, plan=plan)
