"""KV-cached decoding of multi-head latent attention (MLA): a cache of the compressed latent, and
attention in the absorbed form, as DeepSeek-V2/V3 serve it.

What MLA computes (per layer, heads ``h``, for a token ``t`` with hidden state ``x_t``)::

    c_t   = kv_norm(x_t W_dkv)[:kv_lora]                      # the latent,  [kv_lora]
    kr_t  = rope(x_t W_dkv[kv_lora:], pos_t)                  # shared RoPE key, [rope]
    k_t^h = [c_t W_uk^h, kr_t],   v_t^h = c_t W_uv^h          # per head: [nope + rope], [dv]
    q_s^h = [qn_s^h, rope(qr_s^h, pos_s)]                     # from x_s (q LoRA or not)
    o_s^h = sum_t softmax_t(q_s^h . k_t^h * scale) v_t^h

Megatron's module (training, and the policy's full forward) expands ``k`` and ``v`` for every
head. Decoding does not have to: everything per head that touches a cached token is a linear
map of ``(c_t, kr_t)``, so the cache holds only those ``kv_lora + rope`` numbers per token per
layer (DeepSeek-V3: 576 numbers instead of 128 heads x (192 + 128) = 40960, 71x less), and the
up projections are *absorbed* into the query and the output::

    q_s^h . k_t^h = (qn_s^h W_uk^h^T) . c_t + rope(qr_s^h) . kr_t      # q_abs^h = qn W_uk^T
    o_s^h         = (sum_t p_st^h c_t) W_uv^h                          # attend in latent space

That is the same sum in another order (fp32 scores and softmax, as MLACoreAttention), not an
approximation; tests compare it with prefix recomputation through the policy's own forward.

Absorbing pays per (query, cached token) pair, ``2 kv_lora + rope`` multiply-adds per head
against ``nope + rope + dv``, and saves expanding each cached token (``kv_lora (nope + dv)``). A
decode step (one query over the cache) is cheapest absorbed; a prefill (n queries over the n
tokens it writes) is cheapest *expanded*: per-head keys and values from the latent, as in
training (V3: 2.7x fewer multiply-adds at 1k tokens, 3.4x for long ones), attended by
``scaled_dot_product_attention`` (on a GPU, where a fused kernel takes these head sizes and
the mask, the prefill's ``[B, h, P, P]`` fp32 scores are never held; unmeasured there). Each
forward takes the cheaper form; the cache is the latent either way.

:class:`LatentMLAAttention` is swapped in for a layer's ``MLASelfAttention`` while decoding (the
policy's modules, weights included, are untouched). It reuses that module's own projections and
norms, so TP and sequence parallelism come with them: the duplicated down projections run on
this rank's sequence slice and the latent is gathered over the sequence (every TP rank keeps the
whole latent, as it keeps every token of a KV cache); the q up projection and ``W_uk``/``W_uv``
hold this rank's heads; the output projection reduce-scatters. RoPE is applied here at per-row
positions (megatron's MLA ropes ``0..L-1`` itself), so MLA decodes ragged prompts (left-padded
prefill) like every other attention.
"""
from __future__ import annotations

from typing import Any, Optional

import torch


class LatentStore:
    """Every MLA layer's latent cache and the step's placement (slot offset, row positions)."""

    def __init__(self) -> None:
        self.buffers: dict[int, torch.Tensor] = {}
        """{layer_number: [capacity, B, kv_lora + rope]}: normed latent, then the RoPE'd key."""
        self.offset = 0
        """First slot of the current forward."""
        self.positions: Optional[torch.Tensor] = None
        """[B', n] RoPE positions of the current forward's slots (per row)."""
        self.capacity = 0
        """Cache slots: every position a forward can ask for is below it."""
        self._table: Optional[tuple[torch.Tensor, float]] = None  # [capacity, rope], mscale
        self._rope: Optional[tuple[torch.Tensor, float]] = None  # the current forward's

    def allocate(self, attentions, capacity: int, batch: int, dtype, device) -> None:
        """NaN-filled buffers (reused, re-poisoned, when the shape is unchanged)."""
        for attn in attentions:
            cfg = attn.config
            shape = (capacity, batch, cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim)
            old = self.buffers.get(attn.layer_number)
            if old is not None and tuple(old.shape) == shape and old.dtype == dtype:
                old.fill_(float("nan"))
                continue
            self.buffers[attn.layer_number] = torch.full(shape, float("nan"), dtype=dtype,
                                                         device=device)
        self.capacity, self._table = capacity, None

    def keep(self, rows: torch.Tensor, filled: int) -> None:
        """Move the slots 0 .. filled-1 of ``rows`` to the front of the batch axis."""
        m = rows.shape[0]
        for latent in self.buffers.values():
            latent[:filled, :m] = latent[:filled, rows]  # the right side is a copy

    def begin(self, offset: int, positions: torch.Tensor) -> None:
        """A forward over slots ``offset ..`` at RoPE ``positions`` [B', n] starts."""
        self.offset, self.positions, self._rope = offset, positions, None

    def rope_table(self, attn) -> tuple[torch.Tensor, float]:
        """(freqs [n, B', 1, rope] of the current positions, mscale) from ``attn``'s own rotary
        module (plain or YaRN). Every layer of a model has the same one: its table over all
        ``capacity`` slots is built once per allocation (no host read of the positions), and
        indexed once per forward."""
        if self._table is None:
            out = attn.rotary_pos_emb(self.capacity)
            table, mscale = out if isinstance(out, tuple) else (out, 1.0)  # [cap, 1, 1, rope]
            self._table = (table[:, 0, 0], mscale)
        if self._rope is None:
            table, mscale = self._table
            self._rope = (table[self.positions.t()][:, :, None], mscale)  # [n, B', 1, rope]
        return self._rope


