"""What a run trains on: prompts, tokenizer and rewards (r1fast.train.task)."""
import json

import pytest
import torch

from r1fast.data import CharTokenizer
from r1fast.train.config import load_train_config, with_changes
from r1fast.train.task import build_task, reward_parts


def cfg(*extra):
    return load_train_config(None, ["--data.num_train=40", "--data.prompts_per_step=4",
                                    "--reward.workers=0", *extra])


def test_build_task_splits_prompts_over_dp_and_resumes_exactly():
    task = build_task(cfg())
    try:
        assert isinstance(task.tokenizer, CharTokenizer)
        assert task.part_names == ["accuracy", "format"]
        state = task.state_dict()
        whole = task.next_prompts(4, 1, 0)
        after = task.state_dict()
        # every DP rank draws the same global batch and keeps its own contiguous half
        halves = []
        for rank in (0, 1):
            task.load_state_dict(state)
            halves += task.next_prompts(4, 2, rank)
        assert [ex["prompt"] for ex in halves] == [ex["prompt"] for ex in whole]
        assert task.state_dict() == after  # the position resumes exactly
        with pytest.raises(ValueError, match=r"prompts_per_step \(4\) must be divisible"):
            task.next_prompts(4, 3, 0)
    finally:
        task.close()


def test_score_sums_weighted_parts_and_counts_failures():
    task = build_task(cfg())
    try:
        example = task.next_prompts(4, 1, 0)[0]
        good = f"<think>adding</think> \\boxed{{{example['answer']}}}"
        out = task.score([good, "no answer"], [example, example])
        assert out["accuracy"] == [1.0, 0.0]
        assert out["total"][0] == pytest.approx(1.0 + 0.1 * out["format"][0])
        assert set(task.failure_metrics()) == {"errors", "timeouts", "crashes"}
        # a model-parallel peer's view: the same columns, zeros, nothing computed or counted
        calls = task.runner.metrics()["rewards/calls"]
        assert task.score([good], [example], rules=False) == {k: [0.0] for k in out}
        assert task.runner.metrics()["rewards/calls"] == calls
    finally:
        task.close()


def test_reward_cpu_time_limit_reaches_the_runner(tmp_path):
    """[reward] cpu_time_s (the load-independent verdict limit) is the runner's, with the
    wall-clock timeout_s as the outer bound."""
    cfg = load_train_config(None, ["--reward.workers=0", "--reward.cpu_time_s=0.7",
                                   "--reward.timeout_s=9", f"--run.out_dir={tmp_path}"])
    task = build_task(cfg)
    try:
        assert (task.runner.config.cpu_time_s, task.runner.config.timeout_s) == (0.7, 9.0)
    finally:
        task.close()


def test_accuracy_means_the_checker_of_the_task():
    (name, fn, weight), = reward_parts("countdown", {"accuracy": 2.0})
    assert name == "accuracy" and type(fn).__name__ == "CountdownReward" and weight == 2.0
    with pytest.raises(ValueError, match="reward name must be one of"):
        reward_parts("countdown", {"no_such_reward": 1.0})


@pytest.mark.parametrize("key", ["path", "test_path"])
def test_missing_data_files_fail_before_training(tmp_path, key):
    good = tmp_path / "ok.jsonl"
    good.write_text('{"prompt": "p", "answer": "1"}\n')
    paths = {"path": str(good), "test_path": str(good)}
    paths[key] = str(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=f"data.{key}=.*missing.jsonl does not exist"):
        build_task(cfg(f"--data.path={paths['path']}", f"--data.test_path={paths['test_path']}"))


# ------------------------------------------------------------------ stage 4: mixed sources

MIXED_ROWS = [
    {"prompt": "What is 2+3?", "answer": "5"},  # rule: no reward field
    {"prompt": "Write a kind note.", "reward": "reward_model"},  # general prompt, no answer
    {"prompt": "What is 4+4?", "answer": "8", "reward": "rule"},
    {"prompt": "Say hello.", "reward": "model"},
    {"prompt": "What is 1+1?", "answer": "2", "reward": "math_accuracy"},
]
RULE, MODEL_ROWS = [0, 2, 4], [1, 3]


@pytest.fixture(scope="module")
def reward_world(tmp_path_factory):
    """(reward-model folder, mixed data file); destroys the parallel state afterwards."""
    from r1fast.policy.parallel import destroy_parallel
    from tests.helpers.reward_world import save_init, save_reward_folder, write_jsonl

    tmp = tmp_path_factory.mktemp("mixed")
    rm = save_reward_folder(str(tmp / "rm"), save_init(str(tmp / "init")))
    yield rm, write_jsonl(tmp / "mixed.jsonl", MIXED_ROWS), tmp
    destroy_parallel()


