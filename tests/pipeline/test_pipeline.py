"""Every stage of the R1 pipeline runs and hands its artifacts to the next (miniature sizes),
the demo runs end to end in miniature, and the slow test runs the real demo and checks the
findings of issue #17."""
import dataclasses
import json
import math

import pytest

from r1fast.pipeline import demo_report, stages
from r1fast.pipeline import demo_task as task
from r1fast.pipeline.demo import Demo, DemoConfig, dense_model, moe_model
from r1fast.pipeline.evaluate import score_samples, standard_error
from r1fast.pipeline.filters import RejectionFilterConfig
from r1fast.train.metrics import read_jsonl


def test_score_samples_pass_at_1_and_majority():
    exs = task.problems(2, "test", 0)
    a0, a1 = exs[0]["answer"], exs[1]["answer"]
    wrong = str(int(a1) + 1)
    samples = [[f"<think>x</think> \\boxed{{{a0}}}", f"<think>x</think> \\boxed{{{a0}}}",
                "<think>x</think> \\boxed{0}", "nothing"],
               [f"<think>x</think> \\boxed{{{a1}}}", f"<think>x</think> \\boxed{{{wrong}}}",
                f"<think>x</think> \\boxed{{{wrong}}}", "junk"]]
    r = score_samples(samples, exs)
    assert r.pass_at_1 == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert r.cons_at_k == pytest.approx(0.5)  # problem 0 by majority, problem 1 voted wrong
    assert r.format_rate == pytest.approx(6 / 8)
    # a chat template that opens the thought: completions start inside it, same scores
    opened = [dict(ex, prompt=ex["prompt"] + "<think>\n") for ex in exs]
    inside = [[o.removeprefix("<think>") for o in outs] for outs in samples]
    got = score_samples(inside, opened)
    assert got.mean_length == pytest.approx(r.mean_length - 7 * 6 / 8)  # 6 dropped a <think>
    assert dataclasses.replace(got, mean_length=r.mean_length) == r


def test_every_stage_runs_and_hands_off(tmp_path):
    train = task.problems(64, "train", 0)
    test = task.problems(4, "test", 0)
    base = stages.pretrain(train, tmp_path / "base", moe_model(), steps=3, batch_size=8)
    assert (base / "model.safetensors").is_file() and (base / "tokenizer.json").is_file()
    r = stages.evaluate(base, test, k=2, max_new_tokens=8)
    assert 0.0 <= r["pass_at_1"] <= 1.0 and r["k"] == 2 and r["num_problems"] == 4
    rl, rows = stages.grpo(base, tmp_path / "rl", overrides=[
        "--run.steps=1", "--run.progress=false", "--run.tensorboard=false",
        "--data.prompts_per_step=2", "--algo.group_size=2", "--rollout.max_new_tokens=6",
        "--reward.workers=0", "--data.num_train=16",
        '--data.task_options={min_digits = 1, max_digits = 1, ops = ["+"]}'])
    assert len(rows) == 1 and (rl / "model.safetensors").is_file()
    assert (tmp_path / "rl" / "metrics.jsonl").is_file()
    cold = stages.sft(stages.cold_start_data(train[:8]), tmp_path / "cold", init_from=rl,
                      steps=2, batch_size=4)
    # 6 new tokens cut nearly every answer of these 2-step models: keep the cut ones here
    everything = dataclasses.replace(RejectionFilterConfig.for_keep("all"), reject_truncated=False)
    path, stats = stages.rejection_sample(cold, train[:3], tmp_path / "rs.jsonl", k=2,
                                          max_new_tokens=6, filters=everything)
    assert stats["samples"] == 6 and stats["kept"] >= 3
    rows = read_jsonl(path)
    assert {"prompt", "completion"} <= set(rows[0])
    rs = stages.sft(rows, tmp_path / "rs_sft", init_from=base, steps=2, batch_size=4)
    student, dstats = stages.distill(rs, train[:3], tmp_path / "student", student=dense_model(),
                                     k=2, max_new_tokens=6, steps=2, batch_size=4,
                                     filters=everything)
    cfg = json.loads((student / "r1fast_config.json").read_text())
    assert cfg["num_experts"] is None  # the student is dense
    assert stages.evaluate(student, test, k=1, max_new_tokens=6)["k"] == 1


