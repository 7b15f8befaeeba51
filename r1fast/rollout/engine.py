"""The rollout loop on the accelerator: ragged prefill, device-side sampling, finished rows
dropped, one host copy at the end.

``generate_ragged`` is what :func:`r1fast.rollout.sampler.generate` runs for a decoder with the
ragged protocol (:class:`r1fast.rollout.kv_cache.KVCacheDecoder`)::

    logits = decoder.prefill(left-padded prompts [B, P], pads [B], max_len)   # [B, V]
    for step s = 0, 1, ...:                      # no host sync inside a chunk of `check_every`
        u = U[rows, s]                           # each row's s-th uniform, from its generator
        token, logp = inverse-CDF sample of logits at u    (device)
        write token/logp/alive into [B, max_new] device buffers at (rows, s)
        done |= token is a stop
        every `check_every` steps: ONE host read of the live count -> stop when all rows of
            every rank are done (``sync``), else drop finished rows (decoder.keep)
        logits = decoder.decode(token)           # [B', V], the live rows only
    tokens, log-probs, lengths -> host, once

Randomness. Row ``i`` owns a ``torch.Generator`` seeded with ``row_seeds[i]``; its first
``max_new_tokens`` float64 uniforms are drawn on the host before the loop (one call per row,
the same numbers the one-at-a-time draws of the shared-position loop give) and copied to the
device once. The ``s``-th generated token of a row inverts its CDF at the row's ``s``-th
uniform, so a completion depends only on its prompt, its seed and the model: the same samples
in any batch, in any order, at any TP/EP/PP/DP layout.

Host syncs. Nothing in a chunk reads a device value on the host (no ``.item()``,
``.tolist()``, ``.cpu()``, ``bool(t)``, ``nonzero``). Deciding to stop needs the host, so the
live count is read once per ``check_every`` steps; rows that finish inside a chunk keep being
fed (their outputs are masked) until that check drops them. Under expert or pipeline
parallelism every rank must make the same model calls: a rank whose rows are all done keeps
one finished row in its batch until every rank is done, and a sliced prefill
(``prefill_tokens``) pads every rank's prompts to the longest of any rank and cuts them into
the same number of slices.

Routing (R3). With ``record_routing`` the decoder records each router's choices for every
token it feeds (prompt tokens at the prefill, each generated token but the last when it is fed
back), addressed to the token's place in a flat per-row table (r1fast.rollout.routing); pads
and finished rows go to a dump row.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch

from r1fast.rollout.routing import RolloutRouting, table_bounds


def stream_seed(seed: int, *where: int) -> int:
    """The 63-bit seed of the random stream at ``where`` (step, row, ...) of a run seeded with
    ``seed`` >= 0: deterministic across processes (int tuples hash without PYTHONHASHSEED).
    A negative seed is refused: CPython hashes -1 as -2, so seeds -1 and -2 would share
    every stream."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return hash((seed, *where)) & 0x7FFF_FFFF_FFFF_FFFF


def row_uniforms(row_seeds: Sequence[int], steps: int) -> torch.Tensor:
    """``[B, steps]`` float64: row i's first ``steps`` draws of ``Generator(seed_i)``."""
    return torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(int(s)),
                                   dtype=torch.float64) for s in row_seeds])


def left_pad(prompts: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, P] with each prompt right-aligned, pads [B]) on ``device``; P = longest."""
    lens = [len(p) for p in prompts]
    width = max(lens)
    flat = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        flat[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
    pads = torch.tensor([width - n for n in lens], dtype=torch.long)
    return flat.to(device), pads.to(device)


def _agree_prefill_slices(decoder, tokens: torch.Tensor, pads: torch.Tensor,
                          sync: Callable[[int, str], int]):
    """(tokens, pads, positions per slice) such that every rank's sliced prefill makes the
    same number of forwards, as expert parallelism's all-to-all and pipeline sends need: the
    prompts left-padded to the longest of any rank, sliced at the narrowest slice any rank's
    ``prefill_tokens`` budget allows. (Each rank slicing its own prompts made a rank with
    longer prompts run more forwards than its EP peers, and both waited forever.)"""
    width = sync(tokens.shape[1], "max")
    if width > tokens.shape[1]:
        extra = width - tokens.shape[1]
        tokens = torch.nn.functional.pad(tokens, (extra, 0))
        pads = pads + extra
    return tokens, pads, sync(decoder.prefill_width(tokens.shape[0], width), "min")


def _prefill_dest(pads: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """[B, P]: slot j of row b holds position j - pad_b, table row starts[b] + j - pad_b
    (-1 for a pad slot)."""
    pos = torch.arange(width, device=pads.device)[None, :] - pads[:, None]
    return torch.where(pos >= 0, starts[:, None] + pos, torch.full_like(pos, -1))


def _sample(decoder, logits: Optional[torch.Tensor], cfg, u: torch.Tensor, n: int,
            device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, logp) of each live row: sampled on the last pipeline stage, shared."""
    from r1fast.rollout.sampler import sample_tokens

    if logits is not None:
        tok, lp = sample_tokens(logits, cfg, uniforms=u)
    else:  # not the last pipeline stage: receives the last stage's samples
        tok = torch.zeros(n, dtype=torch.long, device=device)
        lp = torch.zeros(n, dtype=torch.float32, device=device)
    return decoder.share(tok, lp.float())


