"""SFT checkpoints and resume (issue #16): a run killed after step 3 (last checkpoint at step 2)
and resumed equals the uninterrupted 4-step run BIT FOR BIT (metrics.jsonl, every tensor of the
step-4 checkpoint: model, Adam state, RNG; the exported model); a fresh start over an existing
run folder is a one-line error unless ``overwrite``, which sets the old files aside; and a run
saved at 2 ranks (DP2, TP2) resumes at one rank with the losses of a one-rank run (slow)."""
import dataclasses
import shutil

import pytest
import torch
from safetensors.torch import load_file

from r1fast.data import CharTokenizer
from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.optim import OptimConfig
from r1fast.train.metrics import read_jsonl
from r1fast.train.sft import SFTConfig, SFTTrainer
from tests.helpers.ckpt_state import assert_same, checkpoint_state
from tests.helpers.spawn import run_ranks
from tests.train.test_sft_microbatches import uneven_examples

MODEL = dataclasses.replace(ModelConfig.preset("tiny-moe"), vocab_size=128)
NOT_REPRODUCIBLE = {"time", "tokens_per_s"}  # wall-clock


class Crash(RuntimeError):
    pass


class CrashingTrainer(SFTTrainer):
    """Dies when it is about to run step ``crash_at`` (after logging the step before)."""

    crash_at = 4

    def step(self):
        if self.step_idx + 1 == self.crash_at:
            raise Crash(f"killed before step {self.crash_at}")
        return super().step()


def make_cfg(out_dir, **kw) -> SFTConfig:
    # a cosine schedule with warmup: the resumed LR must come from the checkpoint's schedule
    optim = OptimConfig(lr=3e-3, min_lr=3e-4, lr_decay_style="cosine", warmup_steps=1)
    base = dict(model=MODEL, parallel=ParallelConfig(max_tokens_per_microbatch=48), optim=optim,
                steps=4, batch_size=8, save_every=2, out_dir=str(out_dir))
    return SFTConfig(**{**base, **kw})


def fit(cls, out_dir, **kw):
    return cls(make_cfg(out_dir, **kw), uneven_examples(), CharTokenizer()).fit()


def weights(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_killed_and_resumed_equals_uninterrupted_bitwise(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    fit(SFTTrainer, full)
    with pytest.raises(Crash):
        fit(CrashingTrainer, cut)
    assert [r["step"] for r in read_jsonl(cut / "metrics.jsonl")] == [1, 2, 3]
    assert (cut / "checkpoints" / "latest").read_text() == "step_00000002"
    step2 = checkpoint_state(cut / "checkpoints" / "step_00000002", tmp_path)["policy"]
    fit(SFTTrainer, cut)  # resumes at step 2: step 3's row is dropped and logged again
    a, b = read_jsonl(full / "metrics.jsonl"), read_jsonl(cut / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert all(r["micro_batches"] > 1 for r in a)  # packed, several micro-batches per step
    assert len({r["lr"] for r in a}) == 4  # warmup + cosine: the LR moves every step
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in NOT_REPRODUCIBLE} == \
            {k: v for k, v in y.items() if k not in NOT_REPRODUCIBLE}
    (tmp_path / "f").mkdir()
    (tmp_path / "c").mkdir()
    last_full = checkpoint_state(full / "checkpoints" / "step_00000004", tmp_path / "f")
    last_cut = checkpoint_state(cut / "checkpoints" / "step_00000004", tmp_path / "c")
    assert_same(last_full, last_cut)
    assert any(k.startswith("optimizer.") for k in last_full["policy"])  # Adam state compared
    moved = [k for k in step2 if not k.startswith("optimizer.")
             and not torch.equal(step2[k], last_full["policy"][k])]
    assert moved, "steps 3-4 changed no weight"
    wa, wb = weights(full / "model"), weights(cut / "model")
    assert wa.keys() == wb.keys() and wa
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_checkpoint_of_the_older_row_draw_resumes_with_a_warning(tmp_path, caplog):
    """Checkpoints written before the data order became a position (rows drawn with
    replacement from a saved RNG) resume at ``step * batch_size`` of the epoch order, and the
    warning says the order differs from an uninterrupted run's."""
    import json

    from r1fast.train.checkpoint import _sealed

    run = tmp_path / "old"
    fit(SFTTrainer, run, steps=2)
    meta_path = run / "checkpoints" / "step_00000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["sft_data"] = {"rng": [3, [1, 2, 3], None], "rows": meta["sft_data"]["rows"],
                        "fingerprint": meta["sft_data"]["fingerprint"]}
    meta_path.write_text(json.dumps(_sealed({k: v for k, v in meta.items()
                                             if k != "meta_sha256"})))
    with caplog.at_level("WARNING", logger="r1fast.train"):
        trainer = SFTTrainer(make_cfg(run, steps=3), uneven_examples(), CharTokenizer())
    assert trainer.step_idx == 2 and trainer.order.position == 2 * 8
    assert "drew SFT rows with replacement (an older r1fast)" in caplog.text
    trainer.fit()
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]