def _reference_scores(rm, texts):
    """The reward model's scores written out by hand: policy hidden states, the last real
    token of bos + text + eos, dot the head read from the folder."""
    from safetensors.torch import load_file

    from r1fast.policy.config import ParallelConfig
    from r1fast.policy.hf_checkpoint import load_hf_checkpoint, load_model_config
    from r1fast.policy.model import build_policy

    policy = build_policy(load_model_config(rm), ParallelConfig(), trainable=False)
    load_hf_checkpoint(policy, rm)
    head = load_file(f"{rm}/reward_head.safetensors")["score.weight"][0]
    tok, out = CharTokenizer(), []
    for t in texts:  # one text at a time: no padding at all
        ids = tok.encode(t, add_bos=True, add_eos=True)
        with torch.no_grad():
            hidden = policy.hidden_states(torch.tensor([ids]))[0, -1]
        out.append(float(hidden.float() @ head))
    return out


def test_mixed_dataset_routes_rows_by_their_reward_field(reward_world):
    """A TOML recipe naming the reward-model folder: rule rows get the weighted rule parts,
    model rows the reward model alone (one forward for both), with per-source columns whose
    means give each source's own mean (as the trainer would compute them)."""
    from r1fast.train.reward_routing import source_means

    rm, data, tmp = reward_world
    recipe = tmp / "mixed.toml"
    recipe.write_text(f'[data]\npath = "{data}"\nprompts_per_step = 2\n\n[reward]\nworkers = 0\n'
                      f'reward_model = "{rm}"\nreward_model_weight = 0.5\n')
    task = build_task(load_train_config(str(recipe)))
    try:
        exs = task.dataset.examples
        assert [ex["row"] for ex in exs] == [0, 1, 2, 3, 4]  # file order, file row numbers
        assert [ex.get("answer") for ex in exs] == ["5", None, "8", None, "2"]
        assert {exs[i]["reward"] for i in MODEL_ROWS} == {"reward_model"}
        reward = task.mixed.runners["model"].composite.parts[0].fn
        seen, model = [], reward.model
        reward.model = lambda texts: (seen.append(list(texts)), model(texts))[1]
        texts = ["<think>2+3</think> \\boxed{5}", " Thanks, friend!", "<think>x</think> \\boxed{9}",
                 " Hello there.", "\\boxed{2}"]
        out = task.score(texts, exs)
        want = _reference_scores(rm, [exs[i]["prompt"] + texts[i] for i in MODEL_ROWS])
        assert seen == [[exs[i]["prompt"] + texts[i] for i in MODEL_ROWS]]  # one batched call
        assert out["reward_model"] == pytest.approx([0, want[0], 0, want[1], 0], abs=1e-5)
        assert out["accuracy"] == [1.0, 0.0, 0.0, 0.0, 1.0]
        for i in RULE:
            assert out["total"][i] == pytest.approx(out["accuracy"][i] + 0.1 * out["format"][i])
        for j, i in enumerate(MODEL_ROWS):
            assert out["total"][i] == pytest.approx(0.5 * want[j], abs=1e-5)
            assert out["format"][i] == 0.0  # rule parts never ran on model rows
        assert out["rows_rule"] == [1.0, 0.0, 1.0, 0.0, 1.0]
        assert out["rows_model"] == [0.0, 1.0, 0.0, 1.0, 0.0]
        assert [a + b for a, b in zip(out["total_rule"], out["total_model"])] == out["total"]
        # the trainer logs reward/<part> = mean over all rows; source_means divides them
        step = {f"reward/{k}": sum(v) / len(v) for k, v in out.items() if k != "total"}
        means = source_means(step)
        assert means["reward/source_rule"] == pytest.approx(
            sum(out["total"][i] for i in RULE) / 3)
        assert means["reward/source_model"] == pytest.approx(0.5 * sum(want) / 2, abs=1e-5)
        rule_only = source_means({**step, "reward/rows_model": 0.0})
        assert "reward/source_model" not in rule_only  # no model rows: no mean, not 0
        assert task.failure_metrics() == {"errors": 0.0, "timeouts": 0.0, "crashes": 0.0}
        # without the rule rewards (a peer computes them) the reward model still runs
        peer = task.score(texts, exs, rules=False)
        assert set(peer) == set(out) and peer["accuracy"] == [0.0] * 5
        assert peer["reward_model"] == pytest.approx(out["reward_model"], abs=1e-6)
        assert peer["rows_model"] == out["rows_model"]
    finally:
        task.close()


