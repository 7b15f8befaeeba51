"""Rewards under hostile load: a verdict decided by CPU time, not wall time (the same limit in
a worker and in-process), and a killed worker takes its child processes with it."""
import contextlib
import os
import time

import pytest

from r1fast.rewards.runner import RewardRunner
from r1fast.rewards.cpu_limit import CpuTimeExceeded, cpu_time_limit
from r1fast.rewards.workers import WorkerPool
from tests.helpers import reward_cases as rc

pytestmark = pytest.mark.reliability


def test_cpu_limit_counts_cpu_not_wall_time():
    with cpu_time_limit(0.2):
        time.sleep(0.6)  # a busy machine: wall time passes, this process uses no CPU
    with pytest.raises(CpuTimeExceeded) as e:
        with cpu_time_limit(0.2) as token:
            rc.spin()
    assert e.value.token is token


def test_nested_limits_fire_with_the_earliest_deadline():
    with pytest.raises(CpuTimeExceeded) as e:
        with cpu_time_limit(0.2) as outer:
            with cpu_time_limit(30) as inner:
                rc.spin()
    assert e.value.token is outer and e.value.token is not inner
    with cpu_time_limit(30):  # the handler and timer are restored after the blocks
        rc.spin(0.05)


@pytest.mark.parametrize("mode", ["inline", "process"])
def test_same_cpu_limit_in_worker_and_in_process(mode):
    reward = [("spin", rc.spin_reward, 1.0), ("sleepy", rc.sleepy_reward, 1.0)]
    runner = RewardRunner(reward, mode=mode, num_workers=1, timeout_s=20.0, cpu_time_s=0.3)
    with runner:
        t0 = time.monotonic()
        out = runner(["a", "b"], [{"sleep": 0.8}, {"sleep": 0.8}])
        took = time.monotonic() - t0
    # the spinning part stops on CPU time (long before the 20 s wall kill); the sleeping part
    # uses 0.8 s of wall time but no CPU: it is not a timeout
    assert out.status["spin"] == ["timeout", "timeout"]
    assert out.status["sleepy"] == ["ok", "ok"] and out.parts["sleepy"] == [1.0, 1.0]
    assert took < 15


def test_killed_worker_takes_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    with WorkerPool(1, memory_limit_mb=None) as pool:
        out = pool.run([(rc.child_then_spin, (str(pid_file),))], timeout_s=3.0)
    assert out[0].status == "timeout"
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        if _is_zombie(child):
            return
        time.sleep(0.05)
    os.kill(child, 9)  # clean up before failing
    pytest.fail(f"the reward's child process {child} outlived its killed worker")


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_math_verdict_does_not_depend_on_wall_time(monkeypatch):
    """A correct symbolic answer whose check waits (a loaded machine) stays correct: the
    budget is CPU time. With math-verify's 1 s wall-clock alarm this was scored wrong."""
    pytest.importorskip("math_verify")
    import math_verify.parser as mv_parser

    from r1fast.rewards.math import MathRewardConfig, answers_equal

    real = mv_parser.extract_target_from_pred  # runs inside math-verify's timed region

    def slow(*a, **k):
        time.sleep(1.3)
        return real(*a, **k)

    monkeypatch.setattr(mv_parser, "extract_target_from_pred", slow)
    assert answers_equal("\\sqrt{x^2}", "|x|", MathRewardConfig(parse_timeout_s=1))

    # and the CPU budget still bounds it: a check that burns more CPU than allowed is wrong
    def busy(*a, **k):
        rc.spin(2.0)
        return real(*a, **k)

    monkeypatch.setattr(mv_parser, "extract_target_from_pred", busy)
    # this thread's CPU time: late in the suite other threads of the pytest process (left by
    # earlier tests) also burn CPU, which process_time() would count
    t0 = time.thread_time()
    assert not answers_equal("\\sqrt{x^2}", "|x|", MathRewardConfig(parse_timeout_s=0.2))
    assert time.thread_time() - t0 < 1.5


