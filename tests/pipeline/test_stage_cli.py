"""The stage CLI for R1 stages 2 and 3 on a character model that also writes Greek: GRPO with
the language-consistency reward, rejection sampling with its printed summary, SFT with a
non-reasoning mix; and the argument errors."""
import json

import pytest

from r1fast.data import CharTokenizer
from r1fast.pipeline import stages
from r1fast.pipeline.cli import main
from r1fast.train.metrics import read_jsonl
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
                 "--keep-truncated", *SMALL]) == 0  # 6 tokens cut these answers
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "rs.summary.json").read_text())
    assert "rejection sampling: 3 prompts, 6 samples" in printed
    assert summary["samples"] == 6 and summary["kept"] + sum(summary["rejected"].values()) == 6
    assert summary["rules"]["require_correct"] is False  # --keep all
    assert summary["rules"]["reject_truncated"] is False  # --keep-truncated
    # SFT on those rows plus a quarter of non-reasoning ones (--keep all keeps one per prompt)
    rows = read_jsonl(rs)
    assert len(rows) >= 3 and all(r["prompt_rendered"] is True for r in rows)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]})
                            + "\n" for r in rows * 3))
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"prompt": f"Say hi {i}", "completion": "hi"}) + "\n"
                               for i in range(20)))
    assert main(["sft", "--init", str(greek_base), "--out", str(tmp_path / "sft"),
                 "--data", str(data), "--mix", str(general), "--mix-ratio", "0.25",
                 "--steps", "1", "--seed", "0"]) == 0
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
     "stage pretrain does not use --language; it reads"),
    # options a stage used to accept and ignore
    (["evaluate", "--model", "m", "--steps", "3", "--keep", "all"],
     "stage evaluate does not use --keep, --steps"),
    (["evaluate", "--model", "m", "--problems", "p.jsonl", "--num-test", "5"],
     "does not use --num-test with --problems"),
    (["distill", "--teacher", "t", "--out", "o", "--data", "d.jsonl", "--k", "3"],
     "does not use --k with --data"),
    (["distill", "--teacher", "t", "--out", "o", "--student-init", "s", "--student",
      "tiny-dense"], "does not use --student with --student-init"),
    (["grpo", "--init", "i", "--out", "o", "--recipe", "r.toml", "--num-train", "5"],
     "does not use --num-train with --recipe"),
    (["grpo", "--init", "i", "--out", "o", "--steps", "3", "--run.steps=4"],
     "--run.steps set twice"),
    (["grpo", "--init", "i", "--out", "o", "--overwrite"],
     "a GRPO run starts over with --run.resume=false --run.overwrite=true"),
    (["sft", "--recipe", "recipes/sky_t1_sft.toml", "--seed", "3"],
     "with --recipe, set --seed in the recipe"),
    # values that used to slice or look up silently
    (["rejection-sample", "--model", "m", "--out", "o", "--prompts", "0"],
     "argument --prompts: must be an integer >= 1, got '0'"),
    (["sft", "--out", "x", "--init", "y", "--cold-start", "-1"],
     "argument --cold-start: must be an integer >= 1"),
    (["sft", "--out", "x", "--init", "y", "--cold-start", "50", "--num-train", "10"],
     "--cold-start 50 is more than --num-train 10"),
    (["distill", "--teacher", "t", "--out", "o", "--student", "nope"],
     "argument --student: invalid choice: 'nope'"),
    (["--seed", "1", "reward-model"], "write reward-model first"),
    # options that used to be dropped: --preset/--template without --problems ...
    (["evaluate", "--model", "m", "--template", "Q{question}"],
     "does not use --template without --problems"),
    (["evaluate", "--model", "m", "--preset", "gsm8k"], "does not use --preset without --problems"),
    (["rejection-sample", "--model", "m", "--out", "o", "--template", "Q{question}"],
     "does not use --template without --problems"),
    (["distill", "--teacher", "t", "--out", "o", "--preset", "gsm8k"],
     "does not use --preset without --problems"),
    (["evaluate", "--model", "m", "--no-chat-template"],
     "does not use --chat-template without --problems"),
    (["evaluate", "--model", "m", "--seed", "-1"], "argument --seed: must be an integer >= 0"),
    # ... and grpo's overrides of keys the stage sets itself (written after them)
    (["grpo", "--init", "i", "--out", "g1", "--run.out_dir=g_other"],
     "--run.out_dir set twice: by --out and as an override"),
    (["grpo", "--init", "i", "--out", "g1", "--run.init_from", "x"],
     "--run.init_from set twice: by --init and as an override"),
    (["grpo", "--init", "i", "--out", "g1", "--language", "zh", "--reward.language=el"],
     "--reward.language set twice: by --language and as an override"),
    (["grpo", "--init", "i", "--out", "g1", "--num-train", "5", "--data.num_train=7"],
     "--data.num_train set twice: by --num-train and as an override"),
    # values the demo config, the SFT recipe or the sampler refuse, named by their flag
    (["pretrain", "--out", "x", "--model", "tiny-moe", "--long-share", "1.5"],
     "argument --long-share: demo long_share must be in [0, 1]"),
    (["pretrain", "--out", "x", "--model", "tiny-moe", "--greek-share", "-1"],
     "argument --greek-share: demo greek_share must be in [0, 1]"),
    (["sft", "--out", "x", "--init", "y", "--data", "d.jsonl", "--mix", "g.jsonl",
      "--mix-ratio", "0"], "argument --mix-ratio: must be in (0, 1), got 0.0"),
    (["evaluate", "--model", "m", "--language", "xx"], "argument --language: must be one of"),
    (["evaluate", "--model", "m", "--temperature", "-1"],
     "argument --temperature: must be in [0, inf), got -1.0"),
])
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err