def test_fresh_start_over_a_run_needs_overwrite_and_keeps_the_old_files(tmp_path, caplog):
    run = tmp_path / "run"
    fit(SFTTrainer, run, steps=1)
    # a finished run asked for the same steps: nothing to train, the model is written again
    fit(SFTTrainer, run, steps=1)
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1]
    with pytest.raises(ValueError) as err:
        SFTTrainer(make_cfg(run, steps=1, resume=False), uneven_examples(), CharTokenizer())
    msg = str(err.value)
    assert "\n" not in msg
    assert f"SFT run folder {run} already holds checkpoints/step_00000001, metrics.jsonl" in msg
    assert "has resume=False" in msg and "overwrite=True" in msg
    fit(SFTTrainer, run, steps=1, resume=False, overwrite=True)
    aside = sorted(run.glob("previous_*"))
    assert len(aside) == 1
    assert (aside[0] / "checkpoints" / "step_00000001" / "meta.json").is_file()
    assert len(read_jsonl(aside[0] / "metrics.jsonl")) == 1
    assert any((aside[0] / "model").glob("*.safetensors"))
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1]
    # overwrite while resume is on and a checkpoint is there: it resumes, and says so
    with caplog.at_level("WARNING", logger="r1fast.train"):
        fit(SFTTrainer, run, steps=1, overwrite=True)
    assert "overwrite applies only to a run that does not resume" in caplog.text
    assert len(sorted(run.glob("previous_*"))) == 1
    # the stage function's overwrite starts over (stage sft / distill --overwrite)
    from r1fast.pipeline import stages

    rows = [{"prompt": ex["prompt"], "completion": ex["completion"]} for ex in uneven_examples()]
    stages.sft(rows, run, init_from=aside[0] / "model", steps=1, batch_size=4, overwrite=True)
    assert len(sorted(run.glob("previous_*"))) == 2
    # metrics without a complete checkpoint (a run killed before its first save)
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(ValueError, match="already holds metrics.jsonl but holds no complete "
                                         "checkpoint"):
        SFTTrainer(make_cfg(run, steps=1), uneven_examples(), CharTokenizer())


def test_refusals_come_before_the_model(tmp_path, monkeypatch):
    """A fresh start over a run's files, or a tokenizer with more ids than the model has
    embedding rows, is refused before the policy is built (seconds of construction)."""
    import r1fast.train.sft as sft

    def no_engine(*a, **k):
        raise AssertionError("the model was built before the refusal")

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    monkeypatch.setattr(sft, "TrainEngine", no_engine)
    for cfg, match in ((make_cfg(run, steps=1), "holds no complete checkpoint"),
                       (make_cfg(run, steps=1, resume=False), "has resume=False"),
                       (dataclasses.replace(make_cfg(tmp_path / "new", steps=1),
                                            model=dataclasses.replace(MODEL, vocab_size=8)),
                        "the tokenizer has .* tokens but model.vocab_size is 8")):
        with pytest.raises(ValueError, match=match):
            SFTTrainer(cfg, uneven_examples(), CharTokenizer())


# ------------------------------------------------------------------ resume at another layout

def _save_init(rank, out_dir):
    from r1fast.policy import build_policy, save_hf_checkpoint

    save_hf_checkpoint(build_policy(MODEL, ParallelConfig(), trainable=False), out_dir)


def _fit_ranks(rank, out_dir, init, layout, steps):
    # a constant LR: a 1-step run continued to 2 steps has the schedule of a 2-step run; the
    # MoE aux loss is per rank by design, so it is left out of a cross-layout comparison.
    # adam_eps 1e-3: Adam's first steps are lr * sign(g), so an element whose gradient is ~0
    # moves by up to 2 lr between layouts that round differently; a large eps keeps the step
    # proportional to such gradients, so the weight comparison tests the reshard, not that
    model = dataclasses.replace(MODEL, aux_loss_coef=0.0)
    cfg = SFTConfig(model=model, parallel=ParallelConfig(max_tokens_per_microbatch=48, **layout),
                    optim=OptimConfig(lr=1e-3, adam_eps=1e-3), steps=steps, batch_size=8,
                    init_from=init, out_dir=out_dir)
    SFTTrainer(cfg, uneven_examples(), CharTokenizer()).fit()


@pytest.mark.slow
@pytest.mark.multiproc
def test_resume_at_one_rank_of_a_two_rank_checkpoint(tmp_path):
    init = str(tmp_path / "init")
    run_ranks(1, _save_init, init)
    run_ranks(1, _fit_ranks, str(tmp_path / "one"), init, {}, 2)
    one = read_jsonl(tmp_path / "one" / "metrics.jsonl")
    for name, layout in (("dp2", {}), ("tp2", {"tp": 2})):
        out = str(tmp_path / name)
        run_ranks(2, _fit_ranks, out, init, layout, 1)
        run_ranks(1, _fit_ranks, out, init, {}, 2)  # resharded to one rank
        rows = read_jsonl(tmp_path / name / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2], name
        for a, b in zip(one, rows):
            for key in ("loss", "grad_norm", "tokens", "lr"):
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), \
                    (name, a["step"], key, a[key], b[key])
        w1, w2 = weights(tmp_path / "one" / "model"), weights(tmp_path / name / "model")
        assert w1.keys() == w2.keys() and w1
        worst = max((w1[k].double() - w2[k].double()).abs().max().item() for k in w1)
        assert worst <= 1e-5, (name, worst)