def test_reward_model_in_weights_scores_every_rule_row(reward_world):
    rm, data, _ = reward_world
    task = build_task(cfg(f"--data.path={data}", f"--reward.reward_model={rm}",
                          "--reward.weights={accuracy = 1.0, reward_model = 2.0}"))
    try:
        exs = task.dataset.examples
        texts = ["\\boxed{5}", " hi", "\\boxed{8}", " yo", "\\boxed{3}"]
        out = task.score(texts, exs)
        want = _reference_scores(rm, [ex["prompt"] + t for ex, t in zip(exs, texts)])
        assert out["reward_model"] == pytest.approx(want, abs=1e-5)
        assert out["accuracy"] == [1.0, 0.0, 1.0, 0.0, 0.0]  # reward "rule": the default checker
        for i in RULE:
            assert out["total"][i] == pytest.approx(out["accuracy"][i] + 2.0 * want[i], abs=1e-5)
        for i in MODEL_ROWS:
            assert out["total"][i] == pytest.approx(want[i], abs=1e-5)  # weight 1.0 (default)
        # a model-parallel peer skips the rule parts, but the reward model among them runs:
        # its forward and syncs are collective (skipping it hung TP x PP runs)
        reward = next(p.fn for p in task.mixed.runners["rule"].composite.parts
                      if p.name == "reward_model")
        calls, batch = [], reward.score_batch
        reward.score_batch = lambda *a: (calls.append(len(a[0])), batch(*a))[1]
        task.score(texts, exs)
        scoring_rank, calls[:] = list(calls), []
        peer = task.score(texts, exs, rules=False)
        assert calls == scoring_rank == [3, 2]  # rule rows, then model rows: as on the scorer
        assert peer["accuracy"] == [0.0] * 5
        assert [peer["reward_model"][i] for i in RULE] == pytest.approx(
            [want[i] for i in RULE], abs=1e-5)
    finally:
        task.close()


def test_mixed_routing_errors_name_the_key(reward_world, tmp_path):
    from tests.helpers.reward_world import write_jsonl

    rm, data, tmp = reward_world
    with pytest.raises(ValueError, match=r"2 of 5 rows .* need.* reward.reward_model"):
        build_task(cfg(f"--data.path={data}"))
    with pytest.raises(ValueError, match="weights has reward_model, which needs "
                                         "reward.reward_model"):
        build_task(cfg("--reward.weights={accuracy = 1.0, reward_model = 1.0}"))
    with pytest.raises(ValueError, match=r"reward.reward_model .*init is not a reward-model "
                                         r"folder \(no reward_model.json\)"):
        build_task(cfg(f"--data.path={data}", f"--reward.reward_model={tmp / 'init'}"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "answer": "1"},
                                               {"prompt": " ", "reward": "reward_model"}])
    with pytest.raises(ValueError, match=r"bad.jsonl row 1 \(counting from 0\): key 'prompt': prompt is empty or "
                                         r"not text"):
        build_task(cfg(f"--data.path={bad}", f"--reward.reward_model={rm}"))


def test_stage_grpo_runs_on_a_mixed_dataset_with_per_source_metrics(reward_world):
    """`stage grpo` on the mixed file: one GRPO step through the policy, both reward streams
    logged, and their per-source means recoverable from the logged row."""
    from r1fast.pipeline import stages
    from r1fast.train.reward_routing import source_means

    rm, data, tmp = reward_world
    _, rows = stages.grpo(tmp / "init", tmp / "grpo", overrides=[
        f"--data.path={data}", "--data.prompts_per_step=4", "--algo.group_size=2",
        f"--reward.reward_model={rm}", "--reward.workers=0", "--rollout.max_new_tokens=6",
        "--run.steps=1", "--run.progress=false", "--run.tensorboard=false"])
    row = rows[-1]
    assert row["reward/rows_rule"] + row["reward/rows_model"] == pytest.approx(1.0)
    assert row["reward/total_rule"] + row["reward/total_model"] == pytest.approx(
        row["reward_mean"], abs=1e-6)
    assert row["reward/rows_model"] > 0 and row["reward/rows_rule"] > 0
    means = source_means(row)
    assert means["reward/source_model"] == pytest.approx(
        row["reward/total_model"] / row["reward/rows_model"])
    assert means["reward/source_model"] != 0.0  # the reward model scored real completions
    for k, v in means.items():  # the trainer logs them in the step's row
        assert row[k] == pytest.approx(v), k


