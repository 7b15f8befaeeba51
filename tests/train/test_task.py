"""What a run trains on: prompts, tokenizer and rewards (r1fast.train.task)."""
import pytest

from r1fast.data import CharTokenizer
from r1fast.train.config import load_train_config
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
