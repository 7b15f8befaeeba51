"""The SFT trainer on the tiny MoE policy: it learns, any parallel layout equals one rank, every
config field is checked when the config is made, and the recipe exposes checkpoints, resume and
the token budget. (Micro-batches: test_sft_microbatches.py; resume: test_sft_resume.py.)"""
import dataclasses
from pathlib import Path

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
    # both slow (~35-55 s each on 2 cores): SFT runs the GRPO trainer's megatron model,
    # optimizer and schedules, whose TP2 x EP2 and PP2 equality with one rank the default suite
    # checks (tests/train/test_grpo.py, tests/policy/test_parallel_equivalence.py)
    pytest.param(4, {"tp": 2, "ep": 2}, marks=pytest.mark.slow),  # and DP2 for the dense part
    pytest.param(2, {"pp": 2}, marks=pytest.mark.slow),
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


@pytest.mark.parametrize("field, value, match", [
    ("steps", 0, "SFTConfig: steps must be an int >= 1, got 0"),
    ("steps", 2.5, "SFTConfig: steps must be an int >= 1, got 2.5"),
    ("steps", True, "SFTConfig: steps must be an int >= 1, got True"),
    ("batch_size", 0, "SFTConfig: batch_size must be an int >= 1, got 0"),
    ("save_every", -1, "SFTConfig: save_every must be an int >= 0, got -1"),
    ("seed", -3, "SFTConfig: seed must be an int >= 0, got -3"),
    ("resume", "yes", "SFTConfig: resume must be true or false, got 'yes'"),
    ("overwrite", 1, "SFTConfig: overwrite must be true or false, got 1"),
    ("loss_on_prompt", None, "SFTConfig: loss_on_prompt must be true or false, got None"),
    ("progress", "no", "SFTConfig: progress must be true or false, got 'no'"),
    ("out_dir", " ", "SFTConfig: out_dir must be a non-empty folder path, got ' '"),
    ("init_from", "", "SFTConfig: init_from must be None or a model folder path, got ''"),
    ("model", "tiny-moe", "SFTConfig: model must be a ModelConfig, got str"),
    ("parallel", {"tp": 2}, "SFTConfig: parallel must be a ParallelConfig, got dict"),
    ("optim", {"lr": 1e-3}, "SFTConfig: optim must be a OptimConfig, got dict"),  # (a bad
    # OptimConfig cannot be made: its choices are checked at construction)
    ("model", dataclasses.replace(MODEL, moe_router_topk=9), "topk"),
])
def test_every_config_field_is_checked_at_construction(tmp_path, field, value, match):
    with pytest.raises(ValueError) as err:
        SFTConfig(**{"out_dir": str(tmp_path), field: value})
    assert match in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_layout_errors_name_the_setting(tmp_path):
    from r1fast.train.sft import SFTTrainer

    cfg = make_cfg(tmp_path, ParallelConfig(micro_batch_size=3))  # 8 rows per rank
    with pytest.raises(ValueError, match=r"parallel.micro_batch_size \(3\) must divide the rows "
                                         r"per data parallel rank \(batch_size 8 / dp 1 = 8\)"):
        SFTTrainer(cfg, examples(), CharTokenizer())
    with pytest.raises(ValueError, match=r"examples\[1\] must be a dict with 'prompt' and "):
        SFTTrainer(make_cfg(tmp_path), [{"prompt": "a", "completion": "b"}, {"prompt": "c"}],
                   CharTokenizer())


def test_row_errors_come_before_the_model(tmp_path, monkeypatch):
    """Building the policy takes seconds and prints megatron's dump; a bad row needs none of
    it. Row 1200 is past what a check of the first rows alone would see."""
    import r1fast.train.sft as sft

    def built(*a, **k):
        raise AssertionError("the model was built before the row error was raised")

    monkeypatch.setattr(sft, "TrainEngine", built)
    rows = examples(1200) + [{"prompt": "c"}]
    with pytest.raises(ValueError, match=r"examples\[1200\] must be a dict with 'prompt'"):
        sft.SFTTrainer(make_cfg(tmp_path), rows, CharTokenizer())
    too_long = [{"prompt": "1+1=", "completion": "2" * MODEL.max_position_embeddings}]
    with pytest.raises(ValueError, match="longer than model.max_position_embeddings"):
        sft.SFTTrainer(make_cfg(tmp_path), too_long, CharTokenizer())


