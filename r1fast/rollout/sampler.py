"""Batched autoregressive sampling: temperature, top-p, top-k, stop tokens, per-row seeds.

:func:`generate` samples one completion per prompt through a decoder, in one of two loops:

* **ragged** (:mod:`r1fast.rollout.engine`), for decoders with ``ragged = True``
  (:class:`r1fast.rollout.kv_cache.KVCacheDecoder`): every prompt is prefilled once at its own
  length (left-padded, per-row positions), sampling runs on the decoder's device, finished
  rows leave the batch, and tokens / log-probs come back to the host once; it can record each
  token's MoE routing for replay (R3).
* **shared positions** (this module), for any decoder with ``reset(batch, max_len)`` and
  ``step(tokens[B, n], offset) -> logits [B, n, V]`` (prefix recomputation, test doubles):
  the way Megatron's text generation does it. The batch prefills the shortest prompt length together, then advances one position at a time for all rows; a row
  whose prompt is longer keeps being fed its own prompt token (the sample is discarded) until
  its prompt ends. All rows share positions, so no attention mask or padding enters the cache.

Both draw row ``i``'s randomness from its own generator (``row_seeds[i]``): its ``s``-th
generated token inverts its CDF at the generator's ``s``-th float64 uniform, so both loops
give the same completions from the same logits, whatever the batch.

The log-prob recorded for each chosen token is, by default (``logprobs="full"``),
``log_softmax(logits / temperature)`` over the FULL vocabulary, the quantity the trainer
recomputes: top-p/top-k truncation changes what is sampled, not the recorded log-prob, and
its bias is ignored (as verl and TRL do by default). ``logprobs="sampled"`` records the
log-prob under the distribution actually sampled from (after ``vocab_limit``, top-k and
top-p; vLLM's "processed" log-probs), so that truncated importance sampling against it
(``tis_cap``) weighs each token by ``pi / mu`` of the policy that really sampled it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal, Optional, Protocol, Sequence

import torch

from r1fast.rollout.routing import RolloutRouting, table_bounds


#: what :attr:`SamplingConfig.logprobs` may be
LOGPROB_MODES = ("full", "sampled")


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
    top-k it restricts what is sampled, not the "full" recorded log-prob."""
    logprobs: Literal["full", "sampled"] = "full"
    """The recorded log-prob of a sampled token: "full" (the temperature-scaled softmax over
    the whole vocabulary, what the trainer computes) or "sampled" (the distribution sampled
    from, after vocab_limit, top-k and top-p; 0 for greedy)."""

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it: vLLM's and verl's -1), got "
                             f"{self.top_k}")
        if self.vocab_limit is not None and self.vocab_limit < 1:
            raise ValueError(f"vocab_limit must be >= 1 or None, got {self.vocab_limit}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.logprobs not in LOGPROB_MODES:
            raise ValueError(f"logprobs must be one of {LOGPROB_MODES}, got {self.logprobs!r}")


class Decoder(Protocol):
    def reset(self, batch_size: int, max_len: int) -> None: ...

    def step(self, tokens: torch.Tensor, offset: int) -> torch.Tensor: ...


@dataclasses.dataclass
class Rollout:
    """Sampled completions. Lists are per row (prompt order, G completions per prompt adjacent)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    """Sampler log-prob of each completion token (of the full temperature-scaled softmax, or of
    the truncated distribution sampled from: ``SamplingConfig.logprobs``)."""
    truncated: list[bool]
    """True when the completion hit max_new_tokens without a stop token."""
    routing: Optional[RolloutRouting] = None
    """The experts each MoE layer chose for every token while decoding (``record_routing``)."""


def filter_logits(logits: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """Mask (to -inf) the tokens outside top-k and outside the top-p nucleus. [B, V] fp32."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        del sorted_logits  # each [B, V] temporary goes as soon as it is used
        # drop a token when the mass strictly before it already reaches top_p
        before = probs.cumsum(-1).sub_(probs)
        del probs
        drop_sorted = before >= top_p
        del before
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


#: logits sampled together (rows x vocabulary): sampling holds fp64 and int64 temporaries the
#: size of its chunk, so a decode batch of 1024 rows at a 152k vocabulary is sampled in five
#: chunks of 220 rows (~1.1 GB of temporaries) rather than with ~6 GB of them at once
SAMPLE_CHUNK_LOGITS = 1 << 25
#: peak bytes of temporaries per logit of a chunk beside the logits themselves: what
#: :func:`_sample_rows` holds during its CDF scan (fp32 scaled and filtered logits, the
#: zero-probability mask, the fp64 CDF, cummax's fp64 values and int64 indices); the memory
#: planner adds it to a rollout's peak (r1fast.plan.memory)
SAMPLE_BYTES_PER_LOGIT = 4 + 4 + 1 + 8 + 8 + 8


def sample_rows_per_chunk(vocab: int) -> int:
    """Rows of ``[rows, vocab]`` logits :func:`sample_tokens` samples at once."""
    return max(1, SAMPLE_CHUNK_LOGITS // vocab)


def sample_tokens(logits: torch.Tensor, cfg: SamplingConfig,
                  generator: torch.Generator | None = None,
                  uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from ``logits[B, V]``; returns (tokens [B] int64, logp [B] fp32).

    With ``uniforms`` ([B] in [0, 1)) each row is sampled by inverting its CDF at its own
    number, so a row's sample does not depend on which other rows share the batch (the same
    completions at any data-parallel layout); otherwise ``torch.multinomial`` with ``generator``.
    Rows are sampled in chunks of :func:`sample_rows_per_chunk` rows, which bounds the
    temporaries; with ``uniforms`` the result does not depend on the chunking.
    """
    rows = sample_rows_per_chunk(logits.shape[-1])
    if logits.shape[0] <= rows:
        return _sample_rows(logits, cfg, generator, uniforms)
    chunks = [_sample_rows(logits[i:i + rows], cfg, generator,
                           None if uniforms is None else uniforms[i:i + rows])
              for i in range(0, logits.shape[0], rows)]
    return torch.cat([t for t, _ in chunks]), torch.cat([lp for _, lp in chunks])


def _sample_rows(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None,
                 uniforms: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_tokens` on one chunk of rows."""
    if cfg.vocab_limit is not None and cfg.vocab_limit < logits.shape[-1]:
        allowed = torch.arange(logits.shape[-1], device=logits.device) < cfg.vocab_limit
    else:
        allowed = None
    if cfg.temperature == 0:
        logits = logits.float()
        masked = logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))
        tokens = masked.argmax(-1)
        if cfg.logprobs == "sampled":  # a point mass, unless the row's logits were broken
            broken = ~torch.isfinite(masked.amax(-1))  # NaN propagates through amax
            return tokens, torch.zeros(tokens.shape, dtype=torch.float32,
                                       device=tokens.device).masked_fill_(broken, float("nan"))
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
        return tokens, logp
    full = logits.to(torch.float32, copy=True).div_(cfg.temperature)  # [B, V], one copy
    scaled = full if allowed is None else full.masked_fill(~allowed, float("-inf"))
    kept = filter_logits(scaled, cfg.top_p, cfg.top_k)  # [B, V], -inf outside
    del scaled
    if uniforms is not None:
        tokens = _invert_cdf(kept, uniforms)
    else:
        tokens = torch.multinomial(kept.softmax(-1), 1, generator=generator)[:, 0]
    # the [B, V] log-softmax comes after the CDF's temporaries are gone
    logp_all = torch.log_softmax(kept if cfg.logprobs == "sampled" else full, -1)  # [B, V]
    return tokens, logp_all.gather(-1, tokens[:, None])[:, 0]