def generate_ragged(decoder, prompts: Sequence[Sequence[int]], cfg, eos_token_id: int,
                    uniforms: torch.Tensor, *, sync: Optional[Callable[[int, str], int]] = None,
                    record_routing: bool = False, check_every: int = 8):
    """Sample one completion per prompt (module doc); returns a
    :class:`r1fast.rollout.sampler.Rollout` (``routing`` set when ``record_routing``). The
    decoder's ``session()`` (when it has one) wraps the whole loop."""
    session = getattr(decoder, "session", None)
    with session() if session is not None else contextlib.nullcontext(), torch.no_grad():
        return _generate_ragged(decoder, prompts, cfg, eos_token_id, uniforms, sync,
                                record_routing, check_every)


def _generate_ragged(decoder, prompts, cfg, eos_token_id, uniforms, sync, record_routing,
                     check_every):
    from r1fast.rollout.sampler import Rollout

    if not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")
    device = decoder.device
    B, steps = len(prompts), cfg.max_new_tokens
    if tuple(uniforms.shape) != (B, steps):
        raise ValueError(f"uniforms must be [{B}, max_new_tokens={steps}], got "
                         f"{list(uniforms.shape)}")
    lens_host = [len(p) for p in prompts]
    tokens, pads = left_pad(prompts, device)  # [B, P], [B]
    slice_width = None
    if sync is not None and getattr(decoder, "prefill_tokens", 0):
        tokens, pads, slice_width = _agree_prefill_slices(decoder, tokens, pads, sync)
    width = tokens.shape[1]
    lens = torch.tensor(lens_host, device=device)
    # routing table rows: each row's prompt, then every generated token but the last
    bounds = table_bounds(lens_host, steps)
    starts = torch.tensor(bounds[:-1], device=device)
    if record_routing:
        decoder.start_recording(bounds[-1])
    u_all = uniforms.to(device)
    stops = torch.tensor(sorted({eos_token_id, *cfg.stop_token_ids}), device=device)
    out_tok = torch.zeros(B, steps, dtype=torch.long, device=device)
    out_lp = torch.zeros(B, steps, dtype=torch.float32, device=device)
    alive = torch.zeros(B, steps, dtype=torch.bool, device=device)  # token s of row i is real

    logits = decoder.prefill(tokens, pads, width + steps,
                             dest=_prefill_dest(pads, starts, width) if record_routing else None,
                             **({} if slice_width is None else {"width": slice_width}))
    rows = torch.arange(B, device=device)  # original ids of the rows in the batch
    done = torch.zeros(B, dtype=torch.bool, device=device)  # per row of the batch
    for s in range(steps):
        tok, lp = _sample(decoder, logits, cfg, u_all[rows, s], rows.shape[0], device)
        live = ~done
        out_tok[rows, s] = torch.where(live, tok, torch.zeros_like(tok))
        out_lp[rows, s] = torch.where(live, lp, torch.zeros_like(lp))
        alive[rows, s] = live
        done = done | torch.isin(tok, stops)
        if s == steps - 1:
            break
        if (s + 1) % check_every == 0:  # the only host read of the loop
            n_live = int((~done).sum())
            finished = n_live == 0
            if sync is not None:
                finished = bool(sync(int(finished), "min"))
            if finished:
                break
            if max(n_live, 1) < rows.shape[0]:  # another rank still runs: keep one row
                keep = (~done).nonzero()[:, 0] if n_live else done.nonzero()[:1, 0]
                decoder.keep(keep)
                rows, done, tok = rows[keep], done[keep], tok[keep]
        fed = torch.where(done, torch.zeros_like(tok), tok)
        dest = None
        if record_routing:  # the token fed now sits at position len + s of its row
            dest = torch.where(done, torch.full_like(tok, -1), starts[rows] + lens[rows] + s)
        logits = decoder.decode(fed, dest=dest)

    routing = None
    if record_routing:
        tables = decoder.finish_recording()
    gen_len = alive.sum(1).cpu()  # the one copy back: lengths, tokens, log-probs
    out_tok, out_lp = out_tok.cpu(), out_lp.cpu()
    completions, logps, truncated = [], [], []
    stop_set = set(stops.cpu().tolist())
    for i in range(B):
        n = int(gen_len[i])
        ids = out_tok[i, :n].tolist()
        completions.append(ids)
        logps.append(out_lp[i, :n].tolist())
        truncated.append(not (n > 0 and ids[-1] in stop_set))
    if record_routing:
        lengths = [lens_host[i] + len(completions[i]) - 1 for i in range(B)]
        routing = RolloutRouting(tables, bounds[:-1], lengths,
                                 decoder.policy.model_cfg.moe_router_topk)
    return Rollout([list(p) for p in prompts], completions, logps, truncated, routing)
