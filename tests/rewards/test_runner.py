"""RewardRunner: failures become 0 with counted warnings, hung workers are replaced, the real
rewards score generated data correctly in workers, inline and batched placement."""
import logging
import os
import pathlib
import time

import pytest

from r1fast.data.tasks import generate_arithmetic, generate_countdown
from r1fast.data.template import sft_example
from r1fast.rewards import (CompositeReward, CountdownReward, FormatReward, MathAccuracyReward,
                            RewardModelReward, RewardRunner, RunnerConfig)

ROOT = pathlib.Path(__file__).resolve().parents[2]


# Hostile rewards. Module-level so spawned workers can import them by name.
def sleeper(completion, example):
    time.sleep(600)
    return 1.0


def looper(completion, example):
    while True:
        pass


def raiser(completion, example):
    raise RuntimeError("reward bug")


def crasher(completion, example):
    os._exit(9)


def returns_nan(completion, example):
    return float("nan")


def returns_text(completion, example):
    return "one"


def length(completion, example):
    return float(len(completion))


@pytest.fixture(scope="module")
def importable_tests():
    # Workers unpickle the hostile rewards by module name (tests.rewards.test_runner): make
    # sure the repository root is on the path they inherit, however pytest was launched.
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT))
        yield


def test_by_default_the_cpu_limit_ends_a_slow_check_before_the_wall_clock_kill():
    """Unset, cpu_time_s was timeout_s: CPU time never runs ahead of the wall clock, so the
    kill (a worker restart, a verdict that depends on machine load) decided every timeout.
    It is now half of timeout_s, and the worker's own limit ends the call."""
    slow = "<think>t</think> \\boxed{(x+y+z)^{300}}"  # minutes of sympy
    with RewardRunner([(MathAccuracyReward(), 1.0)], timeout_s=4.0, num_workers=1) as runner:
        assert runner.pool.cpu_limit_s == 2.0  # half of timeout_s
    # the worker's CPU limit ends the call itself; a wall limit far above it, so that a loaded
    # machine (a worker given under half a core) cannot make the kill win the race
    with RewardRunner([(MathAccuracyReward(), 1.0)], timeout_s=60.0, cpu_time_s=1.0,
                      num_workers=1) as runner:
        assert runner([slow], [{"answer": "1"}]).status == {"math_accuracy": ["timeout"]}
        m = runner.metrics()
        assert m["rewards/timeouts"] == 1 and m["rewards/worker_restarts"] == 0, m


def test_failures_score_zero_counted_and_workers_replaced(importable_tests, caplog):
    parts = [(length, 1.0), (sleeper, 1.0), ("loop", looper, 1.0), (raiser, 1.0), (crasher, 1.0),
             (returns_nan, 1.0), (returns_text, 1.0), (FormatReward(), 0.5)]
    # cpu_time_s above timeout_s: the busy loop is ended by the wall-clock kill (a restart);
    # with both at 1 s the worker's own CPU limit won the race now and then (no restart)
    with RewardRunner(parts, timeout_s=1.0, cpu_time_s=30.0, num_workers=2) as runner:
        assert runner.placement["format"] == "inline" and runner.placement["sleeper"] == "worker"
        with caplog.at_level(logging.WARNING, logger="r1fast.rewards"):
            out = runner(["<think>t</think> \\boxed{1}"], [{}])
        assert out.status == {"length": ["ok"], "sleeper": ["timeout"], "loop": ["timeout"],
                              "raiser": ["error"], "crasher": ["crash"], "returns_nan": ["error"],
                              "returns_text": ["error"], "format": ["ok"]}
        n = len("<think>t</think> \\boxed{1}")
        assert out.parts["length"] == [float(n)] and out.parts["sleeper"] == [0.0]
        assert out.total == [pytest.approx(n + 0.5)]
        m = runner.metrics()
        assert m["rewards/timeouts"] == 2 and m["rewards/errors"] == 3 and m["rewards/crashes"] == 1
        assert m["rewards/ok"] == 2 and m["rewards/calls"] == 8
        assert m["rewards/worker_restarts"] == 3 and m["rewards/raiser/errors"] == 1
        assert m["rewards/format/mean"] == 1.0
        logged = [r for r in caplog.records if r.name == "r1fast.rewards"]
        assert len(logged) == 6 and any("reward bug" in r.getMessage() for r in logged)
        # the pool is whole again: a healthy batch goes through on replaced workers
        again = runner.pool.run([(length, (s, {})) for s in ("ab", "abc", "abcd")], timeout_s=30)
        assert [o.value for o in again] == [2.0, 3.0, 4.0]
        assert sum(w.proc.is_alive() for w in runner.pool._workers) == 2
        runner.reset_metrics()
        assert runner.metrics()["rewards/timeouts"] == 0.0


