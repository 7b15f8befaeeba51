"""DAPO's refill (r1fast.train.dynamic_sampling): rounds until groups with signal fill the batch,
and the batch built from the chosen groups of several rounds."""
from __future__ import annotations

import logging

import pytest
import torch

from r1fast.rollout.routing import RolloutRouting
from r1fast.rollout.sampler import Rollout
from r1fast.train.dynamic_sampling import (RolloutBatch, gather_groups, has_signal,
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


def test_rounds_run_until_the_batch_is_full_and_extra_groups_are_dropped():
    # round 0: group 1 has signal; round 1: groups 0 and 2; want 2 groups
    plan = [[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 0], [0, 1, 0, 1, 0, 1]]
    ran = []

    def sample(r):
        ran.append(r)
        return fake_round(r, plan[r])
    rounds, chosen, n = sample_until_full(sample, group_size=G, groups=2, max_rounds=5,
                                          lacking_anywhere=lambda k: k, step=1)
    assert ran == [0, 1] and n == 2
    assert chosen == [(0, 1), (1, 0)]  # round 1's group 2 is not needed: dropped
    samples, rewards = gather_groups(rounds, chosen, G)
    assert samples.rollout.completion_ids == [[0, 2], [0, 3], [1, 0], [1, 1]]
    assert samples.texts == ["0.2", "0.3", "1.0", "1.1"]
    assert [e["round"] for e in samples.examples] == [0, 0, 1, 1]
    assert rewards == {"total": [0, 1, 0, 1], "accuracy": [False, True, False, True]}


def test_another_rank_still_lacking_keeps_every_rank_sampling():
    """Rounds are collective: a rank whose batch is full samples on while another lacks (its
    extra groups are dropped), and both stop together."""
    lacking = iter([3, 1, 0])
    rounds, chosen, n = sample_until_full(lambda r: fake_round(r, [0, 1, 0, 1]), group_size=G,
                                          groups=2, max_rounds=9,
                                          lacking_anywhere=lambda k: next(lacking), step=1)
    assert n == 3 and chosen == [(0, 0), (0, 1)]


def test_a_rank_still_short_after_the_last_round_fills_with_masked_groups(caplog):
    with caplog.at_level(logging.WARNING, logger="r1fast.train"):
        rounds, chosen, n = sample_until_full(lambda r: fake_round(r, [0, 0, 1 - min(r, 1), 0]),
                                              group_size=G, groups=2, max_rounds=3,
                                              lacking_anywhere=lambda k: k, step=4)
    assert n == 3 and chosen == [(0, 1), (0, 0)]  # round 0's group 1 has signal; fill after
    assert "step 4: after 3 sampling rounds a data-parallel rank still lacks 1 of its 2" \
        in caplog.text


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
