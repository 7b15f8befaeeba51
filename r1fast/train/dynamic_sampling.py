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
  the data stream (the data position advances with each), until the rounds hold
  ``prompts_per_step`` groups with signal over all DP ranks. The step trains on the first of
  them in the order of a one-rank run (round, then prompt), each rank on its share, dealt as a
  round's prompts are (:func:`r1fast.train.batch.rank_prompts`), fetched from the rank that
  sampled it (a group sampled on one rank for another's share is sent to that rank alone, as
  an object over gloo), so the batch does not depend on the layout. Short after ``N``
  rounds, the step fills up with groups without signal, masked as with one round, and warns with the count. Groups with signal beyond what the batch holds
  are dropped, as DAPO drops them.

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

from r1fast.rollout.engine import stream_seed
from r1fast.rollout.routing import RolloutRouting
from r1fast.rollout.sampler import Rollout
from r1fast.train.batch import groups_with_signal, rank_prompts

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


def row_seeds(seed: int, step: int, round_: int, rows: Sequence[int]) -> list[int]:
    """The random stream of each completion, a function of (run seed, step, its row in the
    global batch, the refill round after the first): the same samples at any TP/EP/PP/DP
    layout, identical across the ranks of one model replica, reproducible after a resume."""
    extra = (round_,) if round_ else ()  # round 0: the seeds of a run without refill
    return [stream_seed(seed, step, i, *extra) for i in rows]


def has_signal(rewards: Sequence[float], group_size: int) -> list[bool]:
    """Per group (``group_size`` adjacent rows): whether its rewards are not all equal, in the
    fp32 the trainer's advantages and mask use (rewards equal only there would fill the batch
    with a group the update then masks)."""
    varied = groups_with_signal(torch.tensor(rewards, dtype=torch.float32), group_size)
    return varied[::group_size].tolist()


#: a group of a step: (round, its prompt's index in the round's batch, DP rank that sampled
#: it, its index on that rank), sorted as a one-rank run orders its groups
Group = tuple[int, int, int, int]


def sample_until_full(sample_round: Callable[[int], Round], *, group_size: int,
                      groups: int, max_rounds: int, dp_rank: int,
                      all_gather: Callable[[object], list], exchange: Callable[[list], list],
                      step: int, warn: bool = True, mini_batches: int = 1
                      ) -> tuple[Round, int]:
    """Rounds ``sample_round(r)`` (r = 0, 1, ...) on every DP rank until the step holds
    ``groups`` groups with signal over all ranks, or ``max_rounds`` ran; then this rank's share
    of them: the first ``groups`` in the order of a one-rank run (filled up with groups
    without signal when short), dealt as each round's prompts are
    (:func:`r1fast.train.batch.rank_prompts` with ``mini_batches``), fetched from the ranks
    that sampled them. ``all_gather(obj)``: the objects of every DP rank, in rank order;
    ``exchange(outgoing)``: ``outgoing[r]`` sent to rank r, what each rank sent here returned
    (both collective). Returns (this rank's batch, the rounds run)."""
    rounds: list[Round] = []
    signal: list[Group] = []
    quiet: list[Group] = []  # without signal, for filling
    while len(signal) < groups and len(rounds) < max_rounds:
        r = len(rounds)
        rounds.append(sample_round(r))
        flags = all_gather(has_signal(rounds[-1][1]["total"], group_size))
        dp, size = len(flags), sum(map(len, flags))  # the round's prompts, dealt over dp
        index = [rank_prompts(size, dp, q, mini_batches) for q in range(dp)]
        for q, g in sorted(((q, g) for q in range(dp) for g in range(len(flags[q]))),
                           key=lambda qg: index[qg[0]][qg[1]]):  # the one-rank order
            (signal if flags[q][g] else quiet).append((r, index[q][g], q, g))
    chosen = (signal + quiet)[:groups]
    if len(signal) < groups and warn:
        log.warning("step %d: after %d sampling rounds %d of the %d groups have signal: the "
                    "others are masked (algo.max_sampling_rounds bounds the rounds)", step,
                    len(rounds), len(signal), groups)
    deal = [rank_prompts(groups, dp, q, mini_batches) for q in range(dp)]
    owner = {i: q for q, idx in enumerate(deal) for i in idx}  # chosen[i] trains on rank q
    # the groups this rank sampled for another rank's share travel there, and only there
    outgoing: list[dict] = [{} for _ in deal]
    for i, (r, _, q, g) in enumerate(chosen):
        if q == dp_rank and owner[i] != dp_rank:
            outgoing[owner[i]][(r, q, g)] = _group(rounds[r], g, group_size)
    received = {k: v for part in exchange(outgoing) for k, v in part.items()}
    pieces = [_group(rounds[r], g, group_size) if q == dp_rank else received[(r, q, g)]
              for r, _, q, g in (chosen[i] for i in deal[dp_rank])]
    return _concat(pieces), len(rounds)


def _group(round_: Round, g: int, group_size: int) -> Round:
    """Group ``g`` of a round: its rows and their rewards."""
    rows = list(range(g * group_size, (g + 1) * group_size))
    samples, rewards = round_
    return (RolloutBatch.select([(samples, rows)]),
            {k: [v[i] for i in rows] for k, v in rewards.items()})


def _concat(pieces: Sequence[Round]) -> Round:
    """The rows of ``pieces`` one after the other."""
    samples = RolloutBatch.select([(b, list(range(len(b.texts)))) for b, _ in pieces])
    rewards = {k: [x for _, r in pieces for x in r[k]] for k in pieces[0][1]}
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
