"""Batched autoregressive sampling with a KV cache: temperature, top-p, top-k, stop tokens.

The model is reached through a :class:`Decoder`: ``reset(batch, max_len)`` allocates its KV
cache, ``step(tokens[B, n], offset)`` feeds ``n`` new tokens at positions ``offset..offset+n-1``
for every row and returns the logits of those positions ``[B, n, V]``.

Prompts of different lengths are handled the way Megatron's text generation does it: the
batch prefills the shortest prompt length together, then advances one position at a time for
all rows; a row whose prompt is longer keeps being fed its own prompt token (the sample is
discarded) until its prompt ends. All rows share positions, so no attention mask or padding
enters the cache, and each row's tokens see exactly its own prefix.

The sampler's log-prob of each chosen token is ``log_softmax(logits / temperature)`` over the
FULL vocabulary, the same quantity the trainer recomputes; top-p/top-k truncation changes
what is sampled, not the recorded log-prob (so the importance ratio of the trainer stays
comparable, at the cost of ignoring the truncation's bias, as verl and TRL do by default).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Protocol, Sequence

import torch


@dataclasses.dataclass
class SamplingConfig:
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables."""
    max_new_tokens: int = 64
    """Completion length limit; completions that hit it are 'truncated' (overlong)."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation of a row ends after it emits any of these (eos is always a stop token)."""
    vocab_limit: int | None = None
    """Sample only ids below this (a model vocabulary padded beyond the tokenizer's); like
    top-k it restricts what is sampled, not the recorded log-prob."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


class Decoder(Protocol):
    def reset(self, batch_size: int, max_len: int) -> None: ...

    def step(self, tokens: torch.Tensor, offset: int) -> torch.Tensor: ...


@dataclasses.dataclass
class Rollout:
    """Sampled completions. Lists are per row (prompt order, G completions per prompt adjacent)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    """Sampler log-prob of each completion token (temperature-scaled full softmax)."""
    truncated: list[bool]
    """True when the completion hit max_new_tokens without a stop token."""


def filter_logits(logits: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """Mask (to -inf) the tokens outside top-k and outside the top-p nucleus. [B, V] fp32."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p
        before = probs.cumsum(-1) - probs
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, cfg: SamplingConfig,
                  generator: torch.Generator | None = None,
                  uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from ``logits[B, V]``; returns (tokens [B] int64, logp [B] fp32).

    With ``uniforms`` ([B] in [0, 1)) each row is sampled by inverting its CDF at its own
    number, so a row's sample does not depend on which other rows share the batch (the same
    completions at any data-parallel layout); otherwise ``torch.multinomial`` with ``generator``.
    """
    logits = logits.float()
    if cfg.vocab_limit is not None and cfg.vocab_limit < logits.shape[-1]:
        allowed = torch.arange(logits.shape[-1], device=logits.device) < cfg.vocab_limit
    else:
        allowed = None
    if cfg.temperature == 0:
        masked = logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))
        tokens = masked.argmax(-1)
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
        return tokens, logp
    scaled = logits / cfg.temperature
    logp_all = torch.log_softmax(scaled, -1)
    if allowed is not None:
        scaled = scaled.masked_fill(~allowed, float("-inf"))
    probs = filter_logits(scaled, cfg.top_p, cfg.top_k).softmax(-1)
    if uniforms is not None:
        cdf = probs.cumsum(-1)
        u = uniforms.to(cdf)[:, None] * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, u, right=True)[:, 0]
        # never land on a zero-probability id through rounding at the top of the CDF
        tokens = torch.minimum(tokens, probs.gt(0).cumsum(-1).argmax(-1))
    else:
        tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tokens, logp_all.gather(-1, tokens[:, None])[:, 0]


@torch.no_grad()
def generate(decoder: Decoder, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
             eos_token_id: int, generator: torch.Generator | None = None,
             device: torch.device | str = "cpu", row_seeds: Sequence[int] | None = None,
             sync: Callable[[int, str], int] | None = None) -> Rollout:
    """Sample one completion per prompt (repeat prompts for groups).

    ``row_seeds`` gives every row its own random stream (see :func:`sample_tokens`), which makes
    a row's completion independent of the batch it is generated in.

    ``sync(value, "min"|"max")`` reduces an integer over every process that must run the same
    number of model calls (expert parallelism's all-to-all, pipeline stages): the prefill
    length, the last position and the "all rows done" decision are then global, so no rank
    stops calling the model while another still needs it.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    B = len(prompts)
    row_gens = None
    if row_seeds is not None:
        if len(row_seeds) != B:
            raise ValueError(f"row_seeds must have one seed per prompt ({B}), got {len(row_seeds)}")
        row_gens = [torch.Generator().manual_seed(int(s)) for s in row_seeds]
    lens = torch.tensor([len(p) for p in prompts], device=device)
    min_len, max_prompt = int(lens.min()), int(lens.max())
    total = max_prompt + cfg.max_new_tokens
    if sync is not None:
        min_len, total = sync(min_len, "min"), sync(total, "max")
    buf = torch.zeros(B, total, dtype=torch.long, device=device)  # [B, prompt + completion]
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = torch.as_tensor(p, device=device)
    stops = torch.tensor(sorted({eos_token_id, *cfg.stop_token_ids}), device=device)
    decoder.reset(B, total)
    logits = decoder.step(buf[:, :min_len], 0)[:, -1]  # [B, V]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    gen_len = torch.zeros(B, dtype=torch.long, device=device)
    logps = torch.zeros(B, total, dtype=torch.float32, device=device)
    pos = min_len
    while pos < total:
        in_prompt = pos < lens
        active = ~in_prompt & ~done
        uniforms = None
        if row_gens is not None:  # a row draws only for the tokens it generates
            uniforms = torch.zeros(B, dtype=torch.float64)
            for i in active.nonzero()[:, 0].tolist():
                uniforms[i] = torch.rand(1, generator=row_gens[i], dtype=torch.float64)[0]
        tok, lp = sample_tokens(logits, cfg, generator, uniforms)
        tok = torch.where(in_prompt, buf[:, pos], torch.where(done, torch.zeros_like(tok), tok))
        buf[:, pos] = tok
        logps[:, pos] = torch.where(active, lp, torch.zeros_like(lp))
        gen_len += active.long()
        done |= active & (torch.isin(tok, stops) | (gen_len >= cfg.max_new_tokens))
        pos += 1
        all_done = bool(done.all())
        if sync is not None:
            all_done = bool(sync(int(all_done), "min"))
        if all_done or pos >= total:
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
