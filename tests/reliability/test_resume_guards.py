"""A GRPO run over a hostile run folder: a damaged ``latest`` pointer must resume from the
newest committed checkpoint, a fresh start never overwrites or deletes an existing run without
``run.overwrite``, resumed metrics have no duplicate steps, a longer run.steps says what
happens to the LR schedule, a KL term turned on at resume is refused before the build."""
import logging

import pytest

from r1fast.train.config import load_train_config
from r1fast.train.metrics import read_jsonl
from r1fast.typed_toml import ConfigError

pytestmark = pytest.mark.reliability

BASE = ["--model.vocab_size=128", "--data.prompts_per_step=1", "--algo.group_size=2",
        "--rollout.max_new_tokens=4", "--reward.workers=0", "--run.progress=false",
        "--run.tensorboard=false", "--data.num_train=16", "--algo.kl_coef=0"]


def _fit(out, *extra):
    from r1fast.train.grpo import GRPOTrainer

    cfg = load_train_config(None, [*BASE, f"--run.out_dir={out}", *extra])
    return GRPOTrainer(cfg).fit()


def test_damaged_pointer_resumes_newest_and_metrics_are_truncated(tmp_path, caplog):
    out = tmp_path / "run"
    _fit(out, "--run.steps=2", "--run.save_every=1")
    ckpts = out / "checkpoints"
    assert (ckpts / "step_00000002").is_dir() and (ckpts / "step_00000001").is_dir()
    (ckpts / "latest").write_text("../..")
    # a crash after logging steps 3 and 4 but before their checkpoint, with a torn last line
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.0}\n{"step": 4, "loss": 1.0}\n{"step": 5, "lo')
    with caplog.at_level(logging.INFO, logger="r1fast.train"):
        rows = _fit(out, "--run.steps=3", "--run.save_every=1")
    assert [r["step"] for r in rows] == [3]
    assert "newest complete checkpoint" in caplog.text and "step_00000002" in caplog.text
    assert "dropped 2 row(s) after step 2" in caplog.text
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    # a constant LR schedule is extended to the longer run (exact), and the log says so
    assert "constant LR schedule is extended from 2 to 3 updates" in caplog.text
    assert (ckpts / "step_00000002").is_dir() and (ckpts / "step_00000003").is_dir()


def test_fresh_start_over_an_existing_run_needs_overwrite(tmp_path):
    out = tmp_path / "run"
    _fit(out, "--run.steps=1")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    # every checkpoint torn (no meta.json): no silent restart, nothing deleted
    (out / "checkpoints" / "step_00000001" / "meta.json").unlink()
    with pytest.raises(ConfigError, match="--run.overwrite=true") as e:
        _fit(out, "--run.steps=1")
    assert str(out) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="resume=false"):
        _fit(out, "--run.steps=1", "--run.resume=false")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    # with the flag the old files are moved aside, never deleted (the eval rows too)
    (out / "eval.jsonl").write_text('{"step": 1, "pass_at_1": 0.0}\n')
    rows = _fit(out, "--run.steps=1", "--run.overwrite=true")
    assert [r["step"] for r in rows] == [1]
    aside = list(out.glob("previous_*"))
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "step_00000001").is_dir()
    assert len(read_jsonl(aside[0] / "metrics.jsonl")) == 1
    assert (aside[0] / "eval.jsonl").is_file() and not (out / "eval.jsonl").exists()
    assert len(read_jsonl(out / "metrics.jsonl")) == 1


def test_longer_run_with_a_decaying_lr_says_the_schedule_is_kept(tmp_path, caplog):
    out = tmp_path / "run"
    cosine = ("--optim.lr_decay_style=cosine", "--optim.min_lr=0")
    _fit(out, "--run.steps=1", *cosine)
    with caplog.at_level(logging.WARNING, logger="r1fast.train"):
        rows = _fit(out, "--run.steps=3", *cosine)
    assert [r["step"] for r in rows] == [2, 3]
    assert "checkpoint's schedule (kept) has 1" in caplog.text
    assert "stays at optim.min_lr after its end" in caplog.text
    assert rows[-1]["lr"] == 0.0


def test_a_damaged_model_file_stops_the_resume_naming_it(tmp_path):
    """The model and optimizer (megatron distributed checkpoint under policy/) are verified
    against meta.json before anything is loaded: one flipped bit is an error naming the file,
    never a resume on other weights."""
    from r1fast.train.checkpoint import CheckpointError

    out = tmp_path / "run"
    _fit(out, "--run.steps=1")
    step = out / "checkpoints" / "step_00000001"
    shards = sorted((step / "policy").glob("*.distcp"))
    assert shards
    data = bytearray(shards[0].read_bytes())
    data[len(data) // 2] ^= 0x01
    shards[0].write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"policy/{shards[0].name} is damaged"):
        _fit(out, "--run.steps=2")


