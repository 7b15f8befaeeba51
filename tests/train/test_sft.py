"""The SFT trainer on the tiny MoE policy: it learns, and any parallel layout equals one rank."""
import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from r1fast.data import CharTokenizer
from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.optim import OptimConfig
from r1fast.train.metrics import read_jsonl
from r1fast.train.sft import SFTConfig
from tests.helpers.spawn import run_ranks

MODEL = dataclasses.replace(ModelConfig.preset("tiny-moe"), vocab_size=128,
                            aux_loss_coef=0.0)  # the aux loss is per rank by design


def examples(n=48):
    g = torch.Generator().manual_seed(0)
    pairs = torch.randint(0, 50, (n, 2), generator=g).tolist()
    return [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in pairs]


def make_cfg(out_dir, parallel=None, **kw):
    return SFTConfig(model=MODEL, parallel=parallel or ParallelConfig(), out_dir=str(out_dir),
                     optim=OptimConfig(lr=kw.pop("lr", 3e-3)), steps=kw.pop("steps", 2),
                     batch_size=8, **kw)


def test_sft_lowers_the_loss_and_saves_a_model(tmp_path):
    from r1fast.train.sft import SFTTrainer

    path = SFTTrainer(make_cfg(tmp_path, steps=12), examples(), CharTokenizer()).fit()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    assert all(r["grad_norm"] > 0 and r["tokens"] > 0 for r in rows)
    assert (path / "model.safetensors").is_file() or any(path.glob("*.safetensors"))
    assert CharTokenizer.load(path) == CharTokenizer()


def _save_init(rank, out_dir):
    from r1fast.policy import build_policy, save_hf_checkpoint

    save_hf_checkpoint(build_policy(MODEL, ParallelConfig(), trainable=False), out_dir)


def _sft_worker(rank, out_dir, init, layout):
    from r1fast.train.sft import SFTTrainer

    # Adam turns float-rounding differences of near-zero gradients into update-sized ones;
    # a modest lr keeps the post-step weights comparable at 1e-5
    cfg = make_cfg(out_dir, ParallelConfig(**layout), init_from=init, lr=1e-3)
    SFTTrainer(cfg, examples(), CharTokenizer()).fit()


def _weights(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize("world, layout", [
    (4, {"tp": 2, "ep": 2}),  # TP2 x EP2, and DP2 for the dense part
    (2, {"pp": 2}),
], ids=["tp2xep2", "pp2"])
def test_parallel_sft_equals_one_rank(tmp_path, world, layout):
    init = str(tmp_path / "init")
    run_ranks(1, _save_init, init)
    run_ranks(1, _sft_worker, str(tmp_path / "one"), init, {})
    run_ranks(world, _sft_worker, str(tmp_path / "many"), init, layout)
    one = read_jsonl(tmp_path / "one/metrics.jsonl")
    many = read_jsonl(tmp_path / "many/metrics.jsonl")
    assert len(one) == len(many) == 2
    for a, b in zip(one, many):
        for key in ("loss", "grad_norm", "tokens"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
    w1, wn = _weights(tmp_path / "one/model"), _weights(tmp_path / "many/model")
    assert w1.keys() == wn.keys() and w1
    worst = max((w1[k].double() - wn[k].double()).abs().max().item() for k in w1)
    assert worst <= 1e-5, worst
