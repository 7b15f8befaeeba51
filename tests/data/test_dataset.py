"""PromptDataset and RowStream: epochs, determinism, resumable position."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1fast.data.dataset import PromptDataset, RowStream


def examples(n):
    return [{"id": f"e{i}", "prompt": f"p{i}"} for i in range(n)]


def ids(batch):
    return [e["id"] for e in batch]


def test_epoch_covers_everything_once():
    ds = PromptDataset(examples(10), batch_size=3, seed=1)
    assert len(ds) == 3
    seen = [i for _ in range(3) for i in ids(ds.next_batch())]
    assert len(seen) == len(set(seen)) == 9  # drop_last: one example skipped this epoch
    ds.next_batch()
    assert ds.epoch == 1


def test_no_drop_last_and_no_shuffle():
    ds = PromptDataset(examples(5), batch_size=2, shuffle=False, drop_last=False)
    assert len(ds) == 3
    assert [ids(ds.next_batch()) for _ in range(4)] == [["e0", "e1"], ["e2", "e3"], ["e4"], ["e0", "e1"]]


def test_deterministic_and_epochs_differ():
    a, b = PromptDataset(examples(20), 4, seed=7), PromptDataset(examples(20), 4, seed=7)
    run_a = [ids(a.next_batch()) for _ in range(10)]
    assert run_a == [ids(b.next_batch()) for _ in range(10)]
    assert run_a[:5] != run_a[5:]  # a new permutation each epoch
    c = PromptDataset(examples(20), 4, seed=8)
    assert [ids(c.next_batch()) for _ in range(5)] != run_a[:5]


@pytest.mark.parametrize("stop", [0, 1, 4, 5, 7])
def test_resume_matches_uninterrupted(stop):
    full = PromptDataset(examples(11), 3, seed=3)
    want = [ids(full.next_batch()) for _ in range(9)]
    first = PromptDataset(examples(11), 3, seed=3)
    got = [ids(first.next_batch()) for _ in range(stop)]
    state = first.state_dict()
    resumed = PromptDataset(examples(11), 3, seed=0)  # seed comes from the state
    resumed.load_state_dict(state)
    got += [ids(resumed.next_batch()) for _ in range(9 - stop)]
    assert got == want


def test_iter_is_endless():
    ds = PromptDataset(examples(3), 2)
    it = iter(ds)
    assert all(len(next(it)) == 2 for _ in range(10))


@pytest.mark.parametrize("call, match", [
    (lambda: PromptDataset([], 1), "examples must be a non-empty sequence"),
    (lambda: PromptDataset([1, 2], 1), r"examples\[0\] must be a dict"),
    (lambda: PromptDataset(examples(3), 0), "batch_size must be an int >= 1"),
    (lambda: PromptDataset(examples(3), 4), "batch_size must be <= the number of examples"),
])
def test_bad_construction(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_state():
    ds = PromptDataset(examples(4), 2)
    state = ds.state_dict()
    with pytest.raises(ValueError, match="state is for a different dataset"):
        PromptDataset(examples(5), 2).load_state_dict(state)
    with pytest.raises(ValueError, match="state is for a different dataset"):
        PromptDataset([{"id": "other", "prompt": "x"}] + examples(4)[1:], 2).load_state_dict(state)
    with pytest.raises(ValueError, match="state must have key 'position'"):
        ds.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="position in"):
        ds.load_state_dict({**state, "position": 9})


@settings(max_examples=60, deadline=None)
@given(num_rows=st.integers(1, 40), seed=st.integers(0, 5),
       chunks=st.lists(st.integers(1, 50), min_size=1, max_size=8))
def test_row_stream_is_without_replacement_and_chunking_free(num_rows, seed, chunks):
    stream = RowStream(num_rows, seed)
    taken = [i for k in chunks for i in stream.take(k)]
    assert stream.position == len(taken)
    # each full epoch is a permutation; the stream does not depend on how it was chunked
    for e in range(len(taken) // num_rows):
        assert sorted(taken[e * num_rows:(e + 1) * num_rows]) == list(range(num_rows))
    assert taken == RowStream(num_rows, seed).take(len(taken))
    resumed = RowStream(num_rows, seed)
    resumed.position = len(taken) // 2
    assert resumed.take(len(taken) - len(taken) // 2) == taken[len(taken) // 2:]


def test_row_stream_epochs_differ_and_match_the_dataset_order():
    stream = RowStream(50, 3)
    first, second = stream.take(50), stream.take(50)
    assert first != second and sorted(first) == sorted(second)
    ds = PromptDataset([{"id": i} for i in range(50)], 50, seed=3)
    assert [ex["id"] for ex in ds.next_batch()] == first
    with pytest.raises(ValueError, match="num_rows must be an int >= 1, got 0"):
        RowStream(0, 0)
