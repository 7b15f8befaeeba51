"""KV-cached decoding from the megatron-core policy: the sampler's :class:`Decoder` in linear
time per token instead of recomputing the whole prefix.

How it works. megatron-core's attention already knows how to decode with a cache: given a
``StaticInferenceContext`` it writes the keys/values of the new positions into per-layer
buffers ``[max_len, B, groups/tp, head_dim]`` at ``context.sequence_len_offset`` and attends
over ``buffer[:offset + n]`` (``Attention._adjust_key_value_for_inference``). Keys are cached
*before* RoPE; the rotary table handed to the block must therefore cover absolute positions
``0 .. capacity-1``, and megatron slices it itself (queries ``[offset, offset+n)``, keys
``[0, offset+n)``). This module drives that machinery directly: embedding -> ``gpt.decoder``
with the inference context -> the same fp32, TP-gathered output head as ``Policy.logits``.

Three things megatron's static path does not do for us, and why this file does them:

1. The causal mask. With an offset > 0 megatron switches the mask type to ``no_mask`` and the
   local ``DotProductAttention`` asserts ``sq == sk`` when it would have to build a causal mask
   itself, so a step of n > 1 tokens after the prompt would either crash or let a query see
   later keys. We always pass an explicit boolean mask ``[1, 1, n', offset+n']`` hiding key
   ``j`` from query ``i`` when ``j > offset + i``: exact causality for any step size.
2. Sequence parallelism. With TP > 1 on an MoE model the policy runs with sequence
   parallelism (tokens split over the TP ranks between attention blocks), so a step's length
   must divide by tp -- a one-token decode step does not. Rather than flipping
   ``sequence_parallel`` off in every linear layer (it is baked into the modules at build
   time), a step is right-padded to a multiple of tp, exactly as the training forward pads.
   The pad positions are written to the cache beyond the real ones and are never seen by a
   real query (they lie in its causal future); the next step overwrites them because it
   starts at the first pad position. The cache therefore holds ``max_len + tp - 1`` slots.
   The cost is small: under sequence parallelism each rank's MLP/MoE still sees one token per
   row, only attention handles tp query rows.
3. Cache allocation. The buffers are allocated here (NaN-filled, so a slot that is read before
   it is written shows up as NaN logits) and handed to megatron through
   ``context.key_value_memory_dict``; megatron then reuses them.

Scope: pipeline parallelism 1 (any TP/EP/DP); megatron's local ``DotProductAttention`` (the
layer spec r1fast builds without Transformer Engine). A Transformer Engine attention takes the
mask type megatron chooses (``no_mask`` after the prompt) and ignores our mask, so for it
:func:`make_decoder` falls back to :class:`r1fast.rollout.recompute.RecomputeDecoder`, as it does
for pp > 1 (there a decode step would need the pipeline schedule and a cache per stage).

All rows share positions (the sampler's contract), so one offset serves the whole batch; a
step may also rewind (``offset`` below the number of cached positions overwrites the tail).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
import torch.nn.functional as F

from r1fast.ops._validate import check_tensor

log = logging.getLogger("r1fast.rollout")

_fallback_logged = False


def kv_cache_unsupported_reason(policy) -> str | None:
    """Why :class:`KVCacheDecoder` cannot serve ``policy`` (None when it can)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    if policy.info.pp > 1:
        return (f"KVCacheDecoder needs pipeline parallel size 1, got pp={policy.info.pp}; use "
                f"r1fast.rollout.recompute.RecomputeDecoder (prefix recomputation) for this "
                f"layout")
    config = policy.config
    if getattr(config, "flash_decode", False) or getattr(config, "window_size", None):
        return ("KVCacheDecoder supports full causal attention without flash_decode; use "
                "RecomputeDecoder for sliding-window or flash-decode configs")
    for layer in policy.gpt.decoder.layers:
        core = layer.self_attention.core_attention
        if not isinstance(core, DotProductAttention):
            return (f"KVCacheDecoder needs megatron's local DotProductAttention (it passes an "
                    f"explicit causal mask), got {type(core).__name__}; use RecomputeDecoder")
    return None


@contextlib.contextmanager
def _inference(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, routers skip load statistics) and no autograd, restoring the
    caller's mode: the trainer's policy is in train mode between rollouts."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