def test_a_resume_with_another_config_says_so_and_other_optimizer_settings_stop_it(tmp_path,
                                                                                     caplog):
    """Megatron restores the optimizer and its LR schedule from the checkpoint, so a changed
    optim.lr would not apply: an error naming it. Other changes (optim.max_nonfinite_skips
    among them) resume with a warning listing them; the run's length does not count."""
    out = tmp_path / "run"
    _fit(out, "--run.steps=1")
    with pytest.raises(ConfigError, match=r"other optimizer settings \(optim.lr: checkpoint "
                                          r"0.0001, now 5e-06\)"):
        _fit(out, "--run.steps=2", "--optim.lr=5e-6")
    # the skip budget and the clipping norm are read from the running config at each step:
    # raising the budget is what a NonFiniteError tells the user to do, so it resumes
    with caplog.at_level(logging.WARNING, logger="r1fast.train"):
        rows = _fit(out, "--run.steps=2", "--algo.clip_high=0.25",
                    "--optim.max_nonfinite_skips=3")
    assert [r["step"] for r in rows] == [2]
    assert ("differs from the checkpoint's: algo.clip_high: 0.28 -> 0.25; "
            "optim.max_nonfinite_skips: 0 -> 3") in caplog.text
    assert "run.steps" not in caplog.text.split("differs from the checkpoint's")[1]


def test_a_step_whose_completions_are_all_filtered_out_says_so(tmp_path, caplog):
    """The untrained policy scores 0 on every sample, so dynamic sampling keeps no group: the
    step adds no gradient, and the log says so instead of a quiet kept_frac = 0."""
    with caplog.at_level(logging.WARNING, logger="r1fast.train"):
        rows = _fit(tmp_path / "run", "--run.steps=1", "--algo.dynamic_sampling=true")
    assert rows[0]["kept_frac"] == 0.0
    assert "step 1: algo.dynamic_sampling / overlong_filter kept none" in caplog.text


def _save_init(rank, path):
    from r1fast.data import CharTokenizer
    from r1fast.policy import build_policy
    from r1fast.train.policy_io import save_model

    cfg = load_train_config(None, [*BASE, f"--run.out_dir={path}-unused"])
    save_model(build_policy(cfg.model, cfg.parallel, trainable=False, seed=5), CharTokenizer(),
               path)


def test_a_resume_does_not_read_the_initial_weights_again(tmp_path):
    """Every resume loaded run.init_from's weights, then replaced them by the checkpoint's:
    minutes for a large model. The resumed run equals the uninterrupted one with the initial
    weights' file unreadable."""
    from tests.helpers.spawn import run_ranks

    init = tmp_path / "init"
    run_ranks(1, _save_init, str(init))
    start = f"--run.init_from={init}"
    whole = _fit(tmp_path / "whole", "--run.steps=2", start)
    _fit(tmp_path / "resumed", "--run.steps=1", start)
    (init / "model.safetensors").write_bytes(b"not weights")
    (row,) = _fit(tmp_path / "resumed", "--run.steps=2", start)
    assert (row["step"], row["loss"], row["reward_mean"], row["grad_norm"]) == \
        (2, whole[1]["loss"], whole[1]["reward_mean"], whole[1]["grad_norm"])


def test_a_resume_that_turns_the_kl_term_on_is_refused_before_the_model_is_built(
        tmp_path, monkeypatch):
    """A run saved without a KL term has no reference model in its checkpoints: resuming it
    with algo.kl_coef > 0 failed after the whole model was built, with megatron's traceback
    about a missing 'reference' folder (helper-78). Now a one-line error naming the key."""
    from r1fast.train import grpo

    out = tmp_path / "run"
    _fit(out, "--run.steps=2", "--run.save_every=1", "--run.keep_last=1")
    # run.keep_last reaches the saves: the newest checkpoint only
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == ["step_00000002"]
    monkeypatch.setattr(grpo, "TrainEngine", None)  # building the model would fail loudly
    cfg = load_train_config(None, [*BASE, f"--run.out_dir={out}", "--run.steps=3",
                                   "--algo.kl_coef=0.01"])
    with pytest.raises(ConfigError, match=r"algo.kl_coef=0.0\d+: checkpoint .*step_00000002 has "
                                          r"no reference model \(its run had no KL term\); "
                                          r"resume with algo.kl_coef = 0"):
        grpo.GRPOTrainer(cfg)