def test_a_model_folder_without_a_tokenizer_is_never_silently_read_as_characters(tmp_path,
                                                                                  caplog):
    """Weights-only folder (config.json, no tokenizer files): a dataset file is refused, naming
    the folder; a synthetic task takes the character tokenizer and says so."""
    from r1fast.train.task import run_tokenizer

    folder = tmp_path / "weights_only"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n')
    synthetic = with_changes(load_train_config(None, []), run={"init_from": str(folder)})
    with pytest.raises(ValueError, match=rf"run.init_from={folder} holds no tokenizer .*"
                                         rf"data.path={data}"):
        run_tokenizer(with_changes(synthetic, data={"path": str(data)}))
    with caplog.at_level("WARNING", logger="r1fast.train"):
        assert isinstance(run_tokenizer(synthetic), CharTokenizer)
    assert "holds no tokenizer: the synthetic task" in caplog.text


def test_a_prompt_that_opens_the_thought_is_scored_with_it():
    """Thinking models' chat templates end the prompt with '<think>\\n': the completion starts
    inside the thought, and the rule rewards read it with the '<think>' in front."""
    task = build_task(cfg())
    try:
        ex = dict(task.next_prompts(4, 1, 0)[0])
        text = f"adding</think> \\boxed{{{ex['answer']}}}"
        opened = dict(ex, prompt=ex["prompt"] + "<think>\n")
        assert task.score([text], [opened])["format"] == [1.0]
        assert task.score([text], [ex])["format"] == [0.0]  # the prompt did not open it
        assert task.score(["<think>" + text], [opened])["format"] == [0.0]  # opened twice
    finally:
        task.close()


def test_a_row_naming_an_unknown_reward_is_an_error_before_training(tmp_path):
    data = tmp_path / "typo.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n'
                    '{"prompt": "2+2", "answer": "4", "reward": "mathh"}\n')
    with pytest.raises(ValueError, match=r"typo.jsonl row 1 \(counting from 0\): reward='mathh' is not a reward; "
                                         r"use one of \(.*'math_accuracy'.*\), 'rule'"):
        build_task(cfg(f"--data.path={data}"))


def test_prompt_rendering_keeps_every_turn_and_says_what_it_cannot_do(tmp_path, caplog):
    """data.template wraps a conversation's last message and keeps the earlier turns (its
    system message too); data.system_prompt without a chat template is an error; rows with
    their own system message are counted in a warning."""
    from r1fast.data.hf_tokenizer import HFTokenizer
    from r1fast.data.tiny_hf import build_tokenizer
    from r1fast.train.task import _warn_own_system_prompts, render_prompt

    build_tokenizer(tmp_path, ["What is 2 + 3? Be brief. assistant user system"] * 20)
    hf = HFTokenizer.load(tmp_path)
    chat = {"id": "c", "question": "What is 2 + 3?",
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "What is 2 + 3?"}]}
    d = load_train_config(None, ["--data.template=Q: {question}\nA:"]).data
    out = render_prompt(chat, hf, d)
    assert out.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert "<|im_start|>user\nQ: What is 2 + 3?\nA:<|im_end|>" in out

    d = load_train_config(None, ["--data.system_prompt=Think.", "--data.chat_template=false"]).data
    with pytest.raises(ValueError, match=r"example q needs data.system_prompt='Think.' in a "
                                         r"chat, but the tokenizer has no chat template"):
        render_prompt({"id": "q", "question": "1+1"}, hf, d)

    d = load_train_config(None, ["--data.system_prompt=Think."]).data
    with caplog.at_level("WARNING", logger="r1fast.train"):
        _warn_own_system_prompts([chat, {"id": "q", "question": "1+1"}], d)
    assert "1 of 2 rows carry their own system message" in caplog.text


def test_a_dataset_asking_for_a_missing_chat_template_is_told(tmp_path, caplog):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n' * 4)
    with caplog.at_level("WARNING", logger="r1fast.train"):
        build_task(cfg(f"--data.path={data}")).close()  # the character tokenizer: no template
    assert "data.chat_template is true but CharTokenizer" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="r1fast.train"):
        build_task(cfg(f"--data.path={data}", "--data.chat_template=false")).close()
    assert "chat_template" not in caplog.text


