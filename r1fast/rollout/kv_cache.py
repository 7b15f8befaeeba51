"""KV-cached decoding from the megatron-core policy: linear time per token, ragged prompts
prefilled once at their own lengths, finished rows dropped, routing recorded for replay.

How it works. Each decode forward runs megatron's own modules -- embedding, ``gpt.decoder``
(the transformer layers), then the same fp32, TP-gathered output head as ``Policy.logits`` --
on the new slots only, with r1fast's :class:`r1fast.rollout.attention.CachedAttention` as
every layer's core attention: megatron computes the new tokens' query/key/value and applies
RoPE at the rotary table we hand it (the new slots' positions), the cached core attention
writes keys/values into its layer's cache at the current slot offset and attends over the
slots written so far (keys cached after RoPE: nothing is recomputed for old slots; see that
module for why megatron's static inference context, which re-ropes the whole cache every step,
is not used).

Ragged prompts: a left-padded prefill with per-row positions. All rows share one slot offset,
so prompts of different lengths are left-padded to the longest (``P``): row ``b`` has
``pad_b`` pad slots, then its prompt, so every row's last prompt token sits in slot ``P-1`` and
every row generates from slot ``P`` on, one slot per step. The position of slot ``s`` in row
``b`` is ``s - pad_b`` (per-row RoPE), and the attention mask hides pad slots from every real
query: each row computes exactly what it would alone. One prefill forward replaces the
``P - min_len`` one-token steps the shared-position scheme spent feeding longer prompts.

Details, and why:

1. The mask. An explicit boolean mask ``[B|1, 1, n', offset+n']`` (True = hidden): key ``j``
   is hidden from query slot ``q`` when ``j > q`` or ``j`` is a left pad of the row
   (``j < pad_b``) other than ``q`` itself (a pad query sees itself only, so no softmax row is
   empty). Exact causality for any step size, rewinds included.
2. Sequence parallelism. With TP > 1 on an MoE model the policy runs with sequence
   parallelism, so a step's length must divide by tp: a step is right-padded to a multiple of
   tp, as the training forward pads. Pad slots are written beyond the real ones, lie in every
   real query's causal future and are overwritten by the next step; the cache holds
   ``max_len + tp - 1`` slots. Routers see one token per row per rank, as in training.
3. Cache allocation and compaction. Buffers ``[capacity, B, groups/tp, head_dim]`` are
   NaN-filled at allocation, so a slot read before it is written shows up as NaN logits.
   :meth:`KVCacheDecoder.keep` drops finished rows by moving the kept rows' slots to the front
   of the batch axis, so later steps cost what the live rows cost.

Layouts. Any TP/EP/DP; pipeline parallelism too: each stage keeps the cache of its own layers,
hidden states go stage to stage with point-to-point sends (``[n'/tp, B', H]``), and the last
stage's samples are broadcast over the pipeline group (:meth:`KVCacheDecoder.share`). The
cached core attention replaces whatever core attention the policy was built with (megatron's
local one, or Transformer Engine's on a GPU, which would ignore the decode mask) during
decoding only; core attention has no weights. Multi-latent attention (MLA) layers decode
through :class:`r1fast.rollout.mla_latent.LatentMLAAttention` instead, swapped in for the whole
self-attention: it caches MLA's compressed latent (``kv_lora + rope`` per token, not per head),
attends in the absorbed form and applies RoPE at per-row positions itself, so MLA takes the
same ragged loop. Routing capture works in both loops. Sliding-window and flash-decode
configurations are refused.

:func:`make_decoder` returns this decoder; prefix recomputation
(:class:`r1fast.rollout.recompute.RecomputeDecoder`, quadratic, full logits per token) is only
ever used when asked for explicitly, and then with a WARNING.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from r1fast.ops._validate import check_tensor

log = logging.getLogger("r1fast.rollout")


def kv_cache_unsupported_reason(policy) -> str | None:
    """Why :class:`KVCacheDecoder` cannot serve ``policy`` (None when it can)."""
    config = policy.config
    if getattr(config, "flash_decode", False) or getattr(config, "window_size", None):
        return ("KVCacheDecoder supports full causal attention without flash_decode, got "
                f"flash_decode={getattr(config, 'flash_decode', False)}, "
                f"window_size={getattr(config, 'window_size', None)}")
    return None


@contextlib.contextmanager
def _inference(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, routers skip load statistics) and no autograd, restoring the
    caller's mode: the trainer's policy is in train mode between rollouts. Switching walks
    every submodule, so a rollout switches once (:meth:`KVCacheDecoder.session`), not per
    step."""
    was_training = module.training
    if was_training:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            module.train(True)


