"""The stage CLI for R1 stages 2 and 3 on a character model that also writes Greek: GRPO with
the language-consistency reward, rejection sampling with its printed summary, SFT with a
non-reasoning mix; and the argument errors."""
import json

import pytest

from r1fast.data import CharTokenizer
from r1fast.pipeline import stages
from r1fast.pipeline.cli import main
from r1fast.train.config import load_train_config
from r1fast.train.task import build_task

GREEK_MIX = ("<think>First add the ones, \u03c0\u03c1\u03ce\u03c4\u03b1 \u03c4\u03b9\u03c2 "
             "\u03bc\u03bf\u03bd\u03ac\u03b4\u03b5\u03c2, then the tens.</think> \\boxed{5}")
SMALL = ["--num-train", "64", "--seed", "0"]


@pytest.fixture(scope="module")
def greek_base(tmp_path_factory):
    """A 1-step tiny MoE whose character tokenizer also covers Greek (through the CLI)."""
    out = tmp_path_factory.mktemp("greek") / "base"
    assert main(["pretrain", "--out", str(out), "--model", "tiny-moe", "--steps", "1",
                 "--scripts", "greek", *SMALL]) == 0
    model = out / "model"
    tok = CharTokenizer.load(model)
    assert tok == CharTokenizer.with_scripts("greek") and tok.vocab_size == 165
    assert json.loads((model / "r1fast_config.json").read_text())["vocab_size"] == 168
    return model


def test_reward_language_key_scores_toward_its_target(greek_base):
    """reward.language = "el": the run's reward parts sum accuracy, format and the Greek share
    of the thought (3 of 10 words), each as an independent reference computes it."""
    cfg = load_train_config(None, ["--reward.language=el", "--reward.workers=0",
                                   f"--run.init_from={greek_base}", "--data.num_train=8",
                                   '--data.task_options={min_digits = 1, max_digits = 1}'])
    assert cfg.reward.weights == {"accuracy": 1.0, "format": 0.1, "language": 1.0}
    task = build_task(cfg)
    try:
        scores = task.score([GREEK_MIX], [{"answer": "5", "reward": "math_accuracy"}])
    finally:
        task.close()
    assert scores["language"] == [pytest.approx(3 / 10)]
    assert scores["total"] == [pytest.approx(1.0 + 0.1 + 3 / 10)]
    weighted = load_train_config(None, ["--reward.language=zh",
                                        "--reward.weights={accuracy = 1.0, language = 0.5}"])
    assert weighted.reward.weights["language"] == 0.5  # the recipe's weight is kept


def test_stage_grpo_language_cli(greek_base, tmp_path):
    out = tmp_path / "r1"
    assert main(["grpo", "--init", str(greek_base), "--out", str(out),
                 "--language", "el", *SMALL, "--run.steps=1", "--run.progress=false",
                 "--run.tensorboard=false", "--data.prompts_per_step=2", "--algo.group_size=2",
                 "--rollout.max_new_tokens=6", "--reward.workers=0",
                 "--parallel.max_tokens_per_microbatch=0"]) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= row["reward/language"] <= 1.0
    assert 'language = "el"' in (out / "config.toml").read_text()


def test_rejection_sample_then_sft_with_a_mix(greek_base, tmp_path, capsys):
    rs = tmp_path / "rs.jsonl"
    assert main(["rejection-sample", "--model", str(greek_base), "--out", str(rs),
                 "--k", "2", "--prompts", "3", "--max-new-tokens", "6", "--keep", "all",
                 *SMALL]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "rs.summary.json").read_text())
    assert "rejection sampling: 3 prompts, 6 samples" in printed
    assert summary["samples"] == 6 and summary["kept"] + sum(summary["rejected"].values()) == 6
    assert summary["rules"]["require_correct"] is False  # --keep all
    # SFT on those rows plus a quarter of non-reasoning ones (at least one row was kept)
    rows = stages.read_jsonl(rs) or [{"prompt": "Q: 1+1", "completion": "<think>1+1=2</think> \\boxed{2}"}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]})
                            + "\n" for r in rows * 3))
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"prompt": f"Say hi {i}", "completion": "hi"}) + "\n"
                               for i in range(20)))
    assert main(["sft", "--init", str(greek_base), "--out", str(tmp_path / "sft"),
                 "--data", str(data), "--mix", str(general), "--mix-ratio", "0.25",
                 "--steps", "1", *SMALL]) == 0
    mix = json.loads(capsys.readouterr().out.splitlines()[0])["mix"]
    n = 3 * len(rows)
    assert mix["reasoning"] == n and mix["non_reasoning"] == round(n / 3)
    assert (tmp_path / "sft" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("argv, message", [
    (["sft", "--out", "x", "--init", "y", "--cold-start", "4", "--mix", "g.jsonl"],
     "--mix FILE and --mix-ratio R go together"),
    (["evaluate", "--model", "m", "--run.steps=3"], "unrecognized arguments for stage evaluate"),
    (["sft", "--out", "x", "--init", "y", "--cold-start", "4", "--sft.steps=1"],
     "unrecognized arguments for stage sft"),
    (["sft", "--recipe", "recipes/sky_t1_sft.toml", "--steps", "3"],
     "with --recipe, set --steps in the recipe"),
    (["pretrain", "--out", "x", "--model", "tiny-moe", "--language", "el"],
     "--language is for grpo"),
])
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err