def _capture(monkeypatch, name):
    """Replace ``stages.<name>`` by a recorder of its arguments (the CLI's hand-off)."""
    calls = []

    def record(*args, **kw):
        calls.append((args, kw))
        return "recorded", {"prompts": 0, "samples": 0, "kept": 0, "rejected": {},
                            "prompts_with_a_kept_sample": 0, "over_limit": 0}

    monkeypatch.setattr(stages, name, record)
    return calls


def test_stage_grpo_reads_recipe_steps_lr_and_seed(monkeypatch, tmp_path):
    """`stage grpo --recipe R --steps --lr --seed` used to train the demo task with the
    defaults, exit 0; each is now in the config the trainer gets."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\ntask = "countdown"\nnum_train = 40\n')
    calls = _capture(monkeypatch, "grpo")
    assert main(["grpo", "--init", "i", "--out", "o", "--recipe", str(recipe), "--steps", "3",
                 "--lr", "5e-4", "--seed", "7"]) == 0
    (init, out), kw = calls[0]
    assert kw["recipe"] == str(recipe)
    cfg = load_train_config(kw["recipe"], kw["overrides"])
    assert cfg.data.task == "countdown" and cfg.data.num_train == 40  # the recipe's, not the demo's
    assert (cfg.run.steps, cfg.optim.lr, cfg.run.seed, cfg.data.seed) == (3, 5e-4, 7, 7)
    calls.clear()  # no recipe: the demo task, and nothing set that was not asked for
    assert main(["grpo", "--init", "i", "--out", "o"]) == 0
    cfg = load_train_config(None, calls[0][1]["overrides"])
    assert cfg.data.task == "arithmetic" and cfg.run.steps == load_train_config(None).run.steps


def test_stage_grpo_another_task_gets_none_of_the_demo_task_options(monkeypatch):
    """`--data.task=countdown` was given the arithmetic task's options and failed with
    "unknown config key 'data.task_options.min_digits'"."""
    calls = _capture(monkeypatch, "grpo")
    assert main(["grpo", "--init", "i", "--out", "o", "--data.task=countdown"]) == 0
    overrides = calls[0][1]["overrides"]
    assert overrides == ["--data.task=countdown"]
    assert load_train_config(None, overrides).data.task == "countdown"


def test_stage_help_says_the_grpo_defaults(capsys):
    """--help said grpo's --steps / --lr default to 200 / 1e-3; grpo leaves them to the recipe
    or the trainer (run.steps=10, optim.lr=1e-4)."""
    from r1fast.train.config import DEFAULT_LR, RunConfig

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert f"grpo: sets run.steps, default the recipe's, else {RunConfig.steps}" in text
    assert f"grpo: sets optim.lr, default the recipe's, else {DEFAULT_LR:g}" in text


def test_sampling_stages_take_every_problem_and_the_filter_flags(monkeypatch, tmp_path,
                                                                greek_base):
    """A --problems file longer than 1024 rows was cut to its last 1024 without a word, and
    distill ignored the filter flags."""
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"prompt": f"{i} + 1 = ?", "answer": str(i + 1)})
                                + "\n" for i in range(1100)))
    calls = _capture(monkeypatch, "rejection_sample")
    assert main(["rejection-sample", "--model", str(greek_base), "--out", "o.jsonl",
                 "--problems", str(problems)]) == 0
    assert len(calls[0][0][1]) == 1100
    calls.clear()
    assert main(["rejection-sample", "--model", str(greek_base), "--out", "o.jsonl",
                 "--problems", str(problems), "--prompts", "5"]) == 0
    assert [ex["answer"] for ex in calls[0][0][1]] == ["1", "2", "3", "4", "5"]  # the first 5
    calls.clear()
    assert main(["rejection-sample", "--model", str(greek_base), "--out", "o.jsonl",
                 "--num-train", "64"]) == 0
    assert len(calls[0][0][1]) == 64  # fewer demo problems than the default 1024: all of them
    dcalls = _capture(monkeypatch, "distill")
    assert main(["distill", "--teacher", str(greek_base), "--out", "s", "--prompts", "4",
                 "--max-chars", "50", "--language", "none", "--keep", "well_formed"]) == 0
    filters = dcalls[0][1]["filters"]
    assert filters.max_chars == 50 and filters.language is None
    assert filters.require_correct is False and len(dcalls[0][0][1]) == 4
    with pytest.raises(SystemExit):
        main(["rejection-sample", "--model", str(greek_base), "--out", "o.jsonl",
              "--problems", str(problems), "--prompts", "2000"])


def test_problems_are_rendered_as_the_run_trained_on_them(monkeypatch, tmp_path):
    """evaluate / rejection-sample / distill --problems always applied the chat template and
    could not set a system prompt or columns: a run trained with data.chat_template = false
    (countdown_tinyzero) was evaluated on ChatML-wrapped prompts, silently (helper-69)."""
    from r1fast.data.tiny_hf import build_tokenizer

    model = tmp_path / "model"
    build_tokenizer(model, ["What is 2 + 2? Be brief. assistant user system"] * 20)  # ChatML
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"q": "2 + 2 = ?", "a": "4"}) + "\n")
    kw = dict(preset=None, template=None, prompt_key="q", answer_key="a")
    plain = stages.load_problems(problems, model, chat_template=False, **kw)
    chat = stages.load_problems(problems, model, system_prompt="Be brief.", **kw)
    assert plain[0]["prompt"] == "2 + 2 = ?"
    assert "<|im_start|>system\nBe brief." in chat[0]["prompt"]
    calls = _capture(monkeypatch, "evaluate")
    for flags, want in (([], chat), (["--no-chat-template"], plain)):
        calls.clear()
        argv = ["evaluate", "--model", str(model), "--problems", str(problems),
                "--prompt-key", "q", "--answer-key", "a", *flags]
        assert main(argv + ([] if flags else ["--system-prompt", "Be brief."])) == 0
        assert [ex["prompt"] for ex in calls[0][0][1]] == [want[0]["prompt"]]


def test_the_demo_task_needs_the_character_tokenizer(tmp_path, capsys):
    """On a Hugging Face chat model, evaluate / rejection-sample / sft --cold-start ran the
    demo's raw 'Q: ... A:' prompts without the chat template, silently (grpo refused)."""
    from r1fast.data.tiny_hf import build_tokenizer

    build_tokenizer(tmp_path / "hf", ["What is 2 + 3? assistant user system"] * 20)
    for argv, instead in (
            (["evaluate", "--model", str(tmp_path / "hf")], "give --problems FILE"),
            (["rejection-sample", "--model", str(tmp_path / "hf"), "--out", "o.jsonl"],
             "give --problems FILE"),
            (["sft", "--init", str(tmp_path / "hf"), "--out", "o", "--cold-start", "4"],
             "give --data FILE.jsonl")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "written for r1fast's character tokenizer" in err, err
        assert instead in err


def test_pretrain_reads_lr(monkeypatch):
    import r1fast.pipeline.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "pretrain_base", lambda *a, **kw: seen.update(kw))
    assert main(["pretrain", "--out", "o", "--model", "tiny-dense", "--lr", "0.01"]) == 0
    assert seen["lr"] == 0.01
    assert main(["pretrain", "--out", "o", "--model", "tiny-dense"]) == 0
    assert seen["lr"] == 3e-3  # the demo's pre-training rate when none is given


