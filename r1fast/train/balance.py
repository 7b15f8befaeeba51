"""Balance an update's tokens over the data-parallel ranks before packing.

Each DP rank generates completions for its own prompts, so after a rollout one rank may hold
twice the tokens of another (long-tailed lengths). With packed micro-batches the work of a rank
follows its tokens, while every rank must run the same number of forwards (the MoE all-to-all
spans DP ranks; r1fast.train.packing pads the count with empty micro-batches): the whole step
waits for the fullest rank. This module moves rows between the DP ranks so that each gets about
the same number of tokens:

1. every rank's rows of mini-batch ``j`` are gathered over the DP group (all ranks of one
   model replica -- its TP and PP ranks -- hold the same rows and make the same exchange);
2. :func:`balanced_partition` splits them into ``dp`` parts of equal row count, greedily
   (longest row first, into the part with the fewest tokens that still has room; ties by
   index: deterministic, a function of the lengths only);
3. each rank keeps its part, in global row order.

Balancing is done per mini-batch, so each optimizer step sees exactly the rows it saw before:
the loss is a global sum over rows divided by a global normaliser and gradients are summed over
DP, so the update equals the unbalanced one up to float rounding (tested). Row-level tensors
(tokens, masks, advantages, sampler log-probs, R3 routing tables) travel together.

Cost: the exchange gathers every rank's rows to every rank of the DP group (host tensors,
``all_gather_object``), ``dp`` times the local batch of token ids and masks; an all-to-all of
only the moved rows would send less.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.distributed as dist

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
    """Real tokens on the fullest rank over the mean rank, before and after balancing."""

    before: float
    after: float


def _imbalance(tokens_per_rank: Sequence[int]) -> float:
    mean = sum(tokens_per_rank) / len(tokens_per_rank)
    return max(tokens_per_rank) / mean if mean > 0 else 1.0


def balance_over_dp(batch: UpdateBatch, routing: Optional[dict[int, torch.Tensor]],
                    mini_batches: int, group, dp_rank: int, dp: int
                    ) -> tuple[UpdateBatch, Optional[dict[int, torch.Tensor]], BalanceStats]:
    """This rank's rows after balancing each of the ``mini_batches`` over the ``dp`` ranks of
    ``group`` (module doc); ``routing`` ({layer: [N, L, k]} or None) follows its rows."""
    parts, before, after = [], [0] * dp, [0] * dp
    for sl in split_even(batch.num_rows, mini_batches):
        local = {"batch": batch.rows(sl),
                 "routing": None if routing is None else {k: v[sl] for k, v in routing.items()}}
        gathered: list = [None] * dp
        dist.all_gather_object(gathered, local, group=group)
        every = UpdateBatch.cat([g["batch"] for g in gathered])
        lengths = every.lengths.tolist()
        split = balanced_partition(lengths, dp)
        per = len(lengths) // dp
        for r in range(dp):
            before[r] += sum(lengths[r * per:(r + 1) * per])
            after[r] += sum(lengths[i] for i in split[r])
        mine = torch.tensor(split[dp_rank], dtype=torch.long)
        table = None
        if routing is not None:
            table = {k: torch.cat([g["routing"][k] for g in gathered])[mine] for k in routing}
        parts.append((every.rows(mine), table))
    out = UpdateBatch.cat([b for b, _ in parts])
    table = None if routing is None else {k: torch.cat([t[k] for _, t in parts])
                                          for k in routing}
    return out, table, BalanceStats(_imbalance(before), _imbalance(after))
