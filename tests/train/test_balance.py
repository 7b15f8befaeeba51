"""Balancing an update's rows over DP ranks (r1fast.train.balance): the partition is a
deterministic equal-count split whose token sums differ by at most one row; the exchange over a
gloo DP group gives every rank its part, with R3 tables following their rows. GRPO with
balancing equals one rank (tests/train/test_grpo.py::test_parallel_steps_equal_one_rank,
packed layouts)."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1fast.train.balance import balanced_partition
from tests.helpers.spawn import run_ranks


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4).flatmap(lambda parts: st.tuples(
    st.just(parts), st.integers(1, 6).flatmap(
        lambda k: st.lists(st.integers(0, 300), min_size=parts * k, max_size=parts * k)))))
def test_partition_is_equal_count_and_within_one_row(case):
    parts, lengths = case
    split = balanced_partition(lengths, parts)
    assert sorted(i for p in split for i in p) == list(range(len(lengths)))
    assert {len(p) for p in split} == {len(lengths) // parts}
    assert all(p == sorted(p) for p in split)
    sums = [sum(lengths[i] for i in p) for p in split]
    assert max(sums) - min(sums) <= max(lengths)
    assert balanced_partition(lengths, parts) == split  # a function of the lengths only


def test_partition_balances_a_skewed_batch():
    lengths = [400, 380, 350, 300, 20, 15, 12, 10]  # rank 0's rows long, rank 1's short
    split = balanced_partition(lengths, 2)
    sums = [sum(lengths[i] for i in p) for p in split]
    assert sums == [735, 752] and max(sums) < sum(lengths[:4]) * 0.6  # 1430 unbalanced


def test_partition_rejects_an_uneven_count():
    with pytest.raises(ValueError, match="cannot split 5 rows into 2 equal parts"):
        balanced_partition([1, 2, 3, 4, 5], 2)


def _exchange(rank, out_dir, world):
    import torch.distributed as dist

    from r1fast.train.balance import balance_over_dp
    from r1fast.train.batch import build_update_batch

    dist.init_process_group("gloo")
    g = torch.Generator().manual_seed(rank)
    n_prompt, n_comp = (30, 40) if rank == 0 else (3, 4)  # rank 0 holds the long rows
    prompts = [torch.randint(1, 50, (n_prompt + i,), generator=g).tolist() for i in range(4)]
    comps = [torch.randint(1, 50, (n_comp + i,), generator=g).tolist() for i in range(4)]
    logp = [[-0.5] * len(c) for c in comps]
    batch = build_update_batch(prompts, comps, logp, torch.arange(4.0) + 10 * rank,
                               torch.ones(4, dtype=torch.bool), 0, length=80)
    routing = {3: (batch.tokens % 7).to(torch.uint8)[..., None]}  # a per-token table
    out, table, stats = balance_over_dp(batch, routing, 2, None, rank, world)
    torch.save({"in": batch, "out": out, "table": table[3], "stats": stats},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [2, 4])
def test_exchange_gives_each_rank_its_part(tmp_path, world):
    """At DP4 a rank's part comes from several sources, each sending only what moves."""
    run_ranks(world, _exchange, str(tmp_path), world)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    every_out = sorted(a for r in res for a in r["out"].advantages.tolist())
    assert every_out == sorted(a for r in res for a in r["in"].advantages.tolist())  # once each
    for mb in (slice(0, 2), slice(2, 4)):  # each mini-batch (one optimizer step) is balanced
        tokens_in = [int(r["in"].lengths[mb].sum()) for r in res]
        tokens_out = [int(r["out"].lengths[mb].sum()) for r in res]
        longest = max(int(r["in"].lengths[mb].max()) for r in res)
        assert sum(tokens_in) == sum(tokens_out)
        assert max(tokens_out) - min(tokens_out) <= longest  # within one row
        assert max(tokens_out) < max(tokens_in)
    assert res[0]["stats"].after < res[0]["stats"].before
    every_in = {float(a): r["in"] for r in res for a in r["in"].advantages}  # rows by advantage
    for r in res:
        out = r["out"]
        assert out.num_rows == 4
        for i, a in enumerate(out.advantages.tolist()):  # each row arrives whole
            src = every_in[a]
            j = src.advantages.tolist().index(a)
            assert torch.equal(out.tokens[i], src.tokens[j])
            assert torch.equal(out.mask[i], src.mask[j])
            assert out.prompt_lengths[i] == src.prompt_lengths[j]
            assert torch.equal(r["table"][i, :, 0], (src.tokens[j] % 7).to(torch.uint8))
        # mini-batch 0 is rows 0-1 of both ranks (advantages < 2 or 10-11): it stays mini-batch 0
        assert all(a % 10 < 2 for a in out.advantages[:2].tolist())
    # only the rows that change rank are sent, each once: a row's tensors (every field at
    # L=80, and its [80, 1] uint8 routing table) per row that moved
    row = res[0]["in"].rows(slice(0, 1))
    row_bytes = sum(t.numel() * t.element_size() for t in vars(row).values()) + 80
    for rank, r in enumerate(res):
        mine = {float(a) for a in r["in"].advantages}
        moved = sum(float(a) in mine for o, other in enumerate(res) if o != rank
                    for a in other["out"].advantages)
        assert r["stats"].rows_sent == moved and r["stats"].bytes_sent == moved * row_bytes
    assert sum(r["stats"].rows_sent for r in res) > 0  # the skewed batch does move rows
