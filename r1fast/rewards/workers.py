"""A pool of killable worker processes with a hard timeout per call.

Rewards run code on text a policy wrote. Some of it can take unbounded time in places no
signal reaches (sympy simplifying a hostile expression, a big-integer power in C), so the only
reliable bound is a separate process that is killed when its time is up. The standard library
pools do not do this: ``ProcessPoolExecutor`` cannot cancel a running call, and killing one of
its processes breaks the whole pool. :class:`WorkerPool` is small and does exactly this:

- each worker is a ``spawn``-ed process (no inherited threads or CUDA state) connected by a
  pipe; it imports its ``preload`` entries (``"module"``, or ``"module:function"`` to also call
  a no-argument warm-up once, so first-call costs never eat a task's time limit), reports
  ready, then serves ``(task id, pickled (fn, args))`` messages, answering
  ``(task id, "ok", float)`` or ``(task id, "error", text)``;
- :meth:`WorkerPool.run` hands tasks to idle workers and waits on their pipes and process
  sentinels with a deadline per task; a worker past its deadline is SIGKILLed and replaced, a
  worker that dies (segfault, out-of-memory kill) is replaced, and either way the task gets an
  outcome instead of an exception;
- a worker may carry an address-space limit (``memory_limit_mb``) so a reward that tries to
  build a gigantic number fails with MemoryError inside the worker, and workers are recycled
  after ``max_tasks_per_worker`` calls (sympy's caches grow);
- a call may carry a CPU-time limit (``cpu_limit_s``):
  :func:`r1fast.rewards.cpu_limit.cpu_time_limit` (the calling thread's CPU seconds, so the
  verdict depends neither on how busy the machine is nor on other threads of the process) plus
  ``RLIMIT_CPU`` as a backstop for C code that never returns to Python (the kernel's SIGXCPU
  ends the worker; reported as a timeout). The wall-clock kill stays the outer bound;
- each worker leads its own session (process group): a killed worker's children (a reward
  that started a subprocess) are killed with it (``os.killpg``).

Failures of the pool itself (a worker that cannot start or import its modules) raise
RuntimeError: those are setup errors that would otherwise silently zero every reward.
Not thread-safe: use one pool from one thread.
"""
from __future__ import annotations

import importlib
import math
import multiprocessing as mp
import os
import pickle
import signal
import time
import weakref
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait as _wait
from typing import Any, Callable, Sequence

from r1fast.rewards.cpu_limit import CpuTimeExceeded, cpu_time_limit
from r1fast.checks import check_choice, check_range, one_line


@dataclass(frozen=True)
class TaskOutcome:
    """What happened to one call."""

    status: str
    """"ok", "error" (raised or returned a non-finite/non-number), "timeout", "crash", or
    "skipped" (not computed in this process: :class:`~r1fast.rewards.runner.RewardRunner`)."""
    value: float = 0.0
    """The returned value when ok, else 0.0."""
    message: str = ""
    """Error text for failures."""


def scored(value: object) -> TaskOutcome:
    """A reward's return value as an outcome: "ok" with a finite float, else "error" (a
    non-number, or a NaN that would compare as neither right nor wrong)."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return TaskOutcome("error", 0.0, f"returned {type(value).__name__} {value!r:.100}, "
                                         f"not a number")
    if not math.isfinite(v):
        return TaskOutcome("error", 0.0, f"returned a non-finite value {v}")
    return TaskOutcome("ok", v)


def bounded_call(fn: Callable[..., Any], args: tuple, cpu_limit_s: float | None) -> TaskOutcome:
    """``fn(*args)`` under ``cpu_limit_s`` seconds of this thread's CPU (None or 0: no limit):
    the one rule for a reward or checker call, in a worker, in the runner's inline mode and in
    the pipeline's answer checks. One bad call must not end a run that may have sampled for
    hours: a raise is "error" (with its text), the limit is "timeout"."""
    limit = cpu_time_limit(cpu_limit_s)
    try:
        with limit:
            return scored(fn(*args))  # float() of a returned sympy object is bounded too
    except CpuTimeExceeded as exc:
        if exc.token is not limit.token:  # an outer limit fired: not ours to decide
            raise
        return TaskOutcome("timeout", 0.0, f"call {exc}")
    except (Exception, SystemExit) as exc:  # sys.exit() in a reward must not end the run
        return TaskOutcome("error", 0.0, one_line(exc, 500))


def _set_cpu_backstop(cpu_limit_s: float | None) -> None:
    """RLIMIT_CPU soft limit at (CPU used + the call's limit + 2 s): when C code ignores
    SIGPROF, the kernel's SIGXCPU ends the worker on CPU time, not wall time."""
    if not cpu_limit_s:
        return
    import resource

    used = time.process_time()
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    want = int(math.ceil(used + cpu_limit_s + 2.0))
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (want, hard))