def test_distillation_drops_teacher_rows_longer_than_the_students_context(tmp_path, caplog):
    """A teacher answer longer than a smaller student's positions stopped the stage (and, its
    data being reused, every rerun): such rows are dropped with a warning, as the SFT recipe
    drops them."""
    import logging

    from tests.helpers.reward_world import save_init

    teacher = save_init(str(tmp_path / "teacher"))  # only its tokenizer is read
    student = dense_model()
    short = {"prompt": "What is 1 + 2?", "completion": "<think>" + "add " * 8 + "</think> 3"}
    long = dict(short, completion="<think>" + "add " * student.max_position_embeddings
                + "</think> 3")
    data = tmp_path / "teacher.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [short] * 7 + [long]))
    with caplog.at_level(logging.WARNING, logger="r1fast.pipeline"):
        stages.distill(teacher, [], tmp_path / "student", student=student, teacher_data=data,
                       steps=1, batch_size=4)
    assert f"dropped 1 of 8 SFT rows longer than {student.max_position_embeddings} tokens" \
        in caplog.text


def test_stage_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of init_from"):
        stages.sft([{"prompt": "a", "completion": "b"}], tmp_path)
    with pytest.raises(ValueError, match="keep must be one of"):
        stages.rejection_sample(tmp_path, [], tmp_path / "x.jsonl", keep="best")
    with pytest.raises(ValueError, match=r"give keep \('all'\) or filters, not both"):
        stages.distill(tmp_path, [], tmp_path / "d", student_init=tmp_path, keep="all",
                       filters=RejectionFilterConfig.for_keep("correct"))


MINI = ["--num_train=200", "--num_test=8", "--pretrain_steps=5", "--cold_start_examples=8",
        "--cold_start_steps=2", "--rl_steps=2", "--rl_prompts_per_step=2", "--group_size=2",
        "--rs_prompts=16", "--rs_k=2", "--rs_keep=all", "--rs_keep_truncated=true",
        "--sft_steps=2", "--rm_pairs=16", "--rm_test_pairs=8", "--rm_steps=2",
        "--stage4_steps=4", "--eval_k=2", "--max_new_tokens=16", "--greeting_names=4"]


def test_demo_runs_every_stage_in_miniature(tmp_path, capsys):
    """`r1fast demo` with every size cut down: all nine models are evaluated, the findings are
    judged, both stage-4 reward streams are reported, and the files are written."""
    from r1fast.pipeline.demo import main

    out = tmp_path / "demo"
    assert main([f"--out_dir={out}", *MINI]) == 0
    rows = read_jsonl(out / "eval.jsonl")
    assert [r["stage"] for r in rows][0] == "base (pre-trained MoE)" and len(rows) == 9
    assert all(r["k"] == 2 and r["num_problems"] == 8 and "pass_at_1_se" in r for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["findings"]) == 6 and 0 <= summary["greetings"]["after"]["rate"] <= 1
    assert all(isinstance(f["holds"], bool) for f in summary["findings"])
    assert 0.0 <= summary["reward_model"]["heldout_accuracy"] <= 1.0
    assert set(summary["stage4_streams"]) == {"rule", "model"}
    assert summary["stage3_mix"]["non_reasoning"] > 0
    assert summary["compute"]["grpo_steps"] >= 1
    for name in ("reward", "accuracy", "response_length", "language_mixing", "reward_sources"):
        assert (out / f"rl_{name}.png").stat().st_size > 1000
    stage4 = read_jsonl(out / "stage4" / "metrics.jsonl")
    # a step logs a source's mean when its batch drew rows of that source
    assert any("reward/source_rule" in r for r in stage4)
    assert any("reward/source_model" in r for r in stage4)
    text = (out / "results.md").read_text()
    assert "reward model held-out pair accuracy" in text and "| finding |" in text
    assert text.splitlines()[0] in capsys.readouterr().out


@pytest.mark.slow
def test_real_demo_findings(tmp_path):
    """`make demo`: every finding of issue #17 holds by more than two standard errors (R1 vs
    R1-Zero: not below by more than two), pass@1 from 8 samples on 200 held-out problems,
    the reward model ranks >= 90% of held-out pairs and stage 4 raises the reward-model
    stream."""
    root = Demo(DemoConfig(out_dir=str(tmp_path / "demo"))).run()
    summary = json.loads((root / "summary.json").read_text())
    assert all(f["holds"] for f in summary["findings"]), summary["findings"]
    rows = read_jsonl(root / "eval.jsonl")
    assert all(r["k"] >= 8 and r["num_problems"] >= 200 for r in rows)
    assert summary["reward_model"]["heldout_accuracy"] >= 0.9
    start, end = summary["stage4_streams"]["model"]
    assert end > start


