"""The core attention of KV-cached decoding: r1fast's own per-layer cache of RoPE'd keys.

Why not megatron's static inference context. It caches keys *before* RoPE and, at every step,
re-applies RoPE to the whole cached prefix, then (local attention) repeats the keys and values
of every query group to all its heads: three extra passes over the whole cache per layer per
token, which on the CPU cost more than the attention itself (measured: ~60% of a decode step at
32 rows x 300 slots on the tiny MoE) and on a GPU are pure memory traffic.

What this module does instead. During a decode forward the decoder runs megatron's layers
*without* an inference context and hands them the rotary table of the new slots only, so each
layer's attention computes query/key/value of the new tokens, applies RoPE to them (megatron's
own code, per-row positions) and calls its core attention. :class:`CachedAttention`, swapped in
as that core attention while decoding, writes the new keys/values into its layer's cache at the
current slot offset and attends over the cache's slots ``0 .. offset+n-1`` with
``scaled_dot_product_attention`` under the decoder's boolean mask (True = hidden; converted
to SDPA's True = attend). Keys are cached after RoPE, so nothing is recomputed for old slots.

Grouped-query heads without copies of the cache, and without ``enable_gqa``: PyTorch's fused
CUDA kernels do not take ``enable_gqa`` together with an explicit mask, and SDPA then falls
back to its math kernel, which repeats the keys and values to every head and holds fp32
``[B, heads, n, end]`` scores (a prefill of 64k prompt tokens of a 32-head model: 4 GiB per
copy per layer). Instead the ``rep`` query heads that share a key/value group are laid out as
``rep`` times more queries of that group (``[B, groups, rep * n, d]``, a copy of the query
only) with the mask's rows tiled to match, which a memory-efficient kernel takes as it is.

Cache layout: ``[capacity, B, groups/tp, head_dim]`` per layer (megatron's), NaN-filled at
allocation so a slot read before it is written shows up; rows are compacted in place
(:meth:`KVStore.keep`).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F


class KVStore:
    """The caches of every layer and the step's placement (slot offset)."""

    def __init__(self) -> None:
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        """{layer_number: (keys, values)}, each [capacity, B, groups/tp, head_dim]."""
        self.offset = 0
        """First slot of the current forward."""

    def allocate(self, attentions, capacity: int, batch: int, dtype, device) -> None:
        """NaN-filled buffers (reused, re-poisoned, when the shape is unchanged)."""
        for attn in attentions:
            shape_k = (capacity, batch, attn.num_query_groups_per_partition, attn.key_hidden_size)
            shape_v = shape_k[:3] + (attn.val_hidden_size,)
            old = self.buffers.get(attn.layer_number)
            if old is not None and tuple(old[0].shape) == shape_k and old[0].dtype == dtype:
                old[0].fill_(float("nan"))
                old[1].fill_(float("nan"))
                continue
            self.buffers[attn.layer_number] = (
                torch.full(shape_k, float("nan"), dtype=dtype, device=device),
                torch.full(shape_v, float("nan"), dtype=dtype, device=device))

    def keep(self, rows: torch.Tensor, filled: int) -> None:
        """Move the slots 0 .. filled-1 of ``rows`` to the front of the batch axis."""
        m = rows.shape[0]
        for keys, values in self.buffers.values():
            keys[:filled, :m] = keys[:filled, rows]  # the right side is a copy: no aliasing
            values[:filled, :m] = values[:filled, rows]


class CachedAttention(torch.nn.Module):
    """Core attention of layer ``layer_number`` reading and writing ``store`` (module doc).

    ``forward(query [n, B', heads, d], key [n, B', groups, d], value [n, B', groups, dv],
    attention_mask [B'|1, 1, n, offset+n] bool, True = hidden)`` -> ``[n, B', heads * dv]``."""

    def __init__(self, store: KVStore, layer_number: int, softmax_scale: Optional[float]):
        super().__init__()
        self.store = store
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Any = None,
                attention_bias: Any = None, packed_seq_params: Any = None) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("CachedAttention: attention_bias / packed_seq_params are not "
                             "supported while decoding")
        if attention_mask is None:
            raise ValueError("CachedAttention needs the decoder's explicit attention_mask")
        store = self.store
        n, b = query.shape[:2]
        start, end = store.offset, store.offset + n
        keys, values = store.buffers[self.layer_number]
        keys[start:end, :b] = key
        values[start:end, :b] = value
        heads, groups = query.shape[2], keys.shape[2]
        rep = heads // groups  # query heads per key/value group (megatron: group = head // rep)
        # grouped heads become more queries of their group: [B', groups, rep * n, d], row
        # r * n + i = head r of the group at slot i (module doc: no enable_gqa with a mask)
        q = query.permute(1, 2, 0, 3).reshape(b, groups, rep * n, query.shape[-1])
        k = keys[:end, :b].permute(1, 2, 0, 3)  # [B', groups, end, d]
        v = values[:end, :b].permute(1, 2, 0, 3)
        attend = ~attention_mask  # [B'|1, 1, n, end], True = attend
        if rep > 1:
            attend = attend.repeat(1, 1, rep, 1)  # [B'|1, 1, rep * n, end]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend,
                                             scale=self.softmax_scale)  # [B', groups, rep*n, dv]
        out = out.reshape(b, heads, n, out.shape[-1])  # [B', heads, n, dv]
        return out.permute(2, 0, 1, 3).reshape(n, b, -1)  # [n, B', heads * dv]
