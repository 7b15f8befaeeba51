"""From sampled rows to the tensors of an update (r1fast.train.batch)."""
import pytest
import torch

from r1fast.train.batch import (all_ranks_int, build_update_batch, groups_with_signal,
                                split_even)


def test_rows_shift_pad_and_mask_exactly():
    prompts, comps = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9]]
    lps = [[-0.5, -0.25], [-1.0, -2.0, -3.0]]
    adv, keep = torch.tensor([1.0, -1.0]), torch.tensor([True, True])
    b = build_update_batch(prompts, comps, lps, adv, keep, pad_id=0, length=5)
    assert b.tokens.tolist() == [[1, 2, 3, 5, 0], [4, 7, 8, 0, 0]]
    assert b.targets.tolist() == [[2, 3, 5, 6, 0], [7, 8, 9, 0, 0]]
    # the mask is 1 exactly on the completion's targets
    assert b.mask.tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert b.rollout_logp.tolist() == [[0, 0, -0.5, -0.25, 0], [-1.0, -2.0, -3.0, 0, 0]]
    assert b.advantages.dtype == torch.float32 and b.num_rows == 2
    sub = b.rows(slice(1, 2))
    assert sub.num_rows == 1 and sub.tokens.tolist() == [[4, 7, 8, 0, 0]]


def test_dropped_rows_keep_their_place_with_a_zero_mask():
    b = build_update_batch([[1, 2]] * 2, [[3]] * 2, [[-1.0]] * 2, torch.zeros(2),
                           torch.tensor([True, False]), pad_id=0)
    assert b.tokens.shape == (2, 2) and b.mask.tolist() == [[0, 1], [0, 0]]
    assert b.keep.tolist() == [True, False]


def test_bad_batches_are_refused():
    with pytest.raises(ValueError, match="one entry per sequence"):
        build_update_batch([[1]], [[2], [3]], [[0.0]], torch.zeros(1), torch.ones(1, dtype=bool), 0)
    with pytest.raises(ValueError, match=r"length 2 is shorter than the longest sequence \(3\)"):
        build_update_batch([[1, 2]], [[3, 4]], [[0.0, 0.0]], torch.zeros(1),
                           torch.ones(1, dtype=bool), 0, length=2)


def test_groups_with_signal():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert groups_with_signal(r, 2).tolist() == [False, False, True, True, False, False]
    assert groups_with_signal(r, 3).tolist() == [True] * 3 + [True] * 3


def test_split_even_and_single_process_reduction():
    assert split_even(6, 3) == [slice(0, 2), slice(2, 4), slice(4, 6)]
    with pytest.raises(ValueError, match="cannot split 5 rows into 2 equal parts"):
        split_even(5, 2)
    assert all_ranks_int(7, "max") == 7 and all_ranks_int(7, "min") == 7


def _agree_worker(rank):
    from r1fast.policy.config import ModelConfig, ParallelConfig
    from r1fast.policy.parallel import init_parallel
    from r1fast.train.batch import model_parallel_agreed, scores_for_model_parallel_group

    init_parallel(ParallelConfig(tp=2), ModelConfig.preset("tiny-moe"))
    assert scores_for_model_parallel_group() == (rank == 0)  # one scorer per replica
    # the two TP ranks scored the same completions differently (a timeout on one of them)
    mine = {"total": [float(rank), 2.0 + rank], "accuracy": [1.0 * rank, 0.5]}
    assert model_parallel_agreed(mine) == {"total": [0.0, 2.0], "accuracy": [0.0, 0.5]}


def test_tensor_parallel_ranks_train_on_the_same_rewards(tmp_path):
    from tests.helpers.spawn import run_gloo

    run_gloo(2, str(tmp_path / "store"), _agree_worker)
