"""Packed micro-batches: sequences end to end under a token budget, no padding between them.

A GRPO batch has rows of very uneven length (prompts of 20-300 tokens, long-tailed
completions). Padding every row to the longest one spends most of the update's FLOPs on pads
and lets one long row set the memory peak of its whole micro-batch. Packing instead:

1. :func:`pack_rows` assigns rows to micro-batches greedily (longest first, each into the
   first micro-batch with room: first-fit decreasing), so each holds at most
   ``max_tokens`` real tokens; the assignment depends only on the lengths (deterministic);
2. :class:`PackedMicroBatch` lays the rows of one micro-batch end to end as ONE sequence of
   ``T`` tokens with ``cu_seqlens`` marking the boundaries; the policy restarts positions and
   blocks attention at them (:mod:`r1fast.policy.packed`), so each row sees only itself. The
   tail up to ``T`` (one length for every micro-batch: the pipeline sends fixed shapes) is one
   more "row" whose loss mask is 0;
3. per-token tensors of the padded :class:`~r1fast.train.batch.UpdateBatch` (``[N, L, ...]``)
   are gathered into the packed order with :meth:`PackedMicroBatch.pack` and results scattered
   back with :meth:`PackedMicroBatch.unpack`.

The fused loss ops take the packed layout natively (``cu_seqlens``), with per-row advantages;
the aggregation's global normaliser is the same as for the padded layout, so the loss and its
gradients equal the padded ones up to float rounding.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

import torch

log = logging.getLogger("r1fast.train")
_warned_budgets: set[int] = set()  # one warning per budget per process, not one per step


def sequence_loss_on_packed_rows(model, parallel) -> str | None:
    """The warning for a sequence-wise balance loss over packed micro-batches, else None: the
    router sees a packed micro-batch as one row, so the loss balances each packed row (as
    DeepSeek-V3's own packed pretraining rows), not each sample; it is then the batch-wise
    loss of that micro-batch."""
    if not (model.is_moe and model.aux_loss_coef > 0 and model.aux_loss_type == "seq_aux_loss"
            and parallel.max_tokens_per_microbatch > 0):
        return None
    return (f"model.aux_loss_type = 'seq_aux_loss' with packed micro-batches "
            f"(parallel.max_tokens_per_microbatch = {parallel.max_tokens_per_microbatch}): a "
            f"packed row counts as one sequence, so the loss balances each micro-batch of up to "
            f"that many tokens (DeepSeek-V3's packed pretraining rows), not each sample; "
            f"parallel.max_tokens_per_microbatch = 0 puts one sample in each row")


def pack_rows(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Row indices per micro-batch: first-fit decreasing under ``max_tokens`` real tokens.
    A row longer than the budget gets a micro-batch of its own. Rows of length 0 are left
    out (nothing to compute)."""
    if max_tokens < 1:
        raise ValueError(f"parallel.max_tokens_per_microbatch must be >= 1, got {max_tokens}")
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_tokens - n)
    return [sorted(b) for b in bins]  # rows in batch order inside a micro-batch


