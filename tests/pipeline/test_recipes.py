"""The small-budget recipes: TinyZero's Countdown GRPO and Sky-T1's long-trace SFT load as
written, give the scheme they claim, and run one step on the tiny offline Hugging Face world."""
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from r1fast.data.tasks import generate_countdown  # noqa: E402
from r1fast.data.tiny_hf import build_tiny_hf  # noqa: E402
from r1fast.pipeline.sft_recipe import load_sft_recipe, run_sft_recipe  # noqa: E402
from r1fast.train.config import load_train_config  # noqa: E402

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
COUNTDOWN, SKY = RECIPES / "countdown_tinyzero.toml", RECIPES / "sky_t1_sft.toml"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny HF world (Qwen3-MoE + byte-level BPE + ChatML) and Countdown rows in TinyZero's
    columns (nums, target)."""
    root = tmp_path_factory.mktemp("recipes")
    paths = build_tiny_hf(root / "hf", num_train=8, num_test=2)
    rows = generate_countdown(6, seed=3, min_numbers=3, max_numbers=3, max_target=30)
    paths["countdown"] = root / "countdown.jsonl"
    paths["countdown"].write_text("".join(json.dumps({"nums": r["numbers"], "target": r["target"]})
                                          + "\n" for r in rows))
    paths["solutions"] = [r["answer"] for r in rows]
    return paths


def test_countdown_recipe_is_tinyzero_as_written():
    cfg = load_train_config(COUNTDOWN)
    assert cfg.data.preset == "countdown" and cfg.data.path.endswith(".parquet")
    assert (cfg.algo.group_size, cfg.optim.lr, cfg.algo.objective.kl_coef) == (5, 1e-6, 1e-3)
    assert cfg.rollout.max_new_tokens == 1024 and cfg.data.prompts_per_step == 128
    assert cfg.reward.weights == {"accuracy": 1.0, "format": 0.1}


def test_countdown_recipe_one_step_and_its_reward_scheme(world, tmp_path):
    from r1fast.train.grpo import GRPOTrainer

    cfg = load_train_config(COUNTDOWN, [
        f"--run.init_from={world['model']}", f"--data.path={world['countdown']}",
        "--data.test_path=none", "--data.max_prompt_tokens=0", "--parallel.tp=1",
        "--parallel.max_tokens_per_microbatch=0", "--data.prompts_per_step=2",
        "--algo.group_size=2", "--algo.mini_batches=1", "--rollout.max_new_tokens=8",
        "--reward.workers=0", "--run.steps=1", f"--run.out_dir={tmp_path}",
        "--run.progress=false", "--run.tensorboard=false"])
    trainer = GRPOTrainer(cfg)
    rows = trainer.fit()
    assert len(rows) == 1 and (tmp_path / "metrics.jsonl").is_file()
    # TinyZero's scheme, once: a right equation 1.0, a wrong one 0.1, no answer 0 (not 1.1/0.2)
    first = json.loads(world["countdown"].read_text().splitlines()[0])
    ex = {"numbers": first["nums"], "target": first["target"], "reward": "countdown"}
    right = f"<think>try</think> \\boxed{{{world['solutions'][0]}}}"
    wrong = f"<think>try</think> \\boxed{{{world['solutions'][0]} + 1}}"
    scores = trainer.task.score([right, wrong, "<think>no idea</think>"], [ex] * 3)
    trainer.task.close()
    assert scores["total"] == [pytest.approx(1.0), pytest.approx(0.1), 0.0], scores
    assert scores["format"] == [0.0, 0.0, 0.0]  # countdown rows: the format is paid once


def _traces(n: int, long: int) -> list[dict]:
    """Long reasoning traces (several paragraphs), ``long`` of them past a 512-token context."""
    rows = []
    for i in range(n):
        steps = "\n\n".join(f"Step {k}: {i} + {k} = {i + k}. Check it again: yes." for k in range(12))
        if i < long:
            steps += "\n\n" + "Wait, let me verify every step once more. " * 80
        rows.append({"prompt": f"What is {i} + 11?",
                     "completion": f"<think>{steps}</think> \\boxed{{{i + 11}}}"})
    return rows


def test_sky_t1_recipe_as_written():
    run = load_sft_recipe(SKY)
    assert (run.sft.epochs, run.sft.batch_size, run.optim.lr) == (3.0, 96, 1e-5)
    assert run.sft.chat_template and run.optim.lr_decay_style == "cosine"
    assert run.parallel.tp == 8


def test_sky_t1_recipe_one_step(world, tmp_path):
    data, general = tmp_path / "traces.jsonl", tmp_path / "general.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _traces(6, long=2)))
    general.write_text("".join(json.dumps({"prompt": f"Say {i}", "completion": f"{i}"}) + "\n"
                               for i in range(4)))
    run = load_sft_recipe(SKY, [f"--sft.init_from={world['model']}", f"--sft.data={data}",
                                f"--sft.out_dir={tmp_path / 'sky'}", f"--sft.mix={general}",
                                "--sft.mix_ratio=0.25", "--sft.system_prompt=Think step by step.",
                                "--sft.batch_size=2", "--sft.epochs=0.2", "--sft.progress=false",
                                "--parallel.tp=1", "--parallel.recompute=none"])
    model, summary = run_sft_recipe(run)
    assert (model / "model.safetensors").is_file() and (model / "tokenizer.json").is_file()
    # the 2 long traces go first, then 1 general row is a quarter of the 4 + 1 trained on
    assert summary["rows"] == 6 and summary["mix"]["non_reasoning"] == 1
    assert summary["max_tokens"] == 512  # the checkpoint's context
    assert summary["dropped_too_long"] == 2 and summary["trained_rows"] == 5
    assert summary["steps"] == 1  # ceil(0.2 * 5 / 2)
    on_disk = json.loads((tmp_path / "sky" / "data_summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))


@pytest.mark.parametrize("overrides, match", [
    (["--sft.steps=0", "--sft.epochs=0"], "sft.steps must be > 0, or 0 with sft.epochs > 0"),
    (["--sft.mix=x.jsonl"], "sft.mix and sft.mix_ratio go together"),
    (["--sft.mix_ratio=1.0", "--sft.mix=x.jsonl"], r"sft.mix_ratio must be in \[0, 1\)"),
    (["--sft.stepz=3"], "did you mean 'sft.steps'"),
])
def test_sky_t1_recipe_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_sft_recipe(SKY, overrides)


def test_a_recipe_run_with_a_warmup_fraction_can_be_extended(world, tmp_path, caplog):
    """More steps changed warmup_fraction x steps, which the resume refused as an optimizer
    setting (and the message's advice, the checkpoint's warmup_steps, cannot be combined with a
    fraction): the resumed run keeps its checkpoint's warmup, with a warning."""
    import logging

    from r1fast.train.metrics import read_jsonl

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}", "completion": f"{i}"}) + "\n"
                            for i in range(8)))
    common = [f"--sft.init_from={world['model']}", f"--sft.data={data}",
              f"--sft.out_dir={tmp_path / 'run'}", "--sft.batch_size=4",
              "--sft.warmup_fraction=0.5", "--sft.progress=false", "--sft.save_every=1"]
    run_sft_recipe(load_sft_recipe(None, [*common, "--sft.steps=2"]))  # warmup 1
    with caplog.at_level(logging.WARNING, logger="r1fast.pipeline"):
        run_sft_recipe(load_sft_recipe(None, [*common, "--sft.steps=4"]))  # 0.5 x 4 = 2
    assert "the resumed run keeps its checkpoint's warmup of 1 steps" in caplog.text
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]