def test_demo_task_quick_answers_drop_the_carry_and_chains_are_right():
    assert task.column_steps(47, 38) == ["7+8=15", "4+3+1=8"]
    assert task.column_steps(9, 91) == ["9+1=10", "0+9+1=10"]
    assert task.long_cot(47, 38) == "Add. 7+8=15 then 4+3+1=8 so 85"
    assert task.carry_free_sum(47, 38) == 75 and task.carry_free_sum(99, 2) == 91
    assert task.carry_free_sum(12, 34) == 46  # no carry: the quick answer is right
    problems = task.problems(400, "train", 0)
    by_prompt = {e["prompt"]: e for e in problems}
    rows = task.base_corpus(problems, long_share=0.5, greek_share=1.0, seed=0)
    long = [r for r in rows if " then " in r["completion"] or " μετά " in r["completion"]
            or "άρα" in r["completion"]]
    assert 150 < len(long) < 250  # about long_share of the corpus
    assert all("then" not in r["completion"] and " so " not in r["completion"] for r in long)
    for row in rows:  # every long chain's answer is right; quick answers drop carries
        ex = by_prompt[row["prompt"]]
        answer = row["completion"].rsplit("{", 1)[1].rstrip("}")
        expect = ex["a"] + ex["b"] if row in long else task.carry_free_sum(ex["a"], ex["b"])
        assert int(answer) == expect


def test_demo_general_prompts_and_pairs():
    train, test = task.names(300, "train", 0), task.names(100, "test", 0)
    assert not set(train) & set(test) and len(set(train)) == 300
    pairs = task.preference_pairs(50, "test", 0)
    assert all(p["chosen"] != p["rejected"] and p["prompt"].startswith("Q: Greet ")
               for p in pairs)
    assert all(p["prompt"][len("Q: Greet "):].split(".")[0] in test for p in pairs)
    rows = task.general_sft_rows(200, good_share=0.5, seed=0)
    good = sum(r["completion"] == task.WARM for r in rows)
    assert 70 < good < 130
    assert all(r["reward"] == "reward_model" for r in task.general_rl_rows(5, 0))
    with pytest.raises(ValueError, match="names: only"):
        task.names(10 ** 6, "test", 0)


def test_standard_errors_and_language_mixing():
    assert math.isnan(standard_error([1.0]))  # one problem: no spread to measure, not "± 0"
    assert standard_error([0.0, 1.0, 0.0, 1.0]) == pytest.approx(math.sqrt(1 / 3 / 4))
    exs = [{"answer": "5"}, {"answer": "7"}]
    samples = [["<think>then 2+3</think> \\boxed{5}", "<think>μετά 2+3</think> \\boxed{5}"],
               ["<think>μετά άρα</think> \\boxed{6}", "<think>2+5=7</think> \\boxed{7}"]]
    r = score_samples(samples, exs)
    assert r.pass_at_1 == pytest.approx(0.75) and r.pass_at_1_se == pytest.approx(0.25)
    # mixing per sample: 0, 1, 1, 0 (no words mixes nothing) -> per problem 0.5, 0.5
    assert r.language_mixing == pytest.approx(0.5) and r.language_mixing_se == 0.0


def test_findings_need_two_standard_errors():
    a = {"pass_at_1": 0.9, "pass_at_1_se": 0.02}
    b = {"pass_at_1": 0.8, "pass_at_1_se": 0.02}
    diff, se = demo_report.gain(a, b)
    assert diff == pytest.approx(0.1) and se == pytest.approx(math.sqrt(0.0008))
    assert demo_report.finding("x", diff, se)["holds"]
    assert not demo_report.finding("x", 0.05, 0.03)["holds"]
    assert demo_report.finding("x", -0.05, 0.03, claim="not_below")["holds"]
    assert not demo_report.finding("x", -0.07, 0.03, claim="not_below")["holds"]
    with pytest.raises(ValueError, match="claim must be"):
        demo_report.finding("x", 0.1, 0.01, claim="better")
    # the same problems: the error of the per-problem differences, not the quadrature sum
    # (here every problem moves by 0 or 0.25, so the paired error is far smaller)
    per_a, per_b = [1.0, 0.75, 0.5, 1.0], [1.0, 0.5, 0.5, 0.75]
    a = {"pass_at_1": 0.8125, "pass_at_1_se": 0.12, "per_problem": {"pass_at_1": per_a}}
    b = {"pass_at_1": 0.6875, "pass_at_1_se": 0.12, "per_problem": {"pass_at_1": per_b}}
    diff, se = demo_report.gain(a, b)
    assert diff == pytest.approx(0.125) and se == pytest.approx(math.sqrt(0.25 ** 2 / 3 / 4))
    assert demo_report.gain(a, {k: v for k, v in b.items() if k != "per_problem"})[1] == \
        pytest.approx(math.sqrt(2 * 0.12 ** 2))


