"""Balance an update's tokens over the data-parallel ranks before packing.

Each DP rank generates completions for its own prompts, so after a rollout one rank may hold
twice the tokens of another (long-tailed lengths). With packed micro-batches the work of a rank
follows its tokens, while every rank must run the same number of forwards (the MoE all-to-all
spans DP ranks; r1fast.train.packing pads the count with empty micro-batches): the whole step
waits for the fullest rank. This module moves rows between the DP ranks so that each gets about
the same number of tokens:

1. the row lengths of mini-batch ``j`` are gathered over the DP group (all ranks of one model
   replica -- its TP and PP ranks -- hold the same rows and make the same exchange);
2. :func:`balanced_partition` splits the rows into ``dp`` parts of equal row count, greedily
   (longest row first, into the part with the fewest tokens that still has room; ties by
   index: deterministic, a function of the lengths only), the same on every rank;
3. each rank sends every other rank only the rows of that rank's part (one
   ``scatter_object_list`` per source rank) and keeps its part in global row order.

Balancing is done per mini-batch, so each optimizer step sees exactly the rows it saw before:
the loss is a global sum over rows divided by a global normaliser and gradients are summed over
DP, so the update equals the unbalanced one up to float rounding (tested). Row-level tensors
(tokens, masks, advantages, sampler log-probs, R3 routing tables) travel together.

Cost: ``dp`` integers per row to every rank, then each row that changes rank is sent once, to
its new rank (host tensors, pickled); rows that stay are not sent. :class:`BalanceStats`
counts the rows and tensor bytes a rank sent (GRPO logs them as ``dp_balance_rows_sent`` and
``dp_balance_bytes_sent``; tests/train/test_balance.py checks them against the rows that moved).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from r1fast.policy.parallel import exchange_objects
from r1fast.train.batch import UpdateBatch, split_even


def balanced_partition(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Row indices of ``parts`` equal-size parts (``len(lengths)`` must divide by ``parts``)
    with balanced token sums: longest row first, each into the part with the fewest tokens
    among those not full (ties: lower part). Indices are ascending within a part."""
    n = len(lengths)
    if parts < 1 or n % parts:
        raise ValueError(f"cannot split {n} rows into {parts} equal parts")
    size = n // parts
    sums, members = [0] * parts, [[] for _ in range(parts)]
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        p = min((q for q in range(parts) if len(members[q]) < size), key=lambda q: (sums[q], q))
        members[p].append(i)
        sums[p] += lengths[i]
    return [sorted(m) for m in members]


@dataclasses.dataclass
class BalanceStats:
    """What balancing did, seen from one rank."""

    before: float
    """Real tokens on the fullest rank over the mean rank, before balancing."""
    after: float
    """The same ratio after balancing."""
    rows_sent: int = 0
    """Rows this rank sent to other ranks (its rows that stay are not sent)."""
    bytes_sent: int = 0
    """Tensor bytes of those rows (every UpdateBatch field and routing table; the pickling
    around them not counted)."""


def _imbalance(tokens_per_rank: Sequence[int]) -> float:
    mean = sum(tokens_per_rank) / len(tokens_per_rank)
    return max(tokens_per_rank) / mean if mean > 0 else 1.0


def balance_over_dp(batch: UpdateBatch, routing: Optional[dict[int, torch.Tensor]],
                    mini_batches: int, group, dp_rank: int, dp: int
                    ) -> tuple[UpdateBatch, Optional[dict[int, torch.Tensor]], BalanceStats]:
    """This rank's rows after balancing each of the ``mini_batches`` over the ``dp`` ranks of
    ``group`` (module doc); ``routing`` ({layer: [N, L, k]} or None) follows its rows."""
    parts, before, after, rows_sent, bytes_sent = [], [0] * dp, [0] * dp, 0, 0
    for sl in split_even(batch.num_rows, mini_batches):
        local = {"batch": batch.rows(sl),
                 "routing": None if routing is None else {k: v[sl] for k, v in routing.items()}}
        gathered: list = [None] * dp
        dist.all_gather_object(gathered, local["batch"].lengths.tolist(), group=group)
        lengths = [n for rank_lengths in gathered for n in rank_lengths]
        split = balanced_partition(lengths, dp)
        per = len(lengths) // dp
        for r in range(dp):
            before[r] += sum(lengths[r * per:(r + 1) * per])
            after[r] += sum(lengths[i] for i in split[r])
        pieces, sent = _exchange(local, split, per, group, dp_rank)  # by source rank
        rows_sent += sum(p["batch"].num_rows for p in sent)
        bytes_sent += sum(_nbytes(p) for p in sent)
        mine = UpdateBatch.cat([p["batch"] for p in pieces])  # global row order
        table = None if routing is None else {
            k: torch.cat([p["routing"][k] for p in pieces]) for k in routing}
        parts.append((mine, table))
    out = UpdateBatch.cat([b for b, _ in parts])
    table = None if routing is None else {k: torch.cat([t[k] for _, t in parts])
                                          for k in routing}
    return out, table, BalanceStats(_imbalance(before), _imbalance(after), rows_sent,
                                    bytes_sent)


def _nbytes(piece: dict) -> int:
    """Tensor bytes of an exchanged ``{"batch", "routing"}`` piece."""
    tables = list((piece["routing"] or {}).values())
    fields = [getattr(piece["batch"], f.name) for f in dataclasses.fields(piece["batch"])]
    return sum(t.numel() * t.element_size() for t in fields + tables)


def _exchange(local: dict, split: list[list[int]], per: int, group,
              dp_rank: int) -> tuple[list[dict], list[dict]]:
    """The rows of ``split[dp_rank]`` (global indices; rank r holds ``r*per .. r*per+per-1``)
    as ``[{"batch", "routing"}]`` per source rank, ascending: each source scatters to every
    rank the rows of that rank's part it holds, itself included (kept, not sent). Also the
    pieces this rank sent to the others."""
    def take(rows: list[int]) -> dict:
        idx = torch.tensor(rows, dtype=torch.long)
        return {"batch": local["batch"].rows(idx), "routing": None if local["routing"] is None
                else {k: v[idx] for k, v in local["routing"].items()}}

    lo = dp_rank * per
    outgoing = [take([i - lo for i in part if lo <= i < lo + per]) for part in split]
    return (exchange_objects(outgoing, group, dp_rank),
            [o for r, o in enumerate(outgoing) if r != dp_rank])