class KVCacheDecoder:
    """The sampler's :class:`r1fast.rollout.sampler.Decoder` with a per-layer KV cache.

    ``reset(B, max_len)`` allocates (or re-poisons) the cache; ``step(tokens[B, n], offset)``
    runs the ``n`` new positions against the cached prefix ``0 .. offset-1`` and returns their
    logits ``[B, n, V]`` fp32 (gathered over TP, on ``tokens.device``), equal to those of
    :class:`r1fast.rollout.recompute.RecomputeDecoder` up to float rounding. Every rank of a
    TP/EP group must call ``step`` together (the forward is collective), as with that one.
    """

    def __init__(self, policy) -> None:
        reason = kv_cache_unsupported_reason(policy)
        if reason is not None:
            raise ValueError(reason)
        self.policy = policy
        self.attentions = [layer.self_attention for layer in policy.gpt.decoder.layers]
        # one step's length must divide by tp under sequence parallelism (see module doc)
        self.multiple = policy.info.tp if policy.sequence_parallel else 1
        self.context = None
        """megatron StaticInferenceContext holding the cache; None before reset()."""
        self.batch_size = 0
        self.max_len = 0
        self.filled = 0
        """Positions 0 .. filled-1 are in the cache."""
        self._rotary: torch.Tensor | None = None  # [capacity, 1, 1, rot_dim]

    @property
    def capacity(self) -> int:
        """Cache slots: max_len plus room for the padding of the last step."""
        return self.max_len + self.multiple - 1

    def kv_buffers(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The cache, ``{layer_number: (keys, values)}``, each ``[capacity, B, groups/tp, d]``."""
        if self.context is None:
            raise ValueError("KVCacheDecoder: call reset(batch_size, max_len) first")
        return self.context.key_value_memory_dict

    def reset(self, batch_size: int, max_len: int) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        limit = self.policy.model_cfg.max_position_embeddings
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(max_len, int) or not 1 <= max_len <= limit:
            raise ValueError(f"max_len must be an int in [1, max_position_embeddings={limit}], "
                             f"got {max_len!r}")
        old = None if self.context is None else self.context.key_value_memory_dict
        same_shape = old is not None and (batch_size, max_len) == (self.batch_size, self.max_len)
        self.batch_size, self.max_len, self.filled = batch_size, max_len, 0
        cap, device = self.capacity, self.policy.device
        dtype = self.policy.config.params_dtype
        self.context = StaticInferenceContext(max_batch_size=batch_size, max_sequence_length=cap)
        for attn in self.attentions:
            if same_shape:  # a new batch of the same size: reuse the memory
                keys, values = old[attn.layer_number]
                keys.fill_(float("nan"))
                values.fill_(float("nan"))
            else:
                groups = attn.num_query_groups_per_partition
                keys = torch.full((cap, batch_size, groups, attn.key_hidden_size), float("nan"),
                                  dtype=dtype, device=device)
                values = torch.full((cap, batch_size, groups, attn.val_hidden_size),
                                    float("nan"), dtype=dtype, device=device)
            self.context.key_value_memory_dict[attn.layer_number] = (keys, values)
        if self._rotary is None or self._rotary.shape[0] != cap:
            # the training forward's table for positions 0..cap-1 (same values per position)
            self._rotary = self.policy.rotary_table(torch.arange(cap, device=device)[None])

    def step(self, tokens: torch.Tensor, offset: int) -> torch.Tensor:
        if self.context is None:
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
        policy, device = self.policy, self.policy.device
        gpt = policy.gpt
        m = self.multiple
        padded = -(-n // m) * m
        ids = tokens.to(device, torch.int64)  # [B, n]
        if padded > n:
            ids = F.pad(ids, (0, padded - n))  # [B, padded]
        end = offset + padded
        position_ids = torch.arange(offset, end, device=device).expand(b, padded)
        # True = hidden: key j is in the future of query i (absolute position offset + i)
        mask = torch.ones(padded, end, dtype=torch.bool, device=device).triu_(offset + 1)
        padding_mask = None
        if padded > n:  # as the training forward does: routers ignore pads in their statistics
            padding_mask = torch.zeros(b, padded, dtype=torch.bool, device=device)
            padding_mask[:, n:] = True
            if policy.sequence_parallel:
                rows = padded // m
                r = policy.info.tp_rank
                padding_mask = padding_mask[:, r * rows:(r + 1) * rows]
        self.context.sequence_len_offset = offset
        self.context.batch_size_offset = 0
        with _inference(policy.module):
            hidden = gpt.embedding(input_ids=ids, position_ids=position_ids)  # [padded(/tp), B, H]
            hidden = gpt.decoder(hidden_states=hidden, attention_mask=mask[None, None],
                                 rotary_pos_emb=self._rotary, inference_context=self.context,
                                 padding_mask=padding_mask)
            hidden = policy.head_input(hidden, n)  # [B, n, H], same on every TP rank
            logits = policy.vocab_logits(hidden)  # [B, n, V] fp32, the head of Policy.logits
        self.filled = offset + n
        return logits.float().to(tokens.device)


def make_decoder(policy):
    """The fastest exact decoder for ``policy``: :class:`KVCacheDecoder` where it applies
    (pp == 1, megatron's local attention), else prefix recomputation (RecomputeDecoder)."""
    global _fallback_logged
    from r1fast.rollout.recompute import RecomputeDecoder

    reason = kv_cache_unsupported_reason(policy)
    if reason is None:
        return KVCacheDecoder(policy)
    if not _fallback_logged:
        log.info("sampling without a KV cache: %s", reason)
        _fallback_logged = True
    return RecomputeDecoder(policy)