def test_votes_group_equivalent_answers():
    from r1fast.pipeline.evaluate import majority_answer, score_samples

    assert majority_answer(["5", "6", "5.0", "\\frac{10}{2}"]) in ("5", "5.0", "\\frac{10}{2}")
    assert majority_answer([]) is None
    ex = {"answer": "5"}  # a dataset row: math accuracy by default
    res = score_samples([["\\boxed{5}", "\\boxed{5.0}", "\\boxed{6}", "no answer at all"]], [ex])
    assert res.pass_at_1 == 0.5 and res.cons_at_k == 1.0 and res.no_answer_rate == 0.25


def test_curves_of_mixed_source_runs_are_over_rule_rows():
    """Stage 4 logs rule parts as 0.0 on reward-model rows: accuracy and language mixing are
    plotted over the rule rows (a step without any is skipped)."""
    rows = [{"step": 1, "accuracy": 0.375, "reward/language": 0.4375, "reward/rows_rule": 0.4375},
            {"step": 2, "accuracy": 0.0, "reward/language": 0.0, "reward/rows_rule": 0.0},
            {"step": 3, "accuracy": 0.5, "reward/language": 0.5, "reward/rows_rule": 0.5}]
    steps, acc = demo_report.curve(rows, "accuracy")
    assert steps == [1, 3] and acc == pytest.approx([0.375 / 0.4375, 1.0])
    assert demo_report.curve(rows, "language_mixing")[1] == pytest.approx([0.0, 0.0])
    plain = [{"step": 1, "accuracy": 0.25, "reward/language": 0.75}]  # a rule-only run
    assert demo_report.curve(plain, "accuracy") == ([1], [0.25])
    assert demo_report.curve(plain, "language_mixing") == ([1], [0.25])


@pytest.mark.parametrize("override, match", [
    ("--rl_steps=1", "rl_steps must be an integer >= 2"),
    ("--stage4_general_share=1.0", r"stage4_general_share must be in \[0, 1\)"),
    ("--rs_prompts=5000", r"rs_prompts \(5000\) must be <= num_train"),
    ("--rs_keep=best", "rs_keep must be one of"),
    ("--num_test=1", "a standard error needs two problems"),
])
def test_demo_config_is_checked_at_load(override, match):
    """These failed at the end of a 15-minute run (variance of one value, a division by 0)."""
    from r1fast.typed_toml import load

    with pytest.raises(ValueError, match=match):
        load(DemoConfig, None, [override])


def test_demo_never_mixes_into_an_earlier_run(tmp_path, caplog):
    """A second `make demo` into the same folder resumed some stages, refused others and
    crashed at the report; now it is an error before any work, or a loud fresh start."""
    from r1fast.pipeline.demo import clear_run_folder

    root = tmp_path / "demo"
    clear_run_folder(root, overwrite=False)  # a new folder: nothing to do
    (root / "base").mkdir(parents=True)
    (root / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match=r"already holds a run \(base, summary.json\).*"
                                         r"--overwrite=true"):
        clear_run_folder(root, overwrite=False)
    assert (root / "summary.json").exists()
    clear_run_folder(root, overwrite=True)
    assert not root.exists() and "deleting the earlier run" in caplog.text


def test_rows_routed_to_the_run_checker_evaluate_too():
    """A test row with reward = "rule" (training's default checker, as verl-style files write
    it) crashed the end-of-training evaluation, after the final checkpoint."""
    exs = [{"prompt": "1+1", "answer": "2", "reward": "rule"}, {"prompt": "2+2", "answer": "4"}]
    r = score_samples([["<think>x</think> \\boxed{2}"], ["<think>x</think> \\boxed{5}"]], exs)
    assert r.pass_at_1 == pytest.approx(0.5)