def test_cpu_limit_counts_only_the_calling_thread():
    """Another thread of the process burning CPU (as torch's OpenMP workers do while they
    spin-wait) must not use up a reward call's CPU budget: the limit is the calling thread's."""
    import threading

    stop = threading.Event()

    def burn():
        while not stop.is_set():
            pass

    other = threading.Thread(target=burn, daemon=True)
    other.start()
    try:
        t0 = time.process_time()
        with cpu_time_limit(0.3):
            while time.process_time() - t0 < 1.0:  # the other thread's CPU, not ours
                time.sleep(0.01)
        # and our own CPU does count, however much the other thread burns meanwhile
        with pytest.raises(CpuTimeExceeded, match="CPU-time limit of 0.3"):
            with cpu_time_limit(0.3):
                rc.spin(5.0)
    finally:
        stop.set()
        other.join()


@pytest.fixture(params=["thread_timer", "itimer_prof"])
def timer_kind(request, monkeypatch):
    """Both ways the limit can be armed: the Linux per-thread CPU timer and the portable
    process-wide ITIMER_PROF fallback."""
    from r1fast.rewards import cpu_limit

    if request.param == "itimer_prof":
        monkeypatch.setattr(cpu_limit, "_LIBC", None)
    elif cpu_limit._LIBC is None:
        pytest.skip("no timer_create with SIGEV_THREAD_ID on this platform")
    return request.param


def test_limit_fires_on_time_while_a_gil_free_c_thread_burns(timer_kind):
    """A C thread that holds no GIL (an OpenMP worker, a long hash) catches a process-wide
    SIGPROF, and the main thread then runs the handler only when that thread next wants the
    GIL: seconds late (CI saw a 0.2 s limit let 2 s of spinning through). The per-thread timer
    signals the limited thread itself."""
    import hashlib
    import threading

    stop = threading.Event()

    def burn_without_gil():
        while not stop.is_set():
            hashlib.pbkdf2_hmac("sha256", b"x", b"salt", 2_000_000)  # ~1 s in C, GIL released

    other = threading.Thread(target=burn_without_gil, daemon=True)
    other.start()
    try:
        overruns = []
        for _ in range(3):
            t0 = time.thread_time()
            with pytest.raises(CpuTimeExceeded):
                with cpu_time_limit(0.1):
                    rc.spin()
            overruns.append(time.thread_time() - t0 - 0.1)
    finally:
        stop.set()
        other.join()
    if timer_kind == "thread_timer":
        assert max(overruns) < 0.1, overruns
    else:  # documents why the fallback is only a fallback; the CPU budget still holds
        assert all(o >= -1e-3 for o in overruns), overruns


def test_limit_basics_hold_on_both_timers(timer_kind):
    with cpu_time_limit(0.2):
        time.sleep(0.3)
    with pytest.raises(CpuTimeExceeded) as e:
        with cpu_time_limit(0.2) as outer:
            with cpu_time_limit(30):
                rc.spin()
    assert e.value.token is outer
    with cpu_time_limit(30):  # disarmed and restored after the blocks
        rc.spin(0.05)


def test_many_tiny_limits_leave_none_open():
    """Limits firing at every point of a block's life (0.2 ms each, some just past the end):
    none stays open (the old bookkeeping leaked about 1 in 5,000). The per-thread timer only:
    ITIMER_PROF's resolution is coarser than these blocks."""
    from r1fast.rewards.cpu_limit import limit_active

    fired = 0
    for i in range(10_000):
        try:
            with cpu_time_limit(2e-4):
                rc.spin(1.9e-4 + (i % 7) * 1e-5)
        except CpuTimeExceeded:
            fired += 1
        assert not limit_active(), f"a limit left open after block {i}"
    assert fired > 0


def test_an_outer_limit_firing_inside_an_inner_exit_closes_both():
    from r1fast.rewards.cpu_limit import limit_active

    with pytest.raises(CpuTimeExceeded) as e:
        with cpu_time_limit(0.05) as outer:
            inner = cpu_time_limit(30)
            inner.__enter__()  # its __exit__ never runs: the outer limit fires first
            rc.spin()
    assert e.value.token is outer and not limit_active()