def _worker_main(conn, memory_limit_mb: int | None, preload: tuple[str, ...],
                 cpu_limit_s: float | None = None, startup_check: bytes | None = None) -> None:
    """Worker process body (module-level so that spawn can import it). ``startup_check``:
    pickled objects unpickled before "ready" (the rewards it will run)."""
    os.setsid()  # its own session and process group: a kill takes its children too
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which kills us
    if memory_limit_mb:
        import resource
        limit = int(memory_limit_mb) * 1024 * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        for name in preload:
            module, _, warm_up = name.partition(":")
            mod = importlib.import_module(module)
            if warm_up:
                getattr(mod, warm_up)()
        if startup_check is not None:
            pickle.loads(startup_check)
    except Exception as exc:  # reported to the parent, which raises a setup error
        conn.send(("init_error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", os.getpid()))
    me = os.getpid()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if msg is None:
            return
        task_id, payload = msg
        try:
            fn, args = pickle.loads(payload)
            _set_cpu_backstop(cpu_limit_s)
            out = bounded_call(fn, args, cpu_limit_s)
            reply = (task_id, out.status, out.value if out.status == "ok" else out.message)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # an unpicklable task, MemoryError: report, keep serving
            reply = (task_id, "error", f"{type(exc).__name__}: {exc}"[:500])
        if os.getpid() != me:  # a child the reward forked came back here: it must not serve
            os._exit(0)
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