def test_prompts_too_long_for_the_context_fail_at_load_or_are_dropped_loudly(caplog):
    """A prompt longer than the context leaves beside max_new_tokens used to fail at the step
    that drew it, with a KV-cache message naming neither key."""
    from r1fast.train.task import check_inputs

    task = build_task(cfg())
    lengths = [len(task.tokenizer.encode(ex["prompt"], add_bos=True))
               for ex in task.dataset.examples]
    task.close()
    room = min(lengths) + 1  # some prompts fit, most do not
    tight = ["--model.max_position_embeddings=256", f"--rollout.max_new_tokens={256 - room}"]
    with pytest.raises(ValueError, match=rf"prompts are longer than the {room} tokens model."
                                         rf"max_position_embeddings=256 leaves beside rollout."
                                         rf"max_new_tokens={256 - room} \(the longest, .* has "
                                         rf"{max(lengths)}\); set data.max_prompt_tokens={room}"):
        build_task(cfg(*tight))
    with caplog.at_level("WARNING", logger="r1fast.train"):
        task = build_task(cfg(*tight, f"--data.max_prompt_tokens={room}"))
    kept = sum(n <= room for n in lengths)
    assert len(task.dataset.examples) == kept and 0 < kept < len(lengths)
    assert f"data.max_prompt_tokens={room} dropped {len(lengths) - kept} of 40" in caplog.text
    task.close()
    with pytest.raises(ValueError, match=rf"data.max_prompt_tokens={room + 1} keeps prompts "
                                         rf"that do not fit"):
        check_inputs(cfg(*tight, f"--data.max_prompt_tokens={room + 1}"))


def test_held_out_prompts_are_measured_at_load_too(tmp_path, caplog):
    """A test_path prompt too long for the context used to fail only in the evaluation after
    the last step; it is now measured with the training prompts, and evaluated from there."""
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text('{"prompt": "1+1", "answer": "2"}\n' * 4)
    test.write_text('{"prompt": "2+2", "answer": "4"}\n'
                    + json.dumps({"prompt": "9" * 300, "answer": "9"}) + "\n")
    args = [f"--data.path={train}", f"--data.test_path={test}", "--data.chat_template=false",
            "--model.max_position_embeddings=256", "--rollout.max_new_tokens=16"]
    with pytest.raises(ValueError, match=rf"1 of 2 held-out prompts \({test}\) are longer than "
                                         rf"the 240 tokens"):
        build_task(cfg(*args))
    with caplog.at_level("WARNING", logger="r1fast.train"):
        task = build_task(cfg(*args, "--data.max_prompt_tokens=240"))
    assert "dropped 1 of 2 held-out prompts" in caplog.text
    held_out = task.held_out  # the eval.jsonl rows report the dropped one beside the scores
    assert held_out.source == str(test) and [ex["answer"] for ex in held_out.examples] == ["4"]
    assert held_out.dropped == 1
    task.close()
    task = build_task(cfg(f"--data.path={train}", "--data.chat_template=false"))
    assert task.held_out is None  # nothing asked for, nothing evaluated
    task.close()


def test_mini_batches_that_do_not_divide_the_rows_fail_before_the_model(caplog, monkeypatch):
    """With packing, algo.mini_batches that does not divide a rank's rows failed at the first
    update ("cannot split 16 rows into 3 equal parts"), after a whole rollout, naming no key;
    a step whose mini-batches cannot be shared out in whole groups at this DP size says so."""
    from r1fast.train.task import check_inputs, check_micro_batch_size

    packed = ["--parallel.max_tokens_per_microbatch=512", "--algo.group_size=4"]
    with pytest.raises(ValueError, match=r"algo.mini_batches=3 must divide the 16 rows a "
                                         r"data-parallel rank trains on per step"):
        check_micro_batch_size(cfg(*packed, "--algo.mini_batches=3"), 1)
    # two processes, DP 2 (an earlier test's process group would otherwise say 1)
    monkeypatch.setattr("r1fast.policy.parallel.expected_world_size", lambda: 2)
    with caplog.at_level("WARNING", logger="r1fast.train"):
        check_inputs(cfg(*packed, "--algo.mini_batches=4"))
    assert "algo.mini_batches=4 at dp 2: data.prompts_per_step=4 is not a multiple of 8" \
        in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="r1fast.train"):
        check_inputs(cfg(*packed, "--algo.mini_batches=2"))
    assert "mini_batches" not in caplog.text


