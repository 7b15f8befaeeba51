"""The rollout code before issue #15, kept verbatim as bench/bench_rollout.py's baseline: the
KV-cache decoder (megatron's static inference context, keys cached before RoPE and re-roped
every step, shared positions) and the sampler's shared-position loop, as they were at commit
5052973 (r1fast/rollout/kv_cache.py and sampler.py). Not used by r1fast itself."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from r1fast.ops._validate import check_tensor


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


@torch.no_grad()
def generate_before(decoder, prompts, cfg, eos_token_id, row_seeds):
    """The sampler's loop before issue #15 (r1fast/rollout/sampler.py at 5052973), verbatim
    but for the unused multinomial and sync branches."""
    from r1fast.rollout.sampler import Rollout, sample_tokens

    device = "cpu"
    B = len(prompts)
    row_gens = [torch.Generator().manual_seed(int(s)) for s in row_seeds]
    lens = torch.tensor([len(p) for p in prompts], device=device)
    min_len, max_prompt = int(lens.min()), int(lens.max())
    total = max_prompt + cfg.max_new_tokens
    buf = torch.zeros(B, total, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = torch.as_tensor(p, device=device)
    stops = torch.tensor(sorted({eos_token_id, *cfg.stop_token_ids}), device=device)
    decoder.reset(B, total)
    logits = decoder.step(buf[:, :min_len], 0)[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    gen_len = torch.zeros(B, dtype=torch.long, device=device)
    logps = torch.zeros(B, total, dtype=torch.float32, device=device)
    pos = min_len
    while pos < total:
        in_prompt = pos < lens
        active = ~in_prompt & ~done
        uniforms = torch.zeros(B, dtype=torch.float64)
        for i in active.nonzero()[:, 0].tolist():
            uniforms[i] = torch.rand(1, generator=row_gens[i], dtype=torch.float64)[0]
        tok, lp = sample_tokens(logits, cfg, None, uniforms)
        tok = torch.where(in_prompt, buf[:, pos], torch.where(done, torch.zeros_like(tok), tok))
        buf[:, pos] = tok
        logps[:, pos] = torch.where(active, lp, torch.zeros_like(lp))
        gen_len += active.long()
        done |= active & (torch.isin(tok, stops) | (gen_len >= cfg.max_new_tokens))
        pos += 1
        if bool(done.all()) or pos >= total:
            break
        logits = decoder.step(buf[:, pos - 1: pos], pos - 1)[:, -1]
    completions, lps, truncated = [], [], []
    for i in range(B):
        start, n = int(lens[i]), int(gen_len[i])
        ids = buf[i, start: start + n].tolist()
        completions.append(ids)
        lps.append(logps[i, start: start + n].tolist())
        truncated.append(not (n > 0 and ids[-1] in set(stops.tolist())))
    return Rollout([list(p) for p in prompts], completions, lps, truncated)