class _Worker:
    def __init__(self, ctx, memory_limit_mb: int | None, preload: tuple[str, ...],
                 cpu_limit_s: float | None = None, startup_check: bytes | None = None):
        parent, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main,
                                args=(child, memory_limit_mb, preload, cpu_limit_s,
                                      startup_check),
                                daemon=True, name="r1fast-reward-worker")
        self.proc.start()
        child.close()
        self.conn = parent
        self.ready = False
        self.started_at = time.monotonic()
        self.task: int | None = None
        self.deadline = math.inf
        self.served = 0

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (it and any process a reward started),
        then the worker itself in case it died before it became a group leader."""
        pid = self.proc.pid
        if pid is not None:
            try:
                # setsid() done (always before "ready"): the group is the worker's own, never
                # ours, and it may outlive the worker (a reward's child process)
                if self.ready or os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass  # the worker has already exited and been reaped: nothing to kill
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        """Polite shutdown for an idle worker; kill if it does not exit promptly."""
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass  # already gone: kill() below reaps it
        self.proc.join(timeout=1)
        self.kill()


def _shutdown(workers: list[_Worker]) -> None:
    for w in workers:
        w.kill()
    workers.clear()


class WorkerPool:
    """``num_workers`` killable processes; :meth:`run` maps calls onto them with timeouts."""

    def __init__(self, num_workers: int = 2, *, start_method: str = "spawn",
                 memory_limit_mb: int | None = 4096, preload: Sequence[str] = (),
                 max_tasks_per_worker: int | None = 10_000, startup_timeout_s: float = 120.0,
                 cpu_limit_s: float | None = None, startup_check: bytes | None = None):
        check_range("num_workers", num_workers, 1)
        check_choice("start_method", start_method, mp.get_all_start_methods())
        if memory_limit_mb is not None:
            check_range("memory_limit_mb", memory_limit_mb, 64)
        if max_tasks_per_worker is not None:
            check_range("max_tasks_per_worker", max_tasks_per_worker, 1)
        check_range("startup_timeout_s", startup_timeout_s, 0, lo_open=True)
        if cpu_limit_s is not None:
            check_range("cpu_limit_s", cpu_limit_s, 0, lo_open=True)
        self.cpu_limit_s = cpu_limit_s
        """CPU seconds per call (None: only the wall-clock ``timeout_s`` of :meth:`run`)."""
        self.num_workers = int(num_workers)
        self._ctx = mp.get_context(start_method)
        self.memory_limit_mb = memory_limit_mb
        self.preload = tuple(dict.fromkeys(preload))
        self.startup_check = startup_check
        """Pickled objects each worker must unpickle before it is ready (e.g. the rewards it
        will run): one a spawned process cannot import fails the start, not every call."""
        self.max_tasks_per_worker = max_tasks_per_worker
        self.startup_timeout_s = float(startup_timeout_s)
        self.restarts = 0  # workers replaced after a kill or a crash
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    # -- worker lifecycle ------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        w = _Worker(self._ctx, self.memory_limit_mb, self.preload, self.cpu_limit_s,
                    self.startup_check)
        self._workers.append(w)
        return w

    def _replace(self, w: _Worker, counted: bool = True) -> None:
        w.kill()
        self._workers.remove(w)
        self.restarts += int(counted)
        self._spawn()

    def _on_startup_message(self, w: _Worker) -> None:
        try:
            kind, detail = w.conn.recv()
        except (EOFError, OSError):
            kind, detail = "init_error", f"exit code {w.proc.exitcode}"
        if kind != "ready":
            self.close()
            hint = ("; a reward defined in __main__ (a notebook, `python -c`, or under `if "
                    "__name__ == '__main__':`) cannot be imported by a spawned worker: define it "
                    "in a module, or mark it sandbox = False") \
                if "'__main__'" in detail or "'__mp_main__'" in detail else ""
            raise RuntimeError(f"reward worker failed to start (preload {list(self.preload)}): "
                               f"{detail}{hint}")
        w.ready = True

    def start(self) -> None:
        """Start all workers and wait until they are ready (otherwise done on first use)."""
        while len(self._workers) < self.num_workers:
            self._spawn()
        while any(not w.ready for w in self._workers):
            self._wait_step({})

    def close(self) -> None:
        """Stop all workers. The pool restarts them if used again."""
        workers, self._workers[:] = list(self._workers), []
        for w in workers:
            if w.ready and w.task is None and w.proc.is_alive():
                w.stop()
            else:
                w.kill()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- scheduling ------------------------------------------------------------------------
    def _wait_step(self, results: dict[int, TaskOutcome]) -> None:
        """Wait for one event (a reply, a death, a deadline, a worker ready) and handle it."""
        now = time.monotonic()
        deadlines = [w.deadline for w in self._workers if w.task is not None]
        deadlines += [w.started_at + self.startup_timeout_s for w in self._workers if not w.ready]
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        handles = [w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers]
        ready = set(_wait(handles, timeout=timeout))
        for w in list(self._workers):
            if w.conn in ready:
                if not w.ready:
                    self._on_startup_message(w)
                    continue
                try:
                    task_id, status, payload = w.conn.recv()
                except (EOFError, OSError):
                    self._fail(w, results, "crash", self._death(w))
                    continue
                if task_id != w.task:  # not the call it runs (a forked child's): ignored
                    continue
                results[task_id] = (TaskOutcome("ok", payload) if status == "ok" else
                                    TaskOutcome("timeout" if status == "timeout" else "error",
                                                0.0, str(payload)))
                w.task, w.deadline, w.served = None, math.inf, w.served + 1
                # a worker that ran out of memory keeps what leaked: a fresh one takes over
                exhausted = status == "error" and str(payload).startswith("MemoryError")
                if exhausted or (self.max_tasks_per_worker
                                 and w.served >= self.max_tasks_per_worker):
                    w.stop()
                    self._workers.remove(w)
                    self._spawn()
            elif w.proc.sentinel in ready:
                if not w.ready:
                    self._on_startup_message(w)
                else:
                    why = self._death(w)
                    cpu = w.proc.exitcode == -signal.SIGXCPU
                    self._fail(w, results, "timeout" if cpu else "crash",
                               "call exceeded its CPU-time limit (SIGXCPU); worker ended"
                               if cpu else why)
        now = time.monotonic()
        for w in list(self._workers):
            if w.task is not None and now >= w.deadline:
                self._fail(w, results, "timeout", "call exceeded its time limit; worker killed")
            elif not w.ready and now >= w.started_at + self.startup_timeout_s:
                self.close()
                raise RuntimeError(f"reward worker did not start within {self.startup_timeout_s} s")

    def _fail(self, w: _Worker, results: dict[int, TaskOutcome], status: str, message: str) -> None:
        if w.task is not None:
            results[w.task] = TaskOutcome(status, 0.0, message)
        self._replace(w)

    @staticmethod
    def _death(w: _Worker) -> str:
        w.proc.join(timeout=1)  # the pipe can close a moment before the exit code is known
        return f"worker died (exit code {w.proc.exitcode})"

    def run(self, tasks: Sequence[tuple[Callable[..., Any], tuple]], timeout_s: float) -> list[TaskOutcome]:
        """Run ``fn(*args)`` for each ``(fn, args)``; one :class:`TaskOutcome` per task, in order.

        Each call gets ``timeout_s`` seconds from the moment a ready worker receives it.
        """
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s}")
        results: dict[int, TaskOutcome] = {}
        pending: deque[int] = deque(range(len(tasks)))
        while len(self._workers) < self.num_workers:
            self._spawn()
        while len(results) < len(tasks):
            for w in list(self._workers):
                while pending and w.ready and w.task is None:
                    if not w.proc.is_alive():  # died while idle: replace, nothing was lost
                        self._replace(w)
                        break
                    task_id = pending.popleft()
                    try:
                        payload = pickle.dumps(tasks[task_id])
                    except Exception as exc:  # an unpicklable reward or example: that call fails
                        results[task_id] = TaskOutcome("error", 0.0, f"cannot send to a worker: {exc}"[:500])
                        continue
                    try:
                        w.conn.send((task_id, payload))
                    except (OSError, ValueError):  # pipe broke under us: retry on a fresh worker
                        pending.appendleft(task_id)
                        self._replace(w)
                        break
                    w.task, w.deadline = task_id, time.monotonic() + timeout_s
            # Wait only when something can happen: a call in flight or a worker starting.
            if len(results) < len(tasks) and any(w.task is not None or not w.ready for w in self._workers):
                self._wait_step(results)
        return [results[i] for i in range(len(tasks))]
