"""Packed micro-batches (r1fast.train.packing, r1fast.policy.packed): the assignment, the
layout, and packed == padded for the policy's log-probs and the GRPO update."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1fast.policy.packed import packed_layout
from r1fast.train.batch import build_update_batch
from r1fast.train.packing import pack_rows, packed_micro_batches


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=30), budget=st.integers(1, 64))
def test_every_row_is_packed_once_within_the_budget(lengths, budget):
    bins = pack_rows(lengths, budget)
    rows = sorted(i for b in bins for i in b)
    assert rows == [i for i, n in enumerate(lengths) if n > 0]
    for b in bins:
        assert sum(lengths[i] for i in b) <= budget or len(b) == 1
        assert b == sorted(b)
    assert pack_rows(lengths, budget) == bins  # a function of the lengths only


def test_first_fit_decreasing_fills_bins():
    # longest first: 6 -> bin 0, 5 -> bin 1, 4 -> bin 2, 3 joins 5, 2 joins 6
    assert pack_rows([5, 3, 4, 2, 6], 8) == [[3, 4], [0, 1], [2]]
    with pytest.raises(ValueError, match="max_tokens_per_microbatch must be >= 1"):
        pack_rows([1], 0)


def test_pack_and_unpack_round_trip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 3, generator=g)
    lengths = [7, 2, 5, 3]
    packs = packed_micro_batches(lengths, 9, length=10)
    out = torch.zeros_like(x)
    for p in packs:
        packed = p.pack(x)
        assert packed.shape == (1, 10, 3)
        p.unpack(packed, out)
        cu = p.cu_seqlens()
        assert int(cu[-1]) == 10 and cu.diff()[:len(p.lengths)].tolist() == p.lengths
        # the tail is cut into pieces no longer than the longest row (a positions limit)
        assert max(cu.diff().tolist()) <= max(lengths)
        width = len(p.segments()) + 3
        assert p.cu_seqlens(width)[-1] == 10 and p.cu_seqlens(width).numel() == width
    for i, n in enumerate(lengths):
        assert torch.equal(out[i, :n], x[i, :n]) and not out[i, n:].any()


def test_packed_layout_is_block_diagonal_causal():
    cu = torch.tensor([0, 3, 3, 5, 6])  # an empty sequence is allowed
    pos, mask = packed_layout(cu, 6)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0]]
    seg = [0, 0, 0, 2, 2, 3]
    want = torch.tensor([[not (seg[i] == seg[j] and j <= i) for j in range(6)] for i in range(6)])
    assert torch.equal(mask[0, 0], want)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to the packed length 7"):
        packed_layout(cu, 7)


def _rows(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (int(torch.randint(2, 9, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(n)]
    comps = [torch.randint(3, vocab, (int(torch.randint(1, 12, (1,), generator=g)),),
                           generator=g).tolist() for _ in range(n)]
    return prompts, comps


def test_policy_logprobs_packed_equal_padded():
    from r1fast.policy import ParallelConfig, build_policy
    from r1fast.policy.config import ModelConfig

    model = dataclasses.replace(ModelConfig.preset("tiny-moe"), vocab_size=128)
    policy = build_policy(model, ParallelConfig(), trainable=False)
    prompts, comps = _rows(6, 128)
    batch = build_update_batch(prompts, comps, [[0.0] * len(c) for c in comps], torch.zeros(6),
                               torch.ones(6, dtype=torch.bool), pad_id=0)
    padded = policy.logprobs(batch.tokens, batch.targets)
    packs = packed_micro_batches(batch.lengths.tolist(), 24)
    width = max(len(p.rows) for p in packs) + 2
    packed = policy.logprobs(torch.cat([p.pack(batch.tokens) for p in packs]),
                             torch.cat([p.pack(batch.targets) for p in packs]), micro_batch_size=1,
                             cu_seqlens=torch.stack([p.cu_seqlens(width) for p in packs]))
    out = torch.zeros_like(padded)
    for i, p in enumerate(packs):
        p.unpack(packed[i:i + 1], out)
    valid = torch.arange(batch.tokens.shape[1])[None] < batch.lengths[:, None]
    assert len(packs) < 6
    assert (out - padded)[valid].abs().max().item() < 1e-5


def test_grpo_update_packed_equals_padded(tmp_path):
    from r1fast.train.config import load_train_config
    from r1fast.train.grpo import GRPOTrainer
    from r1fast.train.metrics import gather_expert_load

    def trainer(name, *extra):
        cfg = load_train_config(None, [
            "--model.vocab_size=128", "--model.aux_loss_coef=0.0", "--reward.workers=0",
            # a modest lr: Adam turns rounding-level differences of near-zero gradients into
            # differences of up to lr per weight
            "--algo.kl_coef=0.01", "--optim.lr=0.001", "--run.progress=false",
            "--run.tensorboard=false", f"--run.out_dir={tmp_path / name}", *extra])
        return GRPOTrainer(cfg)

    prompts, comps = _rows(8, 128, seed=1)
    batch = build_update_batch(prompts, comps, [[-1.0] * len(c) for c in comps],
                               torch.tensor([1.0, -1.0] * 4), torch.ones(8, dtype=torch.bool),
                               pad_id=0)
    results = {}
    for name, extra in (("padded", ()), ("packed", ("--parallel.max_tokens_per_microbatch=32",))):
        tr = trainer(name, *extra)
        old, ref = tr._old_and_ref_logprobs(batch, None)
        upd = tr._update(batch, old, ref)
        weights = {k: v.detach().clone() for k, v in tr.policy.gpt.state_dict().items()
                   if isinstance(v, torch.Tensor)}
        results[name] = (old, upd, weights, gather_expert_load(tr.policy))
        tr.task.close()
    (old_a, upd_a, w_a, load_a), (old_b, upd_b, w_b, load_b) = results["padded"], \
        results["packed"]
    valid = torch.arange(batch.tokens.shape[1])[None] < batch.lengths[:, None]  # pads differ
    assert not valid.all()
    # every real token routed once per update pass, no pad (right padding, packed tail) counted
    assert load_a.keys() == load_b.keys() and all(load_a[k] == load_b[k] for k in load_a)
    assert sum(load_a[0]) % (int(batch.lengths.sum()) * 2) == 0
    assert (old_a - old_b)[valid].abs().max().item() < 1e-5
    for key in ("loss", "grad_norm", "kl_mean"):
        assert abs(upd_a[key] - upd_b[key]) <= 1e-5 * max(1.0, abs(upd_a[key])), key
    assert upd_a["grad_norm"] > 0
    assert max((w_a[k] - w_b[k]).abs().max().item() for k in w_a) < 1e-5


def test_a_packed_row_may_exceed_max_positions_but_no_sequence_may():
    from r1fast.policy import ParallelConfig, build_policy
    from r1fast.policy.config import ModelConfig

    model = dataclasses.replace(ModelConfig.preset("tiny-moe"), vocab_size=128,
                                max_position_embeddings=16)
    policy = build_policy(model, ParallelConfig(), trainable=False)
    tokens = torch.randint(3, 100, (1, 30))
    out = policy.logprobs(tokens, tokens, micro_batch_size=1,
                          cu_seqlens=torch.tensor([[0, 10, 20, 30]]))  # three 10-token rows
    assert out.shape == (1, 30) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="sequence length 20 exceeds max_position_embeddings=16"):
        policy.logprobs(tokens, tokens, micro_batch_size=1, cu_seqlens=torch.tensor([[0, 20, 30]]))


def test_a_row_over_the_budget_is_warned_about_once(caplog):
    from r1fast.train import packing

    packing._warned_budgets.discard(40)
    with caplog.at_level("WARNING", logger="r1fast.train"):
        packs = packed_micro_batches([100, 10, 20], 40)
        packed_micro_batches([100, 10, 20], 40)
    assert [p.rows for p in packs] == [[0], [1, 2]] and {p.length for p in packs} == {100}
    warned = [r.getMessage() for r in caplog.records if "packing budget" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("a row of 100 tokens is longer than the "
                                                     "packing budget of 40 tokens")