def test_a_run_folder_as_init_from_names_its_model_folder(tmp_path):
    """run.init_from=<a run folder> failed reading a checkpoint's meta.json there."""
    from r1fast.train.task import check_inputs

    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ValueError, match=rf"run.init_from={tmp_path} is a run folder: give its "
                                         rf"model folder \({tmp_path / 'model'}"):
        check_inputs(cfg(f"--run.init_from={tmp_path}"))


def test_held_out_prompts_that_are_training_prompts_are_warned(tmp_path, caplog):
    """The same file as data.path and data.test_path (or splits that overlap) evaluated the
    run on what it trained on, without a word."""
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer": "4"}\n')
    test.write_text('{"prompt": "2+2", "answer": "4"}\n{"prompt": "3+3", "answer": "6"}\n')
    with caplog.at_level("WARNING", logger="r1fast.train"):
        build_task(cfg(f"--data.path={train}", f"--data.test_path={test}",
                       "--data.chat_template=false", "--data.prompts_per_step=2")).close()
    assert f"1 of the 2 held-out prompts ({test}) are also training prompts" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="r1fast.train"):
        build_task(cfg(f"--data.path={test}", f"--data.test_path={train}",
                       "--data.chat_template=false", "--data.prompts_per_step=2", "--data.eval_max_problems=1")).close()
    assert "are also training prompts" not in caplog.text  # 1+1 alone is held out


def test_reward_model_cuts_are_warned_at_start_and_counted_each_step(reward_world, caplog):
    """The reward model warned at its first cut only ('later cuts are counted in texts_cut',
    which nothing read): completions grow during RL, their prompts' starts cut without a word
    (helper-72). A run whose texts can exceed its max_length warns at the start, and each step
    reports the texts cut since the last."""
    rm, data, _ = reward_world  # the reward model reads 64 tokens
    with caplog.at_level("WARNING", logger="r1fast.train"):
        task = build_task(cfg(f"--data.path={data}", f"--reward.reward_model={rm}",
                              "--rollout.max_new_tokens=60"))
    try:
        assert f"reward.reward_model={rm} reads 64 tokens, but the longest prompts take" \
            in caplog.text
        exs = task.dataset.examples
        assert task.reward_model_metrics(lambda v: v) == {"reward_model_texts_cut": 0.0}
        task.score(["y", "x" * 70, "w", "z" * 80, "v"], exs)  # rows 1 and 3: the model's
        assert task.reward_model_metrics(lambda v: [2 * x for x in v]) == {  # 2 DP ranks
            "reward_model_texts_cut": 4.0}
        task.score(["y"] * 5, exs)
        assert task.reward_model_metrics(lambda v: v) == {"reward_model_texts_cut": 0.0}
    finally:
        task.close()


def test_raw_reward_model_scores_that_set_the_advantages_are_warned(reward_world, caplog):
    """A reward model's raw Bradley-Terry score (arbitrary offset, a spread that grows with its
    training) was added to 0/1 rule rewards without a word (helper-72: it outweighed accuracy).
    Where its scale matters the start warns; reward.reward_model_normalize standardises it with
    the scale its training recorded, and refuses a folder that recorded none."""
    rm, data, _ = reward_world  # written without a score scale, as an older r1fast did

    def warnings(*extra):
        caplog.clear()
        with caplog.at_level("WARNING", logger="r1fast.train"):
            build_task(cfg(f"--data.path={data}", f"--reward.reward_model={rm}", *extra)).close()
        return [r.getMessage() for r in caplog.records if "raw score" in r.getMessage()]

    assert warnings() == []  # routed rows alone under grpo: normalised per group, scale cancels
    (mixed,) = warnings("--reward.weights={accuracy = 1.0, reward_model = 2.0}")
    assert mixed == (f"reward.reward_model={rm}'s raw score (a scale it did not record) is "
                     f"added to the rule rewards of each row (reward.weights): set "
                     f"reward.reward_model_normalize = true to standardise it")
    (rloo,) = warnings("--algo.estimator=rloo")
    assert "sets the advantages' size under algo.estimator='rloo'" in rloo
    with pytest.raises(ValueError, match=r"records no score scale \(score_mean / score_std in "
                                         r"reward_model.json"):
        build_task(cfg(f"--data.path={data}", f"--reward.reward_model={rm}",
                       "--reward.reward_model_normalize=true"))