def _invert_cdf(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Row ``b``'s id whose interval of the CDF of ``softmax(logits [B, V])`` holds
    ``uniforms[b]``, ``[B]``."""
    probs = logits.softmax(-1)
    impossible = probs == 0  # [B, V]
    # fp64: in an fp32 CDF near 1, every id under half an fp32 step (~3e-8; tens of
    # thousands of a 152k vocabulary) had zero width and could never be drawn.
    cdf = probs.double().cumsum(-1)  # [B, V]
    del probs
    # Zero-probability ids get zero width: a single-row CUDA cumsum (a CUB scan) may move
    # by a rounding unit across them, which would give a masked id a sliver of mass
    cdf = cdf.masked_fill_(impossible, 0.0).cummax(-1).values
    u = uniforms.to(cdf)[:, None] * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True)[:, 0]
    # never past the CDF's last rise (u * total may round up to the total): the first id at
    # the maximum has non-zero probability, as every id after it adds nothing
    return torch.minimum(tokens, cdf.argmax(-1))


def check_prompt_room(lengths: Sequence[int], room: int, *, limits: str, fix: str,
                      what: str = "prompts", names: Sequence | None = None) -> None:
    """Every prompt (``lengths`` in tokens) within ``room``, the context less the completion
    budget; else a ValueError counting the long ones and naming the longest (``names[i]``, else
    ``prompt i``), raised before anything is sampled, not by the batch that holds it after
    the batches before it ran. ``limits`` says where ``room`` comes from, ``fix`` what to do."""
    long = [i for i, n in enumerate(lengths) if n > room]
    if long:
        worst = max(long, key=lengths.__getitem__)
        name = f"prompt {worst}" if names is None else names[worst]
        raise ValueError(f"{len(long)} of {len(lengths)} {what} are longer than the {room} "
                         f"tokens {limits} (the longest, {name}, has {lengths[worst]}); {fix}")


@torch.no_grad()
def generate(decoder, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
             eos_token_id: int, generator: torch.Generator | None = None,
             device: torch.device | str = "cpu", row_seeds: Sequence[int] | None = None,
             sync: Callable[[int, str], int] | None = None, *, record_routing: bool = False,
             check_every: int = 8) -> Rollout:
    """Sample one completion per prompt (repeat prompts for groups), with the ragged loop when
    the decoder has it, else the shared-position loop (module doc).

    ``row_seeds`` gives every row its own random stream, which makes a row's completion
    independent of the batch it is generated in; without them the uniforms come from
    ``generator`` (or torch's default one). ``device``: where the shared-position loop keeps
    its buffers (the ragged loop uses the decoder's device).

    ``sync(value, "min"|"max")`` reduces an integer over every process that must run the same
    number of model calls (expert parallelism's all-to-all, pipeline stages), so no rank stops
    calling the model while another still needs it.

    ``record_routing`` (ragged loop only) fills ``Rollout.routing``; ``check_every``: steps
    between the ragged loop's host reads (stop test, dropping finished rows).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    B = len(prompts)
    if row_seeds is not None:
        if len(row_seeds) != B:
            raise ValueError(f"row_seeds must have one seed per prompt ({B}), got {len(row_seeds)}")
        from r1fast.rollout.engine import row_uniforms

        uniforms = row_uniforms(row_seeds, cfg.max_new_tokens)  # [B, max_new] float64
    else:
        uniforms = torch.rand(B, cfg.max_new_tokens, generator=generator, dtype=torch.float64)
    if getattr(decoder, "ragged", False):
        from r1fast.rollout.engine import generate_ragged

        return _finite(generate_ragged(decoder, prompts, cfg, eos_token_id, uniforms, sync=sync,
                                       record_routing=record_routing, check_every=check_every))
    if record_routing and not hasattr(decoder, "start_recording"):
        raise ValueError(f"record_routing: {type(decoder).__name__} cannot record routing while "
                         f"decoding (a KVCacheDecoder can); capture it after sampling instead "
                         f"(Policy.record_routing)")
    return _finite(_generate_shared(decoder, prompts, cfg, eos_token_id, uniforms, device, sync,
                                    record_routing))


def _finite(rollout: Rollout) -> Rollout:
    """``rollout``, if every recorded log-prob is finite. A NaN or infinite logit makes the row's
    log-softmax NaN, and its "sample" is an arbitrary id (the CDF search lands on id 0):
    text drawn from broken logits is an error, not a completion (the log-probs are on the host
    by now, so the check costs no device sync)."""
    rows = [i for i, lps in enumerate(rollout.logprobs) if not math.isfinite(sum(lps))]
    if rows:  # (a sum of finite log-probs is finite: one C loop per row finds the bad ones)
        bad = [(i, s) for i in rows for s, lp in enumerate(rollout.logprobs[i])
               if not math.isfinite(lp)]
        i, s = bad[0]
        raise FloatingPointError(
            f"generate: the model's logits were NaN or infinite at {len(bad)} sampled tokens "
            f"of {len(rows)} of {len(rollout.logprobs)} rows (first: row {i}, generated token "
            f"{s}): the policy's weights have diverged (values too large for its dtype, or "
            f"non-finite) or its KV cache holds non-finite values")
    return rollout


def _generate_shared(decoder: Decoder, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
                     eos_token_id: int, uniforms: torch.Tensor, device, sync,
                     record_routing: bool = False) -> Rollout:
    """The shared-position loop (module doc); row i's s-th generated token uses
    ``uniforms[i, s]``. With ``record_routing`` the token fed at position p of row i is
    recorded at table row ``starts[i] + p`` (r1fast.rollout.routing)."""
    B = len(prompts)
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
    bounds = table_bounds([len(p) for p in prompts], cfg.max_new_tokens)
    starts = torch.tensor(bounds, device=device)
    if record_routing:
        decoder.start_recording(bounds[-1])
        dest = starts[:-1, None] + torch.arange(min_len, device=device)
        logits = decoder.step(buf[:, :min_len], 0, dest=dest)[:, -1]  # [B, V]
    else:
        logits = decoder.step(buf[:, :min_len], 0)[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    gen_len = torch.zeros(B, dtype=torch.long, device=device)
    logps = torch.zeros(B, total, dtype=torch.float32, device=device)
    rows = torch.arange(B, device=device)
    uniforms = uniforms.to(device)  # once, not per position
    pos = min_len
    while pos < total:
        in_prompt = pos < lens
        active = ~in_prompt & ~done
        # a row draws only for the tokens it generates: its gen_len-th uniform
        u = uniforms[rows, gen_len.clamp_max(cfg.max_new_tokens - 1)]
        tok, lp = sample_tokens(logits.to(device), cfg, uniforms=u)
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
        if record_routing:  # a row's token is an input of training unless the row is done
            dest = torch.where(done, -1, starts[:-1] + pos - 1)[:, None]
            logits = decoder.step(buf[:, pos - 1: pos], pos - 1, dest=dest)[:, -1]
        else:
            logits = decoder.step(buf[:, pos - 1: pos], pos - 1)[:, -1]
    completions, lps, truncated = [], [], []
    for i in range(B):
        start, n = int(lens[i]), int(gen_len[i])
        ids = buf[i, start: start + n].tolist()
        completions.append(ids)
        lps.append(logps[i, start: start + n].tolist())
        truncated.append(not (n > 0 and ids[-1] in set(stops.tolist())))
    routing = None
    if record_routing:
        routing = RolloutRouting(decoder.finish_recording(), bounds[:-1],
                                 [len(p) + len(c) - 1 for p, c in zip(prompts, completions)],
                                 decoder.policy.model_cfg.moe_router_topk)
    return Rollout([list(p) for p in prompts], completions, lps, truncated, routing)