def test_one_epoch_of_batches_shows_every_row_once(tmp_path):
    from r1fast.train.sft import SFTTrainer

    rows = [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(48)]
    tok = CharTokenizer()
    trainer = SFTTrainer(make_cfg(tmp_path), rows, tok)
    drawn = []
    for _ in range(48 // 8):  # batch_size 8: one epoch
        for row in trainer._batch().tokens.tolist():
            text = tok.decode(row)  # specials (bos, pad) skipped
            drawn.append(text[:text.index("=") + 1])
    # draws with replacement left about 37% of the rows out of an epoch
    assert sorted(drawn) == sorted(r["prompt"] for r in rows)
    assert trainer.order.position == 48


def test_packed_dp_shares_are_balanced_by_tokens(tmp_path):
    """parallel.balance_dp_tokens was accepted and ignored by SFT: each DP rank took a
    contiguous slice, so with packing every rank ran the micro-batches of its fullest peer
    (helper-71: 5-13% more forward-backwards per step at DP 4-8). Every rank holds the step's
    rows, so it now takes a part of balanced token sums; the shares still cover the batch."""
    from r1fast.train.sft import SFTTrainer

    rows = [{"prompt": f"{i}=", "completion": "x" * (40 if i % 4 == 0 else 2)} for i in range(48)]
    packed = ParallelConfig(max_tokens_per_microbatch=64)

    def shares(parallel):
        trainer = SFTTrainer(make_cfg(tmp_path / str(id(parallel)), parallel), rows,
                             CharTokenizer())
        out = []
        for rank in range(2):  # as DP rank `rank` of 2 draws the same step
            trainer.order.position = 0
            trainer.info = dataclasses.replace(trainer.info, dp=2, dp_rank=rank)
            out.append(trainer._batch().lengths.tolist())
        return out

    balanced = shares(packed)
    sliced = shares(dataclasses.replace(packed, balance_dp_tokens=False))
    assert sorted(balanced[0] + balanced[1]) == sorted(sliced[0] + sliced[1])  # the same rows
    assert [len(s) for s in balanced] == [4, 4]
    assert abs(sum(balanced[0]) - sum(balanced[1])) < abs(sum(sliced[0]) - sum(sliced[1]))


def test_rows_that_cannot_train_fail_at_construction(tmp_path):
    from r1fast.data.tiny_hf import addition_problems, build_tokenizer, gsm8k_rows
    from r1fast.data.hf_tokenizer import HFTokenizer
    from r1fast.train.sft import SFTTrainer

    rows = examples(8) + [{"prompt": "1+1=", "completion": "2" * 80}]  # 85 > 64 positions
    small = dataclasses.replace(MODEL, max_position_embeddings=64)
    with pytest.raises(ValueError, match=r"^1 SFT row\(s\) are longer than model.max_position_"
                                         r"embeddings=64 tokens \(examples\[8\]: 85\)"):
        SFTTrainer(dataclasses.replace(make_cfg(tmp_path), model=small), rows, CharTokenizer())
    build_tokenizer(tmp_path / "tok", [r["question"] + " " + r["answer"]
                                       for r in gsm8k_rows(addition_problems(50, 0))])
    no_bos = HFTokenizer.load(tmp_path / "tok")
    assert no_bos.encode("", add_bos=True) == []
    wide = dataclasses.replace(MODEL, vocab_size=512)
    with pytest.raises(ValueError, match=r"SFT examples \[1\] \(1 in all\) have an empty prompt"):
        SFTTrainer(dataclasses.replace(make_cfg(tmp_path / "run"), model=wide),
                   [{"prompt": "3 + 4 =", "completion": "7"}, {"prompt": "", "completion": "7"}],
                   no_bos)


def test_recipe_exposes_checkpoints_resume_and_the_token_budget(tmp_path):
    from r1fast.pipeline.sft_recipe import load_sft_recipe, sft_config
    from r1fast.typed_toml import ConfigError

    sky = load_sft_recipe(Path(__file__).resolve().parents[2] / "recipes" / "sky_t1_sft.toml")
    # the long-trace recipe packs by tokens (one padded micro-batch of 96 traces would not fit)
    assert sky.parallel.max_tokens_per_microbatch >= 16384
    assert sky.sft.save_every > 0 and sky.sft.resume and not sky.sft.overwrite
    run = load_sft_recipe(None, ["--sft.save_every=5", "--sft.resume=false",
                                 "--sft.overwrite=true", "--parallel.max_tokens_per_microbatch=64",
                                 f"--sft.out_dir={tmp_path}", "--sft.warmup_fraction=0.1"])
    cfg = sft_config(run, MODEL, steps=30)
    assert (cfg.save_every, cfg.resume, cfg.overwrite) == (5, False, True)
    assert cfg.parallel.max_tokens_per_microbatch == 64 and cfg.optim.warmup_steps == 3
    assert cfg.out_dir == str(tmp_path) and cfg.steps == 30
    # a fraction rounds up (helper-71: 0.1 of 5 or 9 steps was no warmup at all)
    assert [sft_config(run, MODEL, steps=n).optim.warmup_steps for n in (5, 9, 19, 532)] == \
        [1, 1, 2, 54]
    for bad, match in ((["--sft.save_every=-2"], "sft.save_every must be >= 0"),
                       (["--parallel.max_tokens_per_microbatch=-1"], "max_tokens_per_microbatch"),
                       (["--sft.resume=maybe"], "sft.resume")):
        with pytest.raises(ConfigError, match=match):
            load_sft_recipe(None, bad)
