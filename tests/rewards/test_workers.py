"""WorkerPool: order, errors, hard timeouts, crashes, memory limit, setup failures.

The tasks are standard-library callables, so the spawned workers need nothing from the tests.
"""
import math
import operator
import os
import sys
import time

import pytest

from r1fast.rewards.workers import WorkerPool


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(2, memory_limit_mb=512, startup_timeout_s=120) as p:
        p.start()
        yield p


def test_results_in_order(pool):
    out = pool.run([(operator.add, (i, i)) for i in range(7)], timeout_s=30)
    assert [o.status for o in out] == ["ok"] * 7
    assert [o.value for o in out] == [2.0 * i for i in range(7)]


def test_errors_are_outcomes_not_exceptions(pool):
    restarts = pool.restarts
    out = pool.run([
        (math.factorial, (-1,)),          # raises ValueError
        (operator.truediv, (1, 0)),       # raises ZeroDivisionError
        (str.upper, ("a",)),              # returns a non-number
        (float, ("nan",)),                # returns a non-finite number
        (sys.exit, (3,)),                 # SystemExit must not kill the worker
        (lambda: 1.0, ()),                # cannot be pickled to a worker
        (operator.add, (1, 2)),
    ], timeout_s=30)
    assert [o.status for o in out] == ["error"] * 6 + ["ok"]
    for o, name in zip(out, ["ValueError", "ZeroDivisionError", "str 'A', not a number",
                             "non-finite", "SystemExit", "cannot send"]):
        assert name in o.message and o.value == 0.0
    assert out[-1].value == 3.0
    assert pool.restarts == restarts  # nothing had to be killed


@pytest.mark.timeout(120)
def test_all_unpicklable_batch_returns(pool):
    out = pool.run([(lambda: 1.0, ())] * 5, timeout_s=30)
    assert [o.status for o in out] == ["error"] * 5


def test_timeout_kills_and_replaces(pool):
    restarts = pool.restarts
    pids_before = {w.proc.pid for w in pool._workers}
    out = pool.run([(time.sleep, (60,)), (operator.mul, (6, 7))], timeout_s=1.0)
    assert out[0].status == "timeout" and out[0].value == 0.0 and "killed" in out[0].message
    assert out[1].status == "ok" and out[1].value == 42.0
    assert pool.restarts == restarts + 1
    assert len(pids_before - {w.proc.pid for w in pool._workers}) == 1  # exactly one replaced
    again = pool.run([(operator.add, (i, 1)) for i in range(4)], timeout_s=30)
    assert [o.value for o in again] == [1.0, 2.0, 3.0, 4.0]


def test_crash_is_an_outcome(pool):
    out = pool.run([(os._exit, (7,)), (operator.add, (2, 2))], timeout_s=30)
    assert out[0].status == "crash" and "exit code 7" in out[0].message
    assert out[1].status == "ok" and out[1].value == 4.0


def test_memory_limit(pool):
    out = pool.run([(bytearray, (4 * 1024 ** 3,))], timeout_s=30)
    assert out[0].status == "error" and "MemoryError" in out[0].message


def test_a_worker_that_ran_out_of_memory_is_replaced():
    """A reward that leaks made every later call on its worker a MemoryError (until recycling
    after 10,000 calls): the worker now ends after the reply and a fresh one takes the next."""
    from tests.helpers.hostile_rewards import leak_150mb

    with WorkerPool(1, memory_limit_mb=512, startup_timeout_s=120) as p:
        out = [o.status for o in p.run([(leak_150mb, ("", {}))] * 8, timeout_s=60)]
    assert "error" in out and "crash" not in out, out
    assert all(out[i + 1] == "ok" for i, s in enumerate(out[:-1]) if s == "error"), out


def test_a_forked_child_that_returns_does_not_answer_for_the_worker(pool):
    """A reward that forks and returns in the child: the child's -1 took the task's place."""
    from tests.helpers.hostile_rewards import fork_and_return

    out = pool.run([(fork_and_return, (float(i),)) for i in range(4)], timeout_s=30)
    assert [(o.status, o.value) for o in out] == [("ok", float(i)) for i in range(4)]


@pytest.mark.parametrize("entry, match", [
    ("r1fast_no_such_module_xyz", "ModuleNotFoundError"),
    ("os:no_such_warm_up", "AttributeError"),
])
def test_preload_failure_is_a_setup_error(entry, match):
    p = WorkerPool(1, preload=(entry,))
    with pytest.raises(RuntimeError, match=f"failed to start.*{match}"):
        p.run([(operator.add, (1, 1))], timeout_s=5)
    p.close()


def test_preload_warm_up_runs_before_ready():
    import faulthandler
    with WorkerPool(1, preload=("faulthandler:enable",)) as p:  # a warm-up with a visible effect
        assert p.run([(faulthandler.is_enabled, ())], timeout_s=30)[0].value == 1.0
    with WorkerPool(1) as p:
        assert p.run([(faulthandler.is_enabled, ())], timeout_s=30)[0].value == 0.0


@pytest.mark.parametrize("kwargs, match", [
    ({"num_workers": 0}, "num_workers must be in"),
    ({"start_method": "teleport"}, "start_method must be one of"),
    ({"memory_limit_mb": 1}, "memory_limit_mb must be in"),
    ({"max_tasks_per_worker": 0}, "max_tasks_per_worker must be in"),
    ({"startup_timeout_s": 0}, "startup_timeout_s must be in"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WorkerPool(**kwargs)


def test_bad_timeout(pool):
    for t in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="timeout_s must be a finite number > 0"):
            pool.run([(operator.add, (1, 1))], timeout_s=t)


def test_recycling_after_max_tasks():
    with WorkerPool(1, max_tasks_per_worker=2) as p:
        out = p.run([(os.getpid, ())] * 5, timeout_s=60)
        assert [o.status for o in out] == ["ok"] * 5
        pids = [o.value for o in out]
        assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]
        assert p.restarts == 0  # recycling is not a failure


def test_sys_exit_in_a_reward_called_inline_is_an_error_not_the_end_of_the_run():
    """bounded_call serves the runner's inline mode and rewards marked sandbox=False:
    SystemExit went through it and ended the training process."""
    from r1fast.rewards.workers import bounded_call

    out = bounded_call(sys.exit, (3,), None)
    assert out.status == "error" and "SystemExit" in out.message