def test_rejection_sampling_that_keeps_nothing_is_an_error(greek_base, tmp_path):
    """Keeping no sample exited 0 with an empty JSONL, and the next stage failed with a
    message about something else; an existing --out was replaced without a word."""
    out = tmp_path / "rs.jsonl"
    args = ["rejection-sample", "--model", str(greek_base), "--out", str(out), "--k", "2",
            "--prompts", "2", "--max-new-tokens", "4", "--max-chars", "1", *SMALL]
    with pytest.raises(ValueError, match="kept none of 4 samples"):
        main(args)
    assert not out.exists()
    summary = json.loads((tmp_path / "rs.summary.json").read_text())
    assert summary["kept"] == 0 and sum(summary["rejected"].values()) == 4
    out.write_text("earlier\n")
    with pytest.raises(ValueError, match="already exists; give a new path or overwrite"):
        main(args)
    assert out.read_text() == "earlier\n"
    with pytest.raises(ValueError, match="is a folder"):
        main([*args[:3], "--out", str(tmp_path), *args[5:]])


def test_a_distillation_rerun_reuses_its_own_teacher_data(greek_base, tmp_path):
    """The second run into the same folder resumes: the teacher data drawn with the same
    model, prompts, settings and rules is reused (not an 'already exists' error, not a new
    draw); drawn otherwise, it is an error naming --overwrite and --data."""
    import dataclasses

    from r1fast.pipeline.filters import RejectionFilterConfig

    problems = [{"prompt": f"{i} + 1 = ", "answer": str(i + 1), "id": f"p:{i}"}
                for i in range(4)]
    keep_all = dataclasses.replace(RejectionFilterConfig.for_keep("all"), reject_truncated=False)
    run = dict(student_init=greek_base, k=1, max_new_tokens=4, steps=1, batch_size=2,
               filters=keep_all)
    _, first = stages.distill(greek_base, problems, tmp_path / "d", **run)
    data = tmp_path / "d" / "teacher_data.jsonl"
    assert "reused" not in first and data.is_file()
    written = data.read_bytes()
    _, second = stages.distill(greek_base, problems, tmp_path / "d", **{**run, "steps": 2})
    # the stats count the answers too long for the student (they were in a log line only)
    assert second == {"reused": str(data), "dropped_too_long": 0, "trained_rows": 4}
    assert data.read_bytes() == written and first["dropped_too_long"] == 0
    with pytest.raises(ValueError, match=r"teacher_data.jsonl holds teacher data drawn with "
                                         r"other sampling .* --overwrite .* --data"):
        stages.distill(greek_base, problems, tmp_path / "d", **{**run, "k": 2})