@dataclasses.dataclass
class PackedMicroBatch:
    """Rows ``rows`` of a padded batch, laid end to end in one sequence of ``length`` tokens."""

    rows: list[int]
    """Indices of the packed rows in the padded batch."""
    lengths: list[int]
    """Real tokens of each packed row."""
    length: int
    """T: tokens of the packed sequence (real tokens, then the tail)."""
    max_piece: int = 0
    """The tail is cut into pieces of at most this many tokens (the longest row of the batch),
    so no packed "sequence" is longer than a real row; 0: the tail is one piece."""

    def segments(self) -> list[int]:
        """Lengths of the packed sequences: the rows, then the pieces of the tail (>= 1)."""
        tail = self.length - sum(self.lengths)
        piece = self.max_piece or max(tail, 1)
        return [*self.lengths, *([piece] * (tail // piece)), *([tail % piece] if tail % piece
                                                               or not tail else [])]

    @property
    def num_tail_pieces(self) -> int:
        return len(self.segments()) - len(self.rows)

    def real_lengths(self) -> torch.Tensor:
        """[1] int64: the real tokens of the packed row (the policy's ``lengths`` entry, which
        keeps the tail out of the routers' statistics)."""
        return torch.tensor([sum(self.lengths)])

    def cu_seqlens(self, width: int | None = None) -> torch.Tensor:
        """int32 boundaries of :meth:`segments`; padded to ``width`` entries by repeating T
        (empty sequences), so packed rows can be stacked."""
        ends = torch.tensor([0, *self.segments()]).cumsum(0)
        if width is not None:
            ends = torch.cat([ends, ends[-1:].expand(width - ends.numel())])
        return ends.to(torch.int32)

    def _index(self, width: int) -> torch.Tensor:
        """Flat indices into a padded [N, L] tensor of the real tokens, in packed order."""
        parts = [r * width + torch.arange(n) for r, n in zip(self.rows, self.lengths)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def pack(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """Padded ``x`` [N, L, ...] -> packed [1, T, ...] (the tail holds ``fill``)."""
        flat = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
        real = flat[self._index(x.shape[1]).to(x.device)]
        tail = real.new_full((self.length - real.shape[0], *x.shape[2:]), fill)
        return torch.cat([real, tail])[None]

    def unpack(self, packed: torch.Tensor, out: torch.Tensor) -> None:
        """Scatter packed [1, T, ...] results into the rows of padded ``out`` [N, L, ...]."""
        flat = out.view(out.shape[0] * out.shape[1], *out.shape[2:])
        n = sum(self.lengths)
        flat[self._index(out.shape[1]).to(out.device)] = packed[0, :n].to(out.dtype)


def packed_micro_batches(valid_lengths: Sequence[int], max_tokens: int,
                         multiple: int = 1, length: int | None = None,
                         count: int | None = None,
                         agree: Callable[[int, str], int] | None = None) -> list[PackedMicroBatch]:
    """The packed micro-batches of rows with ``valid_lengths`` real tokens. Every one has the
    same length: ``length`` if given, else the fullest bin, rounded up to ``multiple``
    (sequence parallelism). ``count``: pad the list with empty micro-batches (all tail, no
    loss) to this many. ``agree(value, "max")`` (e.g. ``r1fast.train.batch.all_ranks_int``)
    takes the fullest bin and the count over every rank: the pipeline sends fixed shapes, and
    every rank must run the same number of forwards (the MoE all-to-all of expert parallelism
    spans data-parallel ranks)."""
    bins = pack_rows(valid_lengths, max_tokens)
    longest = max(valid_lengths, default=1)
    if longest > max_tokens and max_tokens not in _warned_budgets:
        _warned_budgets.add(max_tokens)
        log.warning("a row of %d tokens is longer than the packing budget of %d tokens "
                    "(parallel.max_tokens_per_microbatch, or max_tokens_per_logprob_forward "
                    "for log-prob forwards): it gets a micro-batch of its own and every packed "
                    "micro-batch is that long, so memory follows the row, not the budget "
                    "(warned once per budget)", longest, max_tokens)
    fullest = max((sum(valid_lengths[i] for i in b) for b in bins), default=1)
    if agree is not None:
        fullest, count = agree(fullest, "max"), agree(len(bins), "max")
    if count is not None:
        if count < len(bins):
            raise ValueError(f"count {count} is smaller than the {len(bins)} micro-batches needed")
        bins += [[] for _ in range(count - len(bins))]
    T = length if length is not None else -(-fullest // multiple) * multiple
    if T < fullest:
        raise ValueError(f"packed length {T} is shorter than the fullest micro-batch ({fullest})")
    return [PackedMicroBatch(b, [valid_lengths[i] for i in b], T, max(longest, 1)) for b in bins]


def pack_routing(p: PackedMicroBatch, routing: torch.Tensor) -> torch.Tensor:
    """Packed ``[1, T, k]`` experts of ``routing [N, L, k]``; the padding tail gets experts
    0..k-1 (replay needs k distinct experts per token, a fill of 0 would repeat one)."""
    out = p.pack(routing)
    k = routing.shape[-1]
    out[0, sum(p.lengths):] = torch.arange(k, dtype=out.dtype)
    return out
