"""DAPO's refill (r1fast.train.dynamic_sampling): rounds until groups with signal fill the batch,
and the batch built from the chosen groups of several rounds."""
from __future__ import annotations

import logging
import re
import threading

import pytest
import torch

from r1fast.rollout.routing import RolloutRouting
from r1fast.rollout.sampler import Rollout
from r1fast.train.batch import rank_prompts, rank_rows
from r1fast.train.dynamic_sampling import (RolloutBatch, has_signal, row_seeds,
                                           sample_until_full, select_rollout)

G = 2


def fake_round(r: int, rewards: list[float]):
    """A round of len(rewards) / G groups whose row i's completion is [r, i]."""
    n = len(rewards)
    ro = Rollout([[7]] * n, [[r, i] for i in range(n)], [[-0.5, -0.25]] * n, [False] * n)
    return (RolloutBatch(ro, [f"{r}.{i}" for i in range(n)], [{"round": r}] * n),
            {"total": list(rewards), "accuracy": [x > 0 for x in rewards]})


def test_has_signal_is_per_group():
    assert has_signal([1, 1, 0, 1, 0.5, 0.5], 2) == [False, True, False]
    # equal in the trainer's fp32 (its advantages are 0 and it masks the group): no signal
    assert has_signal([0.1 + 0.2, 0.3, 0.3, 0.3], 4) == [False]


def one_rank(obj):
    return [obj]


def keep_own(outgoing):
    return list(outgoing)


def test_rounds_run_until_the_batch_is_full_and_extra_groups_are_dropped():
    # round 0: group 1 has signal; round 1: groups 0 and 2; want 2 groups
    plan = [[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 0], [0, 1, 0, 1, 0, 1]]
    ran = []

    def sample(r):
        ran.append(r)
        return fake_round(r, plan[r])
    (samples, rewards), n = sample_until_full(sample, group_size=G, groups=2, max_rounds=5,
                                              dp_rank=0, all_gather=one_rank, exchange=keep_own, step=1)
    assert ran == [0, 1] and n == 2  # round 1's group 2 is not needed: dropped
    assert samples.rollout.completion_ids == [[0, 2], [0, 3], [1, 0], [1, 1]]
    assert samples.texts == ["0.2", "0.3", "1.0", "1.1"]
    assert [e["round"] for e in samples.examples] == [0, 0, 1, 1]
    assert rewards == {"total": [0, 1, 0, 1], "accuracy": [False, True, False, True]}


def test_a_step_still_short_after_the_last_round_fills_with_masked_groups(caplog):
    with caplog.at_level(logging.WARNING, logger="r1fast.train"):
        (samples, rewards), n = sample_until_full(
            lambda r: fake_round(r, [0, 0, 1 - min(r, 1), 0]), group_size=G, groups=2,
            max_rounds=3, dp_rank=0, all_gather=one_rank, exchange=keep_own, step=4)
    assert n == 3 and samples.texts == ["0.2", "0.3", "0.0", "0.1"]  # signal first, then fill
    assert "step 4: after 3 sampling rounds 1 of the 2 groups have signal" in caplog.text


class ThreadGroup:
    """all_gather between threads standing in for DP ranks."""

    def __init__(self, size):
        self.size, self.slots, self.sent = size, [None] * size, []
        self.barrier = threading.Barrier(size)

    def for_rank(self, rank):
        def all_gather(obj):
            self.slots[rank] = obj
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()  # every rank has read before the next call writes
            return out

        def exchange(outgoing):
            self.sent.append((rank, [bool(o) for o in outgoing]))
            return [box[rank] for box in all_gather(outgoing)]
        return all_gather, exchange