def attend_absorbed(q_nope: torch.Tensor, q_rope: torch.Tensor, keys: torch.Tensor,
                    mask: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """MLA attention over cached latents in the absorbed form: ``W_uk`` folded into the query,
    scores and the weighted sum in latent space, ``W_uv`` applied after.

    q_nope [B', h, n, nope], q_rope [B', h, n, rope] (after RoPE), keys [B', end, kv_lora +
    rope] (the cache: normed latent, RoPE'd key), mask [B'|1, 1, n, end] bool (True =
    hidden), w_uk [h, nope, kv_lora], w_uv [h, dv, kv_lora], all fp32 -> [n, B', h, dv] fp32.
    """
    kv_lora = w_uk.shape[-1]
    b, h, n = q_nope.shape[:3]
    q_cat = torch.cat([torch.einsum("bhsd,hdc->bhsc", q_nope, w_uk), q_rope], dim=-1)
    # every head reads the same latent: heads become more queries ([B', h * n, c]) so the
    # batched products read the cache as it is; a [B', h, ...] @ [B', 1, ...] product would
    # copy the whole fp32 latent once per head (matmul expands broadcast batch dimensions)
    q_cat = q_cat.reshape(b, h * n, q_cat.shape[-1])
    scores = torch.bmm(q_cat, keys.transpose(1, 2)).view(b, h, n, -1) * scale  # [B', h, n, end]
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    out = torch.bmm(probs.view(b, h * n, -1), keys[..., :kv_lora])  # [B', h * n, kv_lora]
    return torch.einsum("bhsc,hdc->sbhd", out.view(b, h, n, kv_lora), w_uv)


def attend_expanded(q_nope: torch.Tensor, q_rope: torch.Tensor, keys: torch.Tensor,
                    mask: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """The same attention with per-head keys and values expanded from the cached latents, as
    in training, through ``scaled_dot_product_attention`` (PyTorch picks its kernel): the
    arguments and result of :func:`attend_absorbed`."""
    kv_lora, h = w_uk.shape[-1], q_nope.shape[1]
    c, k_rope = keys[..., :kv_lora], keys[:, None, :, kv_lora:]
    k_nope = torch.einsum("btc,hdc->bhtd", c, w_uk)  # [B', h, end, nope]
    k = torch.cat([k_nope, k_rope.expand(-1, h, -1, -1)], dim=-1)  # [B', h, end, nope + rope]
    values = torch.einsum("btc,hdc->bhtd", c, w_uv)  # [B', h, end, dv]
    out = torch.nn.functional.scaled_dot_product_attention(
        torch.cat([q_nope, q_rope], dim=-1), k, values, attn_mask=~mask, scale=scale)
    return out.permute(2, 0, 1, 3)  # [n, B', h, dv]


class LatentMLAAttention(torch.nn.Module):
    """Decode-time stand-in for megatron's ``MLASelfAttention`` ``attn`` (module doc): same call
    as the transformer layer makes, ``(hidden [n(/tp), B', H], attention_mask [B'|1, 1, n,
    offset+n] bool, True = hidden, ...)`` -> ``(output [n(/tp), B', H], bias)``."""

    form = "auto"
    """"auto" (per forward, the form with fewer multiply-adds: :meth:`expands`), "absorbed"
    or "expanded" (both exact; tests force each)."""

    def __init__(self, attn, store: LatentStore) -> None:
        super().__init__()
        cfg = attn.config
        if getattr(attn.linear_kv_up_proj, "bias", None) is not None:
            raise ValueError("LatentMLAAttention: linear_kv_up_proj has a bias; absorbing it "
                             "is not implemented")
        if getattr(cfg, "apply_rope_fusion", False):
            raise ValueError("LatentMLAAttention: apply_rope_fusion must be off while decoding")
        self.attn = attn  # not a submodule copy: the policy's own weights
        self.store = store
        self.layer_number = attn.layer_number
        self.heads = attn.num_attention_heads_per_partition
        self.nope, self.rope = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim
        self.kv_lora, self.v_dim = cfg.kv_lora_rank, cfg.v_head_dim
        self.scale = attn.softmax_scale

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_uk [h, nope, kv_lora], W_uv [h, dv, kv_lora]) of this rank's heads."""
        w = self.attn.linear_kv_up_proj.weight  # [h * (nope + dv), kv_lora]
        w = w.view(self.heads, self.nope + self.v_dim, self.kv_lora)
        return w[:, :self.nope], w[:, self.nope:]

    def _query(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, B', h, nope + rope] before RoPE (the q up projection gathers the sequence)."""
        attn = self.attn
        if attn.config.q_lora_rank is not None:
            q_c, _ = attn.linear_q_down_proj(hidden)
            q, _ = attn.linear_q_up_proj(attn.q_layernorm(q_c))
        else:
            q, _ = attn.linear_q_proj(hidden)
        return q.view(*q.shape[:2], self.heads, self.nope + self.rope)

    def _latent(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed latent [n, B', kv_lora], RoPE key [n, B', 1, rope] before RoPE), over the
        whole step on every TP rank."""
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        attn = self.attn
        kv, _ = attn.linear_kv_down_proj(hidden)  # [n(/tp), B', kv_lora + rope]
        c, k_rope = torch.split(kv, [self.kv_lora, self.rope], dim=-1)
        c = attn.kv_layernorm(c)
        if attn.config.sequence_parallel and attn.pg_collection.tp.size() > 1:
            c = gather_from_sequence_parallel_region(c, group=attn.pg_collection.tp)
            k_rope = gather_from_sequence_parallel_region(k_rope, group=attn.pg_collection.tp)
        return c, k_rope[:, :, None]

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
                key_value_states: Any = None, inference_context: Any = None,
                packed_seq_params: Any = None, **_: Any):
        if key_value_states is not None or inference_context is not None \
                or packed_seq_params is not None:
            raise ValueError("LatentMLAAttention: only self-attention steps of the KV-cache "
                             "decoder (no inference_context, no packed_seq_params)")
        if attention_mask is None:
            raise ValueError("LatentMLAAttention needs the decoder's explicit attention_mask")
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        attn, store = self.attn, self.store
        cp = attn.pg_collection.cp
        table, mscale = store.rope_table(attn)  # [n, B', 1, rope]
        q = self._query(hidden_states)  # [n, B', h, nope + rope]
        c, k_rope = self._latent(hidden_states)
        q_nope, q_rope = torch.split(q, [self.nope, self.rope], dim=-1)
        q_rope = apply_rotary_pos_emb(q_rope, table, config=attn.config, mscale=mscale,
                                      cp_group=cp)
        k_rope = apply_rotary_pos_emb(k_rope, table, config=attn.config, mscale=mscale,
                                      cp_group=cp)
        n, b = q.shape[:2]
        start, end = store.offset, store.offset + n
        latent = store.buffers[self.layer_number]
        latent[start:end, :b] = torch.cat([c, k_rope[:, :, 0]], dim=-1)
        keys = latent[:end, :b].permute(1, 0, 2).float()  # [B', end, c + rope]
        q_nope = q_nope.permute(1, 2, 0, 3).float()  # [B', h, n, nope]
        q_rope = q_rope.permute(1, 2, 0, 3).float()  # [B', h, n, rope]
        attend = attend_expanded if self.expands(n, end) else attend_absorbed
        w_uk, w_uv = (w.float() for w in self._up_weights())
        out = attend(q_nope, q_rope, keys, attention_mask, w_uk, w_uv, self.scale)
        out = out.to(hidden_states.dtype)
        return attn.linear_proj(out.reshape(n, b, self.heads * self.v_dim))

    def expands(self, queries: int, keys: int) -> bool:
        """Whether ``queries`` queries over ``keys`` cached tokens cost fewer multiply-adds
        per head in the expanded form (module doc) than in the absorbed one: true for a
        prefill (queries == keys), false for a decode step (one query). ``form`` forces one."""
        if self.form != "auto":
            return self.form == "expanded"
        return expanded_is_cheaper(self.kv_lora, self.nope, self.v_dim, queries, keys)


def expanded_is_cheaper(kv_lora: int, nope: int, v_dim: int, queries: int, keys: int) -> bool:
    """Whether ``queries`` queries over ``keys`` cached tokens cost fewer multiply-adds per
    head in the expanded form than in the absorbed one (module doc); the planner's prefill term
    asks it too."""
    per_key = kv_lora * (nope + v_dim)  # expanding a cached token
    per_pair = 2 * kv_lora - nope - v_dim  # what absorbing adds per pair
    return per_key * (keys - queries) < queries * keys * per_pair


def latent_attentions(policy, store: LatentStore) -> dict[int, LatentMLAAttention]:
    """{layer position: the decode-time attention} for every MLA layer of ``policy``."""
    return {i: LatentMLAAttention(layer.self_attention, store)
            for i, layer in enumerate(policy.gpt.decoder.layers)}