def _decode_cores(policy, store) -> dict[int, torch.nn.Module]:
    """{layer position: the core attention used while decoding}: a CachedAttention on
    ``store`` for every layer, whatever the policy's own (megatron's local one, Transformer
    Engine's). MLA layers swap their whole self-attention instead (r1fast.rollout.mla_latent)."""
    from r1fast.rollout.attention import CachedAttention

    out = {}
    for i, layer in enumerate(policy.gpt.decoder.layers):
        attn = layer.self_attention
        scale = attn.config.softmax_scale or attn.hidden_size_per_attention_head ** -0.5
        out[i] = CachedAttention(store, attn.layer_number, scale)
    return out


class KVCacheDecoder:
    """The sampler's decoder with a per-layer KV cache (module doc).

    Ragged protocol (:func:`r1fast.rollout.engine.generate_ragged`): ``prefill(tokens [B, P]
    left-padded, pads [B], max_len)`` -> logits ``[B, V]`` of slot ``P-1``; ``decode(tokens
    [B'])`` -> ``[B', V]`` of the next slot; ``keep(rows)`` drops rows; ``share(tokens, logp)``
    gives every pipeline stage the last stage's samples. Logits come back on the policy's
    device, fp32, and only on the last pipeline stage (None elsewhere).

    Shared-position protocol (``r1fast.rollout.sampler``'s loop): ``reset(B, max_len)``;
    ``step(tokens[B, n], offset)`` runs positions ``offset .. offset+n-1`` against the cached
    prefix and returns their logits ``[B, n, V]`` fp32 on ``tokens.device`` on every rank; a
    step may rewind (an offset below the filled slots overwrites the tail).

    Every rank of a TP/EP/PP group must make the same calls (the forward is collective).
    """

    def __init__(self, policy, *, prefill_tokens: int = 0, experts: str = "auto") -> None:
        from r1fast.rollout.attention import KVStore
        from r1fast.rollout.mla_latent import LatentStore, latent_attentions

        reason = kv_cache_unsupported_reason(policy)
        if reason is not None:
            raise ValueError(reason)
        if not isinstance(prefill_tokens, int) or prefill_tokens < 0:
            raise ValueError(f"prefill_tokens must be an int >= 0 (0: one forward), got "
                             f"{prefill_tokens!r}")
        from r1fast.policy.local_experts import check_expert_mode

        self.experts = check_expert_mode(experts)
        """How a session computes the routed experts (r1fast.policy.local_experts): "grouped"
        kernels (no per-expert launches, counts kept on the device), megatron's "sequential"
        loop, or "auto" (grouped on a GPU)."""
        self.prefill_tokens = prefill_tokens
        """Tokens (rows x positions) one prefill forward may hold; 0: the whole prompt batch
        at once. Longer batches are prefilled in slices of positions, each attending to the
        cache of the slices before it, like a multi-token step."""
        self.policy = policy
        self.attentions = [layer.self_attention for layer in policy.gpt.decoder.layers]
        self.mla = policy.model_cfg.is_mla
        self.store = LatentStore() if self.mla else KVStore()
        """The cache: keys/values after RoPE (r1fast.rollout.attention), or MLA's latent
        (r1fast.rollout.mla_latent)."""
        self._cores = {} if self.mla else _decode_cores(policy, self.store)
        self._latent = latent_attentions(policy, self.store) if self.mla else {}
        # one step's length must divide by tp under sequence parallelism (see module doc)
        self.multiple = policy.info.tp if policy.sequence_parallel else 1
        self.ragged = True
        """Rows may have their own positions (left-padded prefill; r1fast.rollout.engine)."""
        self.batch_size = 0
        """Rows in the cache now (after keep(), the live rows)."""
        self.max_len = 0
        self.filled = 0
        """Slots 0 .. filled-1 are in the cache."""
        self.pads: Optional[torch.Tensor] = None  # [B] int64 left pads (device)
        self._has_pads = False
        self.recorder = None
        """A r1fast.rollout.routing.RoutingRecorder while routing is recorded."""

    @property
    def device(self) -> torch.device:
        """Where the decoder's tensors live (the policy's device)."""
        return self.policy.device

    @property
    def capacity(self) -> int:
        """Cache slots: max_len plus room for the padding of the last step."""
        return self.max_len + self.multiple - 1

    def kv_buffers(self) -> dict:
        """The cache: ``{layer_number: (keys, values)}``, each ``[capacity, B, groups/tp, d]``
        (keys after RoPE); under MLA ``{layer_number: latent [capacity, B, kv_lora + rope]}``."""
        if self.pads is None:
            raise ValueError("KVCacheDecoder: call reset(batch_size, max_len) first")
        return self.store.buffers

    # -- setting up ---------------------------------------------------------------------------
    def reset(self, batch_size: int, max_len: int, pads: Optional[torch.Tensor] = None) -> None:
        """Allocate (or re-poison) the cache for ``batch_size`` rows of ``max_len`` slots;
        ``pads`` [B] are the rows' left pads (default none: shared positions)."""
        limit = self.policy.model_cfg.max_position_embeddings
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(max_len, int) or not 1 <= max_len <= limit:
            raise ValueError(f"max_len must be an int in [1, max_position_embeddings={limit}], "
                             f"got {max_len!r}")
        self.batch_size, self.max_len, self.filled = batch_size, max_len, 0
        cap, device = self.capacity, self.policy.device
        dtype = self.policy.config.params_dtype
        self.store.allocate(self.attentions, cap, batch_size, dtype, device)
        if pads is None:
            self.pads, self._has_pads = torch.zeros(batch_size, dtype=torch.long,
                                                    device=device), False
        else:
            self.pads, self._has_pads = pads.to(device, torch.long), True

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Context of a whole rollout: eval mode and no autograd once for all its steps, and
        the MoE experts as the decoder's ``experts`` asks."""
        from r1fast.policy.local_experts import grouped_experts

        with _inference(self.policy.module), grouped_experts(self.policy.gpt, self.experts):
            yield

    # -- the ragged protocol ------------------------------------------------------------------
    def prefill_width(self, rows: int, prompt_len: int) -> int:
        """Positions per forward of a prefill of ``rows`` prompts of ``prompt_len`` slots."""
        return prefill_width(rows, prompt_len, self.prefill_tokens, self.multiple)

    def prefill(self, tokens: torch.Tensor, pads: torch.Tensor, max_len: int,
                dest: Optional[torch.Tensor] = None, *,
                width: Optional[int] = None) -> Optional[torch.Tensor]:
        """Reset for ``tokens.shape[0]`` rows of ``max_len`` slots and run the left-padded
        prompts ``tokens [B, P]`` (row b's prompt in slots ``pads[b] .. P-1``); returns the
        logits ``[B, V]`` of slot ``P-1`` (last stage; None elsewhere). ``dest [B, P]``:
        routing destinations of the tokens (-1: not recorded). Over ``prefill_tokens`` tokens
        the positions go in slices, so one forward's transients are those of that many;
        ``width`` sets the positions per slice instead (every rank the same number of
        forwards: r1fast.rollout.engine)."""
        check_tensor("tokens", tokens, ndim=2, dtypes=(torch.int64, torch.int32))
        check_tensor("pads", pads, shape=[tokens.shape[0]], dtypes=(torch.int64, torch.int32))
        if tokens.shape[1] > max_len:
            raise ValueError(f"tokens: {tokens.shape[1]} prompt slots exceed max_len={max_len}")
        if tokens.shape[1] == 0:
            raise ValueError("tokens: no prompt slots (every prompt is empty); a prefill needs "
                             "at least one token per row")
        self.reset(tokens.shape[0], max_len, pads)
        B, P = tokens.shape
        if width is None:
            width = self.prefill_width(B, P)
        elif width < 1 or width % self.multiple and width < P:
            raise ValueError(f"width={width}: positions per prefill slice must be >= 1 and a "
                             f"multiple of {self.multiple} (sequence parallelism)")
        logits = None
        for s0 in range(0, P, width):  # slots s0 .. s1-1 of every row
            s1 = min(P, s0 + width)
            logits = self._forward(tokens[:, s0:s1], s0,
                                   None if dest is None else dest[:, s0:s1], last_only=True)
        return logits

    def decode(self, tokens: torch.Tensor, dest: Optional[torch.Tensor] = None
               ) -> Optional[torch.Tensor]:
        """Feed one token per row (``tokens [B']``, the live rows in :meth:`keep` order) at the
        next slot; logits ``[B', V]`` (last stage; None elsewhere)."""
        check_tensor("tokens", tokens, ndim=1, dtypes=(torch.int64, torch.int32))
        if self.filled + 1 > self.max_len:
            raise ValueError(f"decode: slot {self.filled} exceeds max_len={self.max_len}")
        return self._forward(tokens[:, None], self.filled,
                             None if dest is None else dest[:, None], last_only=True)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the current batch, ascending, on the device): their
        cache slots move to the front of the batch axis."""
        check_tensor("rows", rows, ndim=1, dtypes=(torch.int64,))
        m, f = rows.shape[0], self.filled
        if not 1 <= m <= self.batch_size:
            raise ValueError(f"keep: {m} rows, must be 1..{self.batch_size}")
        rows = rows.to(self.policy.device)
        self.store.keep(rows, f)
        self.pads = self.pads[rows]
        self.batch_size = m

    def share(self, tokens: torch.Tensor, logp: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The last pipeline stage's sampled ``tokens`` / ``logp`` on every stage (as-is at
        pp == 1)."""
        if self.policy.info.pp == 1:
            return tokens, logp
        from megatron.core import parallel_state as ps

        src, group = ps.get_pipeline_model_parallel_last_rank(), self.policy.pp_group
        tokens, logp = tokens.contiguous(), logp.contiguous()
        dist.broadcast(tokens, src=src, group=group)
        dist.broadcast(logp, src=src, group=group)
        return tokens, logp

    # -- routing capture ----------------------------------------------------------------------
    def start_recording(self, total: int) -> None:
        """Record the routing of the next forwards into tables of ``total`` tokens
        (r1fast.rollout.routing)."""
        from r1fast.rollout.routing import RoutingRecorder

        routers = self.policy._routers()
        layers = {r.layer_index: r.config.num_moe_experts for r in routers}
        topk = self.policy.model_cfg.moe_router_topk
        self.recorder = RoutingRecorder(layers, topk, total, self.policy.device)

    def finish_recording(self) -> dict[int, torch.Tensor]:
        """The recorded tables ``{layer: [total, k]}`` (host), combined over TP; stops."""
        rec, self.recorder = self.recorder, None
        if rec is None:
            raise ValueError("finish_recording: start_recording was not called")
        return rec.tables(self.policy.tp_group if self.policy.sequence_parallel else None)

    def _router_dest(self, dest: torch.Tensor, padded: int) -> torch.Tensor:
        """[B', n] destinations -> the [T] rows this rank's routers see (module doc of
        r1fast.rollout.routing): step padding -1, sequence-major, this rank's SP slice."""
        n = dest.shape[1]
        dest = dest.to(self.policy.device, torch.long)
        if padded > n:
            dest = F.pad(dest, (0, padded - n), value=-1)
        rows = dest.t()  # [padded, B']
        if self.policy.sequence_parallel:
            per = padded // self.policy.info.tp
            r = self.policy.info.tp_rank
            rows = rows[r * per:(r + 1) * per]
        return rows.reshape(-1)

    # -- the shared-position protocol ---------------------------------------------------------
    def step(self, tokens: torch.Tensor, offset: int,
             dest: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``dest [B, n]``: routing destinations of the tokens while recording (-1: none)."""
        if self.pads is None:
            raise ValueError("KVCacheDecoder: call reset(batch_size, max_len) before step()")
        check_tensor("tokens", tokens, ndim=2, dtypes=(torch.int64, torch.int32))
        b, n = tokens.shape
        if b != self.batch_size or n < 1:
            raise ValueError(f"tokens must be [batch_size={self.batch_size}, n >= 1], got "
                             f"{list(tokens.shape)}")
        if not isinstance(offset, int) or not 0 <= offset <= self.filled:
            raise ValueError(f"offset must be an int in [0, {self.filled}] (positions before it "
                             f"must already be in the cache), got {offset!r}")
        if offset + n > self.max_len:
            raise ValueError(f"tokens: positions {offset}..{offset + n - 1} exceed "
                             f"max_len={self.max_len} given to reset()")
        logits = self._forward(tokens, offset, dest, last_only=False)
        logits = self.policy._broadcast_from_last_stage(
            logits, (b, n, self.policy.model_cfg.vocab_size), torch.float32)
        return logits.to(tokens.device)

    # -- one forward --------------------------------------------------------------------------
    def _mask(self, offset: int, padded: int) -> torch.Tensor:
        """True = hidden; [1, 1, n', end] without pads, [B', 1, n', end] with (module doc)."""
        device = self.policy.device
        end = offset + padded
        slots = torch.arange(end, device=device)
        query = torch.arange(offset, end, device=device)
        hidden = slots[None, :] > query[:, None]  # [n', end] causal
        if not self._has_pads:
            return hidden[None, None]
        left = slots[None, :] < self.pads[:, None]  # [B', end]
        own = slots[None, :] == query[:, None]  # [n', end]
        return (hidden[None] | (left[:, None, :] & ~own[None]))[:, None]

    def _forward(self, tokens: torch.Tensor, offset: int, dest: Optional[torch.Tensor],
                 last_only: bool) -> Optional[torch.Tensor]:
        """Slots ``offset .. offset+n-1`` of every row; the last stage returns fp32 logits,
        ``[B', V]`` of slot ``offset+n-1`` (``last_only``) or ``[B', n, V]``; None elsewhere."""
        policy, device = self.policy, self.policy.device
        gpt = policy.gpt
        b, n = tokens.shape
        padded = -(-n // self.multiple) * self.multiple
        ids = tokens.to(device, torch.int64)  # [B', n]
        if padded > n:
            ids = F.pad(ids, (0, padded - n))  # [B', padded]
        end = offset + padded
        positions = torch.arange(offset, end, device=device)[None, :] - self.pads[:, None]
        # as the training forward does: routers ignore step pads in statistics
        padding_mask = policy.token_layout.padding_mask(b, n, device)  # [B', padded/sp] or None
        if self.recorder is not None:
            self.recorder.dest = None if dest is None else self._router_dest(dest, padded)
        if self.mla:  # LatentMLAAttention ropes the new slots at their positions itself
            self.store.begin(offset, positions.clamp_min(0))
            rotary = None
        else:  # our cache (CachedAttention); megatron ropes the new slots at their positions
            self.store.offset = offset
            rotary = policy.rotary_table(positions.clamp_min(0))  # [n', B', 1, d]
        with _inference(policy.module), self._decode_modules():
            hidden = self._stage_input(ids, positions.clamp_min(0), b, padded)
            hidden = gpt.decoder(hidden_states=hidden, attention_mask=self._mask(offset, padded),
                                 rotary_pos_emb=rotary,
                                 padding_mask=padding_mask)  # [padded(/tp), B', H]
            logits = None
            if gpt.post_process:
                hidden = policy.head_input(hidden, n)  # [B', n, H], same on every TP rank
                logits = policy.vocab_logits(hidden[:, -1] if last_only else hidden).float()
            else:
                self._send_next(hidden)
        self.filled = offset + n
        return logits

    @contextlib.contextmanager
    def _decode_modules(self) -> Iterator[None]:
        """During a decode forward: the cached core attentions in every layer (MLA: the latent
        self-attentions), and the routing recorder as every router's hook."""
        layers = self.policy.gpt.decoder.layers
        saved = {i: layers[i].self_attention.core_attention for i in self._cores}
        for i, core in self._cores.items():
            layers[i].self_attention.core_attention = core
        for i, latent in self._latent.items():
            layers[i].self_attention = latent
        try:
            if self.recorder is None:
                yield
            else:
                with self.policy._hooked(self.recorder):
                    yield
        finally:
            for i, core in saved.items():
                layers[i].self_attention.core_attention = core
            for i, latent in self._latent.items():
                layers[i].self_attention = latent.attn

    def _stage_input(self, ids: torch.Tensor, positions: torch.Tensor, b: int, padded: int):
        """First stage: the embedding; other stages: the previous stage's hidden states."""
        gpt, policy = self.policy.gpt, self.policy
        if gpt.pre_process:
            return gpt.embedding(input_ids=ids, position_ids=positions)  # [padded(/tp), B', H]
        from megatron.core import parallel_state as ps

        rows = padded // self.multiple if policy.sequence_parallel else padded
        dtype = policy.config.pipeline_dtype or policy.config.params_dtype
        buf = torch.empty(rows, b, policy.config.hidden_size, dtype=dtype, device=policy.device)
        dist.recv(buf, src=ps.get_pipeline_model_parallel_prev_rank())
        gpt.decoder.set_input_tensor(buf)
        return None

    def _send_next(self, hidden: torch.Tensor) -> None:
        from megatron.core import parallel_state as ps

        dist.send(hidden.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())


def prefill_width(rows: int, prompt_len: int, prefill_tokens: int, multiple: int = 1) -> int:
    """Positions per prefill forward of :meth:`KVCacheDecoder.prefill`: the whole prompt, or
    with ``prefill_tokens`` > 0 and more prompt tokens than that, as many positions as fit that
    many tokens (a multiple of ``multiple``, the TP size under sequence parallelism; at least
    one). The planner's prefill term (r1fast.plan.prefill) asks it too."""
    if not prefill_tokens or rows * prompt_len <= prefill_tokens:
        return prompt_len
    return max(1, prefill_tokens // rows // multiple) * multiple


def make_decoder(policy, *, recompute: bool = False, prefill_tokens: int = 0,
                 experts: str = "auto"):
    """The rollout decoder of ``policy``: :class:`KVCacheDecoder` (an error naming the reason
    where it cannot serve the policy), or, with ``recompute=True`` only, prefix recomputation
    (:class:`r1fast.rollout.recompute.RecomputeDecoder`: every step re-runs the whole prefix
    and builds full [B, L, V] logits, quadratic in length), with a WARNING at every call.
    ``prefill_tokens``, ``experts``: the KV-cache decoder's prefill slice and expert kernels
    (:class:`KVCacheDecoder`)."""
    from r1fast.rollout.recompute import RecomputeDecoder

    if recompute and prefill_tokens:
        raise ValueError(f"prefill_tokens={prefill_tokens} is a setting of the KV-cache decoder; "
                         "the prefix-recomputing decoder has no prefill (set it to 0)")
    if recompute and experts == "grouped":
        raise ValueError("experts='grouped' is a setting of the KV-cache decoder; the "
                         "prefix-recomputing decoder runs megatron's experts (set it to 'auto')")
    if recompute:
        log.warning("rollout: sampling by PREFIX RECOMPUTATION (asked for): every token re-runs "
                    "the whole prefix with full logits, 10-100x slower than the KV cache%s",
                    "" if kv_cache_unsupported_reason(policy) is None else
                    f" (the KV cache cannot serve this policy: "
                    f"{kv_cache_unsupported_reason(policy)})")
        return RecomputeDecoder(policy)
    reason = kv_cache_unsupported_reason(policy)
    if reason is not None:
        raise ValueError(f"rollout: {reason}; prefix recomputation would serve it, 10-100x "
                         f"slower: ask for it with make_decoder(policy, recompute=True)")
    return KVCacheDecoder(policy, prefill_tokens=prefill_tokens, experts=experts)
