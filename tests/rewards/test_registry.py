"""Rewards by name: plain functions and factories, and per-row routing."""
import pickle

import pytest

from r1fast.rewards import RoutedReward, get_reward, register_reward


def shouty(completion: str, example: dict) -> float:
    return float(completion.isupper())


def test_a_plain_function_registers_by_name_and_takes_no_options():
    register_reward("test_shouty", shouty)
    register_reward("test_shouty", shouty)  # the same function again is fine
    assert get_reward("test_shouty") is shouty
    with pytest.raises(ValueError, match="plain function and takes no options"):
        get_reward("test_shouty", strict=True)
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_shouty", lambda c, e: 0.0)


def test_routed_reward_uses_the_rows_reward_or_the_default():
    register_reward("test_shouty2", shouty)
    routed = RoutedReward("math_accuracy")
    assert routed("\\boxed{4}", {"answer": "4"}) == 1.0
    assert routed("ABC", {"answer": "4", "reward": "test_shouty2"}) == 1.0
    assert routed("abc", {"answer": "4", "reward": "test_shouty2"}) == 0.0
    pickle.dumps(routed)  # it runs in reward worker processes
    with pytest.raises(ValueError, match="reward name must be one of"):
        RoutedReward("nope")


def test_a_routed_reward_in_a_fresh_worker_never_imports_torch():
    """Dataset runs score with RoutedReward, which builds its rewards on a worker's first call;
    their config checks imported torch there (about 2 s of CPU inside that call's time limit,
    again after every worker restart)."""
    import subprocess
    import sys

    code = ("import pickle, sys\n"
            "from r1fast.rewards.registry import RoutedReward\n"
            "r = pickle.loads(pickle.dumps(RoutedReward('math_accuracy')))\n"
            "score = r('<think>x</think> \\\\boxed{2}', {'answer': '2', 'reward': 'rule'})\n"
            "print(score, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["1.0", "False"]


def test_a_reward_registered_at_run_time_reaches_the_workers():
    """A worker registers only the built-in rewards: rows routed to a reward the main process
    registered (after import, e.g. in a script's main block) scored 0 there, as errors."""
    import operator

    from r1fast.rewards import RewardRunner
    from r1fast.rewards.registry import _REGISTRY

    register_reward("test_not_equal_run_time", operator.ne)  # 1.0 for any text and row
    try:
        # a loaded machine may take seconds over the first call's imports: not what is tested
        with RewardRunner([("accuracy", RoutedReward("math_accuracy"), 1.0)],
                          num_workers=1, timeout_s=60.0) as runner:
            out = runner(["ABC", "\\boxed{4}"], [{"answer": "4",
                                                    "reward": "test_not_equal_run_time"},
                                                   {"answer": "4"}])
    finally:
        del _REGISTRY["test_not_equal_run_time"]
    assert out.parts["accuracy"] == [1.0, 1.0] and out.status["accuracy"] == ["ok", "ok"]