def test_a_limit_names_its_token_before_the_block_and_calls_never_leak_it():
    """``as token`` is bound only after ``__enter__`` returns; a limit that fired inside it
    was taken for an outer one and escaped bounded_call. The token is readable first."""
    from r1fast.rewards.workers import bounded_call

    limit = cpu_time_limit(30)
    with limit as token:
        assert token is limit.token is not None
    assert cpu_time_limit(None).token is None  # the no-op limit
    seen = {bounded_call(rc.spin, (1.9e-4 + (i % 7) * 1e-5,), 2e-4).status for i in range(3000)}
    assert seen <= {"ok", "timeout"} and "timeout" in seen, seen


class _SlowFinalizer:
    def __del__(self):  # Python work in a finalizer: an exception raised here is discarded
        rc.spin(2e-5)


def _work_making_cyclic_garbage(cpu_s: float) -> None:
    """Plain work with some cyclic garbage, for ``cpu_s`` CPU seconds: gc runs the finalizers
    at some allocation (a third of the time goes to them)."""
    t0 = time.thread_time()
    while time.thread_time() - t0 < cpu_s:
        for _ in range(50):
            a = _SlowFinalizer()
            a.self = a
        rc.spin(2e-3)


def test_a_limit_whose_raise_a_finalizer_swallowed_fires_again():
    """The handler runs in whatever Python code runs, also a finalizer or a gc callback
    (hypothesis installs one), where Python discards the raise: the block then ran unbounded
    (CI: a 5 ms math check scored correct; helper-45 saw 14 of 1,500 with hypothesis's)."""
    import sys

    swallowed, hook = [], sys.unraisablehook
    sys.unraisablehook = lambda u: swallowed.append(type(u.exc_value))
    try:
        for _ in range(30):
            with pytest.raises(CpuTimeExceeded):
                with cpu_time_limit(0.005):
                    _work_making_cyclic_garbage(0.5)
    finally:
        sys.unraisablehook = hook
    assert CpuTimeExceeded in swallowed  # the case happened (about 1 in 3), yet every block ended


@contextlib.contextmanager
def _limited(seconds):
    with cpu_time_limit(seconds) as token:  # opened in a generator frame, suspended at yield
        yield token


def test_a_limit_opened_in_another_frame_still_fires():
    """A limit opened by a contextmanager (its frame suspended) or by ExitStack (its frame
    returned) was dropped without a raise by the first version of the retry (helper-47):
    the block ran its 0.5 s unbounded."""
    from r1fast.rewards.cpu_limit import limit_active

    for how in ("contextmanager", "exit stack"):
        t0 = time.thread_time()
        with pytest.raises(CpuTimeExceeded):
            with contextlib.ExitStack() as stack:
                stack.enter_context(_limited(0.05) if how == "contextmanager"
                                    else cpu_time_limit(0.05))
                rc.spin(0.5)
        assert time.thread_time() - t0 < 0.3, how
        assert not limit_active()


class _HashInFinalizer:
    def __del__(self):  # C work in a finalizer: the limit fires here and the raise is discarded
        import hashlib

        hashlib.pbkdf2_hmac("sha256", b"x", b"s", 300_000)


def test_a_block_that_ends_after_a_swallowed_raise_still_times_out():
    """The block returned within the retry interval after a finalizer swallowed the raise:
    bounded_call said "ok" past the limit (helper-47: 0.068 s of CPU under a 0.01 s limit)."""
    import sys

    from r1fast.rewards.workers import bounded_call

    def check():
        d = _HashInFinalizer()
        del d
        return 1.0

    hook, sys.unraisablehook = sys.unraisablehook, lambda u: None
    try:
        assert bounded_call(check, (), 0.01).status == "timeout"
    finally:
        sys.unraisablehook = hook