def run_dp(plan, dp, groups, max_rounds=9, mini_batches=1):
    """Each rank's batch and rounds when the round-r batch of prompts has per-group rewards
    plan[r] (a one-rank view: rank q samples its share of it, rank_prompts)."""
    group = ThreadGroup(dp)
    out = [None] * dp

    def rank(q):
        def sample(r):
            rewards = plan[r]
            samples, rw = fake_round(r, rewards)
            rows = rank_rows(len(rewards) // G, dp, q, mini_batches, G)
            return (RolloutBatch.select([(samples, rows)]),
                    {k: [v[i] for i in rows] for k, v in rw.items()})
        gather, exchange = group.for_rank(q)
        out[q] = sample_until_full(sample, group_size=G, groups=groups, max_rounds=max_rounds,
                                   dp_rank=q, all_gather=gather, exchange=exchange, step=1,
                                   warn=False, mini_batches=mini_batches)
    threads = [threading.Thread(target=rank, args=(q,)) for q in range(dp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, group.sent


def test_the_batch_does_not_depend_on_the_data_parallel_layout():
    """Groups are chosen over all ranks in a one-rank run's order and each rank trains on its
    slice: a rank whose own prompts lack signal gets groups another rank sampled (choosing
    per rank made the batch, the rounds and the data position depend on dp)."""
    plan = [[0, 1, 0, 1, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0]]
    ((one, rounds),), _ = run_dp(plan, 1, 4)
    assert rounds == 3
    parts, sent = run_dp(plan, 2, 4)
    assert [n for _, n in parts] == [3, 3]
    # rank 0 sampled a group of rank 1's slice: it goes to rank 1 alone, nothing else moves
    assert sorted(sent) == [(0, [False, True]), (1, [False, False])]
    texts = [t for (samples, _), _ in parts for t in samples.texts]
    assert texts == one[0].texts == ["0.0", "0.1", "0.2", "0.3", "1.0", "1.1", "2.4", "2.5"]
    rewards = [x for (_, rw), _ in parts for x in rw["total"]]
    assert rewards == one[1]["total"] == [0, 1, 0, 1, 0, 1, 1, 0]


def test_each_optimizer_step_trains_on_a_one_rank_runs_mini_batch():
    """With mini_batches > 1 each rank's mini-batch j was cut from its own slice, so an
    optimizer step trained on other rows at DP 2 than at DP 1 (rows 0,1,4,5 where one rank
    trains 0-3): the prompts are dealt so that rank q's mini-batch j is its share of the
    one-rank run's mini-batch j, the refill's chosen groups too."""
    plan = [[0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0, 1, 0],
            [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]]
    ((one, _),), _ = run_dp(plan, 1, 4, mini_batches=2)
    parts, _ = run_dp(plan, 2, 4, mini_batches=2)
    texts = [samples.texts for (samples, _), _ in parts]
    for j in range(2):  # mini-batch j: split_even of each rank's rows
        rank_rows_j = [t for rank in texts for t in rank[j * G:(j + 1) * G]]
        assert sorted(rank_rows_j) == sorted(one[0].texts[j * 2 * G:(j + 1) * 2 * G])
    assert rank_prompts(8, 2, 1, 2) == [2, 3, 6, 7] and rank_prompts(6, 2, 1, 2) == [3, 4, 5]
    assert rank_rows(4, 2, 1, 2, 2) == [2, 3, 6, 7]


def test_selected_rows_keep_their_routing():
    """Router replay of refilled groups: each chosen row's recorded experts, end to end."""
    def rollout(tag, lengths):
        offsets = [sum(lengths[:i]) for i in range(len(lengths))]
        tables = {3: torch.arange(sum(lengths) * 2, dtype=torch.int16).view(-1, 2) + tag}
        n = len(lengths)
        return Rollout([[1]] * n, [[2]] * n, [[0.0]] * n, [False] * n,
                       RolloutRouting(tables, offsets, list(lengths), 2))
    a, b = rollout(0, [2, 3, 1]), rollout(100, [1, 2])
    out = select_rollout([(a, [1]), (b, [1, 0])])
    assert out.routing.lengths == [3, 2, 1] and out.routing.offsets == [0, 3, 5]
    want = torch.cat([a.routing.tables[3][2:5], b.routing.tables[3][1:3],
                      b.routing.tables[3][0:1]])
    assert torch.equal(out.routing.tables[3], want)


@pytest.mark.parametrize("rounds,dynamic", [(0, True), (2, False)])
def test_bad_round_settings_are_named(rounds, dynamic):
    from r1fast.train.config import load_train_config

    with pytest.raises(ValueError, match="algo.max_sampling_rounds must be >= 1, and > 1 only "
                                         "with algo.dynamic_sampling = true"):
        load_train_config(None, [f"--algo.max_sampling_rounds={rounds}",
                                 f"--algo.dynamic_sampling={str(dynamic).lower()}"])


def test_round_zero_seeds_are_those_of_a_run_without_refill():
    assert row_seeds(3, 5, 0, [0, 1]) == [hash((3, 5, i)) & 0x7FFF_FFFF_FFFF_FFFF for i in (0, 1)]
    assert row_seeds(3, 5, 1, [0, 1]) != row_seeds(3, 5, 0, [0, 1])


def test_negative_seeds_are_refused_where_they_would_share_streams():
    """CPython hashes -1 as -2, so run.seed=-1 and -2 sampled the same completions (helper-70)."""
    from r1fast.rollout.engine import stream_seed
    from r1fast.train.config import load_train_config

    assert hash((-1, 5, 0)) == hash((-2, 5, 0))  # why: the collision the check prevents
    for bad in (-1, -2, True, 1.5):
        with pytest.raises(ValueError, match=re.escape(f"seed must be an int >= 0, got {bad!r}")):
            stream_seed(bad, 5, 0)
    with pytest.raises(ValueError, match=r"run.seed must be >= 0, got -1"):
        load_train_config(None, ["--run.seed=-1"])
    assert stream_seed(0, 5, 0) != stream_seed(1, 5, 0)
