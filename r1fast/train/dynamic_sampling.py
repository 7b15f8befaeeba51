"""DAPO's dynamic sampling: sample more prompts until the step's batch holds groups that teach.

A group whose ``G`` completions all score the same has zero advantage everywhere: it adds no
gradient, only compute. As a policy improves, more groups are all-correct (or, early, all
wrong), and a step of ``prompts_per_step`` groups trains on fewer and fewer of them. DAPO (Yu et
al., 2025, §3.2) keeps the batch full instead: it samples further batches of prompts, keeps only
the groups whose rewards vary, and trains once it holds ``prompts_per_step`` of them (verl's
``algorithm.filter_groups``, ``max_num_gen_batches`` bounding the rounds).

Here (``algo.dynamic_sampling = true``):

* ``algo.max_sampling_rounds = 1``: one round; the groups without signal are masked and the
  step trains on the others (``kept_frac`` reports the share);
* ``N > 1``: up to ``N`` rounds of ``prompts_per_step`` prompts each, every round drawn from
  the data stream (the data position advances with each). Each DP rank keeps, in round order,
  the first of its own ``prompts_per_step / dp`` groups with signal; the rounds continue while
  any rank has fewer (every rank runs every round: sampling is collective). A rank still short
  after ``N`` rounds fills its batch with groups without signal, masked as with one round, and
  the step warns with the count. Groups with signal beyond what the batch holds are dropped,
  as DAPO drops them.

Each round's completions draw their own random streams (the round is part of the row's seed),
and round 0's are those of a run without refill, so ``max_sampling_rounds`` changes nothing on a
step whose first round is full. The step reports ``sampling_rounds``; its reward and length
metrics are those of the trained batch (which favours groups with signal), as verl's are.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Callable, Sequence

import torch

from r1fast.rollout.routing import RolloutRouting
from r1fast.rollout.sampler import Rollout

log = logging.getLogger("r1fast.train")

@dataclasses.dataclass
class RolloutBatch:
    """One step's samples on this DP rank: ``G`` completions per prompt, rows adjacent."""

    rollout: Rollout
    texts: list[str]
    """Decoded completions."""
    examples: list[dict]
    """The example of each row (its prompt's, repeated G times)."""

    @staticmethod
    def select(parts: Sequence[tuple["RolloutBatch", list[int]]]) -> "RolloutBatch":
        """The rows ``idx`` of each batch, one after the other."""
        return RolloutBatch(select_rollout([(b.rollout, idx) for b, idx in parts]),
                            [b.texts[i] for b, idx in parts for i in idx],
                            [b.examples[i] for b, idx in parts for i in idx])


#: (samples of one round, their rewards {"total": [...], part: [...]}) on this DP rank
Round = tuple[RolloutBatch, dict[str, list[float]]]


def has_signal(rewards: Sequence[float], group_size: int) -> list[bool]:
    """Per group (``group_size`` adjacent rows): whether its rewards are not all equal."""
    return [max(rewards[i:i + group_size]) > min(rewards[i:i + group_size])
            for i in range(0, len(rewards), group_size)]


def sample_until_full(sample_round: Callable[[int], Round], *, group_size: int, groups: int,
                      max_rounds: int, lacking_anywhere: Callable[[int], int],
                      step: int) -> tuple[list[Round], list[tuple[int, int]], int]:
    """Rounds ``sample_round(r)`` (r = 0, 1, ...) until this rank holds ``groups`` groups with
    signal, ``lacking_anywhere(n)`` (the most any rank lacks: collective) says every rank does,
    or ``max_rounds`` ran. Returns (the rounds, the chosen ``(round, group)`` pairs: ``groups``
    of them, those with signal first in round order, then fill, the rounds run)."""
    rounds: list[Round] = []
    chosen: list[tuple[int, int]] = []
    while True:
        r = len(rounds)
        rounds.append(sample_round(r))
        signal = has_signal(rounds[-1][1]["total"], group_size)
        chosen += [(r, g) for g, s in enumerate(signal) if s][:groups - len(chosen)]
        short = lacking_anywhere(groups - len(chosen))
        if short == 0 or len(rounds) == max_rounds:
            break
    if len(chosen) < groups:
        taken = set(chosen)
        fill = [(r, g) for r in range(len(rounds))
                for g in range(len(rounds[r][1]["total"]) // group_size) if (r, g) not in taken]
        chosen += fill[:groups - len(chosen)]
    if short:
        log.warning("step %d: after %d sampling rounds a data-parallel rank still lacks %d of "
                    "its %d groups with signal: they are masked (algo.max_sampling_rounds "
                    "bounds the rounds)", step, len(rounds), short, groups)
    return rounds, chosen, len(rounds)


def gather_groups(rounds: Sequence[Round], chosen: Sequence[tuple[int, int]], group_size: int
                  ) -> Round:
    """The batch of the ``chosen`` ``(round, group)`` pairs, in that order: their samples
    and rewards."""
    rows = [(r, g * group_size + j) for r, g in chosen for j in range(group_size)]
    order: list[tuple[int, list[int]]] = []
    for r, i in rows:  # consecutive rows of one round go together
        if not order or order[-1][0] != r:
            order.append((r, []))
        order[-1][1].append(i)
    samples = RolloutBatch.select([(rounds[r][0], idx) for r, idx in order])
    rewards = {k: [rounds[r][1][k][i] for r, i in rows] for k in rounds[0][1]}
    return samples, rewards


def select_rollout(parts: Sequence[tuple[Rollout, list[int]]]) -> Rollout:
    """The rows ``idx`` of each rollout, one after the other (routing tables included)."""
    pick = [(ro, i) for ro, idx in parts for i in idx]
    routing = None
    if any(ro.routing is not None for ro, _ in pick):
        routing = _select_routing([(ro.routing, i) for ro, i in pick])
    return Rollout([list(ro.prompt_ids[i]) for ro, i in pick],
                   [list(ro.completion_ids[i]) for ro, i in pick],
                   [list(ro.logprobs[i]) for ro, i in pick],
                   [ro.truncated[i] for ro, i in pick], routing)


def _select_routing(rows: Sequence[tuple[RolloutRouting, int]]) -> RolloutRouting:
    """One table per layer holding the recorded tokens of ``rows`` end to end."""
    first = rows[0][0]
    lengths = [r.lengths[i] for r, i in rows]
    offsets = [0, *itertools.accumulate(lengths)][:-1]
    tables = {layer: torch.cat([r.tables[layer][r.offsets[i]:r.offsets[i] + r.lengths[i]]
                                for r, i in rows])
              for layer in first.tables}
    return RolloutRouting(tables, offsets, lengths, first.topk)