def test_an_sft_stage_rerun_with_more_steps_resumes(greek_base, tmp_path):
    """stages.sft's warmup is a tenth of the run: a rerun asking for more steps keeps the
    checkpoint's warmup and goes on, instead of refusing a changed optimizer schedule."""
    rows = [{"prompt": f"{i} + 1 = ", "completion": str(i + 1)} for i in range(8)]
    stages.sft(rows, tmp_path / "s", init_from=greek_base, steps=10, batch_size=2)
    stages.sft(rows, tmp_path / "s", init_from=greek_base, steps=20, batch_size=2)
    assert [r["step"] for r in read_jsonl(tmp_path / "s" / "metrics.jsonl")] == \
        list(range(1, 21))


def test_seed_changes_the_sampling_not_the_demo_problems(greek_base, monkeypatch, capsys):
    """evaluate --seed 0 and --seed 1 score the same demo test problems (--data-seed picks
    those), so their difference is sampling alone; the output says which problem seed."""
    seen = []

    def record(model, problems, **kw):
        seen.append(([p["prompt"] for p in problems], kw["seed"]))
        return {"pass_at_1": 0.0}

    monkeypatch.setattr(stages, "evaluate", record)
    for seed in ("0", "1"):
        assert main(["evaluate", "--model", str(greek_base), "--num-test", "20",
                     "--seed", seed]) == 0
    assert seen[0][0] == seen[1][0] and (seen[0][1], seen[1][1]) == (0, 1)
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["data_seed"] == 0
    assert main(["evaluate", "--model", str(greek_base), "--num-test", "20",
                 "--data-seed", "1"]) == 0
    assert seen[2][0] != seen[0][0]


