"""SFT micro-batches that follow tokens (issue #17): the step's rows packed end to end under
``parallel.max_tokens_per_microbatch`` (or padded micro-batches of ``micro_batch_size`` rows)
give the loss and EVERY gradient of the one padded micro-batch (1e-5, fp32), whose loss is the
mean NLL of the batch's target tokens computed independently from the policy's log-probs; and
the number of micro-batches follows the budget."""
import dataclasses
import math

import pytest
import torch

from r1fast.data import CharTokenizer
from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.optim import OptimConfig
from r1fast.policy.router import expert_load
from r1fast.train.sft import SFTConfig, SFTTrainer

# the MoE aux loss is left out: it is a mean per micro-batch, so regrouping rows moves it
MODEL = dataclasses.replace(ModelConfig.preset("tiny-moe"), vocab_size=128, aux_loss_coef=0.0)


def uneven_examples(n=32):
    """Prompts and completions of very different lengths (3-40 characters)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        a, b = torch.randint(0, 10 ** 4, (2,), generator=g).tolist()
        pad = int(torch.randint(0, 30, (1,), generator=g))
        out.append({"prompt": f"{a}+{b}=", "completion": f"{'so ' * (pad // 3)}{a + b}"})
    return out


def trainer(tmp_path, name, **parallel) -> SFTTrainer:
    cfg = SFTConfig(model=MODEL, parallel=ParallelConfig(**parallel), optim=OptimConfig(lr=1e-3),
                    steps=1, batch_size=8, out_dir=str(tmp_path / name))
    return SFTTrainer(cfg, uneven_examples(), CharTokenizer())


def loss_and_grads(tr: SFTTrainer, batch):
    """One forward-backward of ``batch`` through the trainer's micro-batches (no optimizer
    step): (loss, {param: gradient}, number of micro-batches)."""
    micro = tr._micro_batches(batch)
    out = tr.policy.forward_backward(micro, tr._loss_fn(tr._normalizer(batch)))
    grads = {n: p.main_grad.detach().clone() for n, p in tr.policy.gpt.named_parameters()}
    return sum(float(r["loss"]) for r in out), grads, len(micro)


@pytest.mark.parametrize("parallel", [{"max_tokens_per_microbatch": 40},
                                      {"micro_batch_size": 2}], ids=["packed", "rows"])
def test_micro_batches_equal_one_padded_micro_batch(tmp_path, parallel):
    ref = trainer(tmp_path, "ref")
    batch = ref._batch()
    assert len(set(batch.lengths.tolist())) > 3  # uneven rows: packing changes the layout
    loss_a, grads_a, n_a = loss_and_grads(ref, batch)
    load_a = expert_load(ref.policy)
    # the padded loss is the batch's mean target NLL (an independent computation)
    with torch.no_grad():
        logp = ref.policy.logprobs(batch.tokens, batch.targets)
    want = float(-(logp * batch.mask).sum() / batch.mask.sum())
    assert abs(loss_a - want) <= 1e-5 * max(1.0, abs(want)), (loss_a, want)

    other = trainer(tmp_path, "other", **parallel)
    loss_b, grads_b, n_b = loss_and_grads(other, batch)
    # the routers count each real token once: no pad of either layout (right padding, packed
    # tail) reaches the expert load
    real = int(batch.lengths.sum()) * MODEL.moe_router_topk
    for layer, counts in expert_load(other.policy).items():
        assert counts.sum().item() == load_a[layer].sum().item() == real, layer
        assert torch.equal(counts, load_a[layer]), layer
    assert n_a == 1 and 1 < n_b < batch.num_rows + 1, (n_a, n_b)
    assert abs(loss_a - loss_b) <= 1e-5 * max(1.0, abs(loss_a)), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    assert max(g.abs().max().item() for g in grads_a.values()) > 1e-3  # gradients are not 0
    worst = {k: (grads_a[k] - grads_b[k]).abs().max().item() for k in grads_a}
    assert max(worst.values()) <= 1e-5, sorted(worst.items(), key=lambda kv: -kv[1])[:3]


def test_the_number_of_micro_batches_follows_the_budget(tmp_path):
    tr = trainer(tmp_path, "budget", max_tokens_per_microbatch=64)
    batch = tr._batch()
    lengths = batch.lengths.tolist()
    total, pad = sum(lengths), tr.tokenizer.pad_id
    counts = {}
    for budget in (max(lengths), 2 * max(lengths), total // 2, total):
        tr.cfg = dataclasses.replace(tr.cfg, parallel=ParallelConfig(
            max_tokens_per_microbatch=budget))
        micro = tr._micro_batches(batch)
        real = [int((mb["tokens"] != pad).sum()) for mb in micro]  # pads only in the tail
        assert all(n <= budget for n in real), (budget, real)
        assert sum(real) == total  # every row once, nothing dropped
        assert sum(float(mb["mask"].sum()) for mb in micro) == float(batch.mask.sum())
        assert len({mb["tokens"].shape for mb in micro}) == 1  # one length T for all
        assert len(micro) >= math.ceil(total / budget)
        counts[budget] = len(micro)
    assert counts[total] == 1
    assert counts[max(lengths)] > counts[2 * max(lengths)] > counts[total]
    # fit logs the count of every step
    tr.cfg = dataclasses.replace(tr.cfg, parallel=ParallelConfig(max_tokens_per_microbatch=64))
    row = tr.step()
    assert row["micro_batches"] >= math.ceil(row["tokens"] / 64) > 1