def test_math_in_workers_with_hostile_answers(tmp_path):
    marker = tmp_path / "pwned"
    comp = CompositeReward([(MathAccuracyReward(), 1.0), (FormatReward(), 0.5)])
    completions = [
        "<think>2+3=5</think> \\boxed{5}",
        "<think>t</think> \\boxed{9^{9^{9}}}",               # refused by the bounded evaluator
        "<think>t</think> \\boxed{x^{9^{9^{9}}}}",           # hangs inside sympy: killed
        f"<think>t</think> \\boxed{{__import__('os').system('touch {marker}')}}",
        "",
    ]
    with RewardRunner(comp, timeout_s=2.0, num_workers=2) as runner:
        assert runner.placement == {"math_accuracy": "worker", "format": "inline"}
        out = runner(completions, [{"answer": "5"}] * len(completions))
        assert out.parts["math_accuracy"] == [1.0, 0.0, 0.0, 0.0, 0.0]
        assert out.status["math_accuracy"] == ["ok", "ok", "timeout", "ok", "ok"]
        assert out.parts["format"] == [1.0, 1.0, 1.0, 1.0, 0.0]
        assert out.total == [1.5, 0.5, 0.5, 0.5, 0.0]
        assert runner.metrics()["rewards/math_accuracy/timeouts"] == 1
        # every generated arithmetic answer scores 1.0 through the sandboxed path
        data = generate_arithmetic(24, split="test", seed=3)
        sft = [sft_example(e)["completion"] for e in data]
        assert runner(sft, data).parts["math_accuracy"] == [1.0] * 24
    assert not marker.exists()


def test_inline_mode_and_generated_countdown():
    data = generate_countdown(30, seed=5)
    sft = [sft_example(e)["completion"] for e in data]
    runner = RewardRunner([(CountdownReward(), 1.0), (raiser, 1.0)], mode="inline")
    assert set(runner.placement.values()) == {"inline"}
    out = runner(sft, data)
    assert out.parts["countdown"] == [1.0] * 30 and out.parts["raiser"] == [0.0] * 30
    assert runner.metrics()["rewards/errors"] == 30
    assert runner._pool is None  # nothing was spawned


def test_batched_part_failures():
    calls = []

    def model(texts):
        calls.append(len(texts))
        return [1.0, float("nan"), 3.0][:len(texts)]
    rm = RewardModelReward(model, include_prompt=False, batch_size=8)
    runner = RewardRunner([(rm, 2.0)])
    assert runner.placement == {"reward_model": "batched"}
    out = runner(["a", "b", "c"], [{}, {}, {}])
    assert out.parts["reward_model"] == [1.0, 0.0, 3.0] and out.total == [2.0, 0.0, 6.0]
    assert out.status["reward_model"] == ["ok", "error", "ok"] and calls == [3]

    def broken(texts):
        raise RuntimeError("gpu fell off")
    out = RewardRunner(RewardModelReward(broken))(["a", "b"], [{}, {}])
    assert out.total == [0.0, 0.0] and out.status["reward_model"] == ["error", "error"]


def test_a_reward_workers_cannot_import_fails_the_start_not_every_call(tmp_path):
    """A reward defined in a script's main block pickles by name but a spawned worker cannot
    find it: each call used to fail in the worker and score 0, counted as an error, for the
    whole run. The workers now unpickle the rewards before they report ready."""
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(
        "from r1fast.rewards import RewardRunner\n"
        "if __name__ == '__main__':\n"
        "    def my_reward(completion, example):\n"
        "        return 1.0\n"
        "    with RewardRunner(my_reward, num_workers=1) as runner:\n"
        "        print(runner(['a'], [{}]).status)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0, out.stdout
    assert "RuntimeError: reward worker failed to start" in out.stderr
    assert "Can't get attribute 'my_reward'" in out.stderr
    assert "a reward defined in __main__" in out.stderr


def test_empty_batch_spawns_nothing():
    runner = RewardRunner(MathAccuracyReward())
    out = runner([], [])
    assert out.total == [] and out.parts == {"math_accuracy": []} and runner._pool is None


def test_bad_inputs():
    runner = RewardRunner(FormatReward())
    with pytest.raises(ValueError, match="same length"):
        runner(["a"], [])
    with pytest.raises(ValueError, match=r"completions\[1\] must be a str"):
        runner(["a", 3], [{}, {}])
    with pytest.raises(ValueError, match=r"examples\[0\] must be a dict"):
        runner(["a"], ["x"])
    with pytest.raises(ValueError, match="completions must be a sequence of str"):
        runner("abc", [{}])
    with pytest.raises(ValueError, match="reward must be a callable"):
        RewardRunner(42)
    with pytest.raises(ValueError, match="reward part 'lam' runs in worker processes and must be picklable"):
        RewardRunner([("lam", lambda c, e: 1.0, 1.0)])
    assert RewardRunner([("lam", lambda c, e: 1.0, 1.0)], mode="inline")(["x"], [{}]).total == [1.0]
    with pytest.raises(ValueError, match="mode must be one of"):
        RunnerConfig(mode="threads")
    with pytest.raises(ValueError, match="timeout_s must be in"):
        RunnerConfig(timeout_s=0)
    with pytest.raises(ValueError, match="num_workers must be in"):
        RunnerConfig(num_workers=0)
    with pytest.raises(ValueError, match="log_failures must be in"):
        RunnerConfig(log_failures=-1)