def test_top_p_keep_per_prompt_and_language_reach_the_stages(greek_base, monkeypatch):
    """--top-p (each stage's own default when not given), --keep-per-prompt and evaluate's
    --language are handed on, not accepted and dropped."""
    rs = _capture(monkeypatch, "rejection_sample")
    assert main(["rejection-sample", "--model", str(greek_base), "--out", "x.jsonl",
                 "--prompts", "2", "--keep-per-prompt", "1", "--top-p", "0.9"]) == 0
    assert rs[-1][1]["keep_per_prompt"] == 1 and rs[-1][1]["top_p"] == 0.9
    assert main(["rejection-sample", "--model", str(greek_base), "--out", "x.jsonl",
                 "--prompts", "2"]) == 0
    assert rs[-1][1]["keep_per_prompt"] is None and rs[-1][1]["top_p"] == 1.0
    seen = []
    monkeypatch.setattr(stages, "evaluate", lambda model, problems, **kw: seen.append(kw) or {})
    assert main(["evaluate", "--model", str(greek_base), "--num-test", "4",
                 "--language", "el"]) == 0
    assert seen[-1]["language"] == "el" and seen[-1]["top_p"] == 0.95
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(greek_base), "--language", "none"])


def test_a_reward_model_stage_rerun_with_more_steps_resumes(greek_base, tmp_path):
    """The same for stages.reward_model: the rerun keeps the checkpoint's warmup."""
    from r1fast.pipeline import demo_task

    pairs = stages.write_jsonl(demo_task.preference_pairs(16, "train", 0), tmp_path / "p.jsonl")
    stages.reward_model(greek_base, pairs, tmp_path / "rm", steps=10, batch_size=4)
    _, summary = stages.reward_model(greek_base, pairs, tmp_path / "rm", steps=20, batch_size=4)
    assert summary["steps"] == 20
    assert [r["step"] for r in read_jsonl(tmp_path / "rm" / "metrics.jsonl")] == \
        list(range(1, 21))
