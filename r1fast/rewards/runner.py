"""Scoring a batch of completions: every part, isolated, with timeouts, never crashing.

The trainer hands :class:`RewardRunner` a list of completions and their examples and gets back
the weighted total per completion plus the raw score of every reward part. Where a part runs:

- ``batched`` parts (a reward model: ``score_batch``) run in this process, a batch at a time;
- ``mode="auto"`` (default): parts marked ``sandbox = True`` (math accuracy) and plain callables
  without the attribute (unknown code) run in a :class:`~r1fast.rewards.workers.WorkerPool`,
  one call per completion, each with a CPU-time limit (``cpu_time_s``: seconds of CPU, so a
  verdict does not depend on machine load) and a hard wall-clock ``timeout_s`` enforced by
  killing the worker's whole process group;
  parts marked ``sandbox = False`` (countdown, format, language: bounded and linear) run
  in-process, which is much faster;
- ``mode="process"``: every non-batched part in workers; ``mode="inline"``: everything
  in-process (fast, for tests and trusted rewards): the same CPU-time limit on the main
  thread, but no hard wall-clock kill (C code that never returns to Python is not bounded).

A call that raises, returns a non-number or a non-finite value, times out, or kills its worker
scores 0.0 for that part; the failure is counted (see :meth:`RewardRunner.metrics`) and logged
as a warning (the first ``log_failures`` per part and kind), and the batch goes on.
"""
from __future__ import annotations

import logging
import pickle
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Sequence

from r1fast.rewards.compose import CompositeReward, RewardPart, reward_name
from r1fast.rewards.workers import TaskOutcome, WorkerPool, bounded_call, scored
from r1fast.checks import check_choice, check_range

logger = logging.getLogger("r1fast.rewards")

_FAILURES = ("error", "timeout", "crash")
_METRIC = {"ok": "ok", "error": "errors", "timeout": "timeouts", "crash": "crashes"}
_NO_PRELOAD = ("__main__", "__mp_main__", "builtins")


@dataclass(frozen=True)
class RunnerConfig:
    """Where and how reward parts are evaluated."""

    mode: str = "auto"
    """"auto" | "process" | "inline" (see the module docstring)."""
    num_workers: int = 2
    """Worker processes for sandboxed parts."""
    timeout_s: float = 5.0
    """Hard wall-clock limit per call in a worker, in seconds (the worker is killed): the outer
    bound; what decides a verdict is ``cpu_time_s``."""
    cpu_time_s: float | None = None
    """CPU-time limit per call, in seconds of the scoring process's CPU (load-independent),
    the same in worker and inline mode (main thread); an exceeded call is a "timeout".
    None: half of ``timeout_s`` (CPU time never runs ahead of the wall clock, so a CPU limit
    equal to ``timeout_s`` would never be the one that ends a call)."""
    start_method: str = "spawn"
    """multiprocessing start method of the workers; spawn inherits no threads or CUDA state."""
    memory_limit_mb: int | None = 4096
    """Address-space limit per worker (None: unlimited)."""
    max_tasks_per_worker: int | None = 10_000
    """Recycle a worker after this many calls (None: never)."""
    startup_timeout_s: float = 120.0
    """A worker that is not ready after this long is a setup error (RuntimeError)."""
    log_failures: int = 20
    """Warnings logged per (part, failure kind); later failures are only counted."""

    def __post_init__(self):
        check_choice("mode", self.mode, ("auto", "process", "inline"))
        check_range("num_workers", self.num_workers, 1)
        check_range("timeout_s", self.timeout_s, 0, lo_open=True)
        if self.cpu_time_s is not None:
            check_range("cpu_time_s", self.cpu_time_s, 0, lo_open=True)
        check_range("log_failures", self.log_failures, 0)


@dataclass
class RewardOutput:
    """Scores of one batch."""

    total: list[float]
    """Weighted total per completion."""
    parts: dict[str, list[float]]
    """Raw (unweighted) score per part name, per completion; 0.0 where the call failed."""
    status: dict[str, list[str]] = field(default_factory=dict)
    """Per part, per completion: "ok", "error", "timeout", "crash" (or "skipped": computed by
    a model-parallel peer, ``RewardRunner.__call__(local_parts=False)``)."""


def _module_of(fn: object) -> str | None:
    mod = getattr(fn, "__module__", None) or type(fn).__module__
    return mod if isinstance(mod, str) and mod not in _NO_PRELOAD else None


class RewardRunner:
    """Evaluates ``reward`` (a callable, a :class:`CompositeReward`, or a list of
    ``(fn, weight)`` / ``(name, fn, weight)``) over batches. Use as a context manager or call
    :meth:`close` to stop its workers."""

    def __init__(self, reward: object, config: RunnerConfig | None = None, **overrides):
        base = config or RunnerConfig()
        self.config = replace(base, **overrides) if overrides else base
        if isinstance(reward, CompositeReward):
            self.composite = reward
        elif isinstance(reward, (list, tuple)):
            self.composite = CompositeReward(list(reward))
        elif callable(reward):
            self.composite = CompositeReward([(reward_name(reward), reward, 1.0)])
        else:
            raise ValueError(f"reward must be a callable, a CompositeReward or a list of (fn, weight), "
                             f"got {type(reward).__name__}")
        self._worker_parts = [p for p in self.composite.parts if self._where(p) == "worker"]
        for p in self._worker_parts:
            try:
                pickle.dumps(p.fn)
            except Exception as exc:  # a setup error: every call of this part would fail
                raise ValueError(f"reward part {p.name!r} runs in worker processes and must be picklable "
                                 f"(a module-level function or class instance); mark it sandbox = False "
                                 f"or use mode='inline' ({type(exc).__name__}: {exc})") from exc
        self._pool: WorkerPool | None = None
        self._counts: Counter[str] = Counter()
        self._logged: Counter[tuple[str, str]] = Counter()
        self._last_means: dict[str, float] = {}
        self._closed_restarts = 0  # restarts of pools already closed, kept for metrics

    def _where(self, part: RewardPart) -> str:
        fn = part.fn
        if getattr(fn, "batched", False) and callable(getattr(fn, "score_batch", None)):
            return "batched"
        mode = self.config.mode
        if mode == "inline" or (mode == "auto" and not getattr(fn, "sandbox", True)):
            return "inline"
        return "worker"

    @property
    def placement(self) -> dict[str, str]:
        """Where each part runs: "inline", "worker" or "batched"."""
        return {p.name: self._where(p) for p in self.composite.parts}

    @property
    def pool(self) -> WorkerPool:
        """The worker pool (created on first use)."""
        if self._pool is None:
            preload: list[str] = []
            for p in self._worker_parts:
                mod = _module_of(p.fn)
                if mod:
                    preload.append(mod)
                preload.extend(getattr(p.fn, "preload_modules", ()))
            cfg = self.config
            self._pool = WorkerPool(cfg.num_workers, start_method=cfg.start_method,
                                    memory_limit_mb=cfg.memory_limit_mb, preload=preload,
                                    max_tasks_per_worker=cfg.max_tasks_per_worker,
                                    startup_timeout_s=cfg.startup_timeout_s,
                                    cpu_limit_s=self._cpu_limit_s,
                                    startup_check=pickle.dumps([p.fn for p in self._worker_parts]))
        return self._pool

    def start(self) -> None:
        """Start the workers now rather than on the first batch (no-op without worker parts)."""
        if self._worker_parts:
            self.pool.start()

    def close(self) -> None:
        if self._pool is not None:
            self._closed_restarts += self._pool.restarts
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "RewardRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- evaluation ------------------------------------------------------------------------
    def _record(self, part: str, outcome: TaskOutcome) -> float:
        if outcome.status == "skipped":  # a model-parallel peer computes it: not counted here
            return 0.0
        key = _METRIC[outcome.status]
        self._counts[key] += 1
        self._counts[f"{part}/{key}"] += 1
        if outcome.status in _FAILURES:
            n = self._logged[(part, outcome.status)]
            if n < self.config.log_failures:
                logger.warning("reward %r %s (scored 0.0): %s", part, outcome.status, outcome.message)
            elif n == self.config.log_failures:
                logger.warning("reward %r: further %s failures are counted but not logged", part, outcome.status)
            self._logged[(part, outcome.status)] += 1
            return 0.0
        return outcome.value

    @property
    def _cpu_limit_s(self) -> float:
        cfg = self.config
        return cfg.timeout_s / 2 if cfg.cpu_time_s is None else cfg.cpu_time_s

    def _inline(self, fn, completions, examples) -> list[TaskOutcome]:
        # the same CPU limit and verdicts as in a worker
        return [bounded_call(fn, (c, e), self._cpu_limit_s) for c, e in zip(completions, examples)]

    def _batched(self, fn, completions, examples) -> list[TaskOutcome]:
        try:
            values = list(fn.score_batch(list(completions), list(examples)))
        except Exception as exc:  # the whole batch failed: every item scored 0, counted
            return [TaskOutcome("error", 0.0, f"{type(exc).__name__}: {exc}"[:500])] * len(completions)
        if len(values) != len(completions):
            msg = f"score_batch returned {len(values)} scores for {len(completions)} completions"
            return [TaskOutcome("error", 0.0, msg)] * len(completions)
        return [scored(v) for v in values]

    def __call__(self, completions: Sequence[str], examples: Sequence[dict], *,
                 local_parts: bool = True) -> RewardOutput:
        """Score ``completions[i]`` against ``examples[i]`` with every part.
        ``local_parts=False``: the parts one process computes alone (inline and worker parts)
        give 0.0 with status "skipped", uncounted: for a rank whose model-parallel peer computes
        them and broadcasts them (:func:`r1fast.train.batch.model_parallel_agreed`). Batched
        parts still run: a reward model's forward and its syncs are collective."""
        if isinstance(completions, str) or not isinstance(completions, Sequence):
            raise ValueError("completions must be a sequence of str")
        if not isinstance(examples, Sequence):
            raise ValueError("examples must be a sequence of dict")
        if len(completions) != len(examples):
            raise ValueError(f"completions and examples must have the same length, got "
                             f"{len(completions)} and {len(examples)}")
        for i, c in enumerate(completions):
            if not isinstance(c, str):
                raise ValueError(f"completions[{i}] must be a str, got {type(c).__name__}")
        for i, e in enumerate(examples):
            if not isinstance(e, dict):
                raise ValueError(f"examples[{i}] must be a dict, got {type(e).__name__}")
        n = len(completions)
        outcomes: dict[str, list[TaskOutcome]] = {}
        for part in self.composite.parts:
            where = self._where(part)
            if where == "batched":
                outcomes[part.name] = self._batched(part.fn, completions, examples)
            elif not local_parts:
                outcomes[part.name] = [TaskOutcome("skipped")] * n
            elif where == "inline":
                outcomes[part.name] = self._inline(part.fn, completions, examples)
        worker_parts = self._worker_parts if local_parts else []
        if worker_parts and n:
            # All sandboxed parts of the batch in one pool run, so they share the workers.
            tasks = [(p.fn, (c, e)) for p in worker_parts for c, e in zip(completions, examples)]
            flat = self.pool.run(tasks, self.config.timeout_s)
            for k, p in enumerate(worker_parts):
                outcomes[p.name] = flat[k * n:(k + 1) * n]
        elif worker_parts:
            for p in worker_parts:
                outcomes[p.name] = []
        parts: dict[str, list[float]] = {}
        status: dict[str, list[str]] = {}
        for part in self.composite.parts:
            parts[part.name] = [self._record(part.name, o) for o in outcomes[part.name]]
            status[part.name] = [o.status for o in outcomes[part.name]]
        self._counts["calls"] += sum(o.status != "skipped" for v in outcomes.values() for o in v)
        self._counts["batches"] += 1
        total = [self.composite.combine({k: v[i] for k, v in parts.items()}) for i in range(n)]
        self._last_means = {k: (sum(v) / n if n else 0.0) for k, v in parts.items()}
        self._last_means["total"] = sum(total) / n if n else 0.0
        return RewardOutput(total=total, parts=parts, status=status)

    # -- metrics ---------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Cumulative counts (``rewards/calls``, ``rewards/ok``, ``rewards/errors``,
        ``rewards/timeouts``, ``rewards/crashes``, ``rewards/worker_restarts``, and per part
        ``rewards/<part>/<kind>``) plus last-batch means ``rewards/<part>/mean``."""
        out = {"rewards/" + k: float(v) for k, v in self._counts.items()}
        for key in ("calls", "batches", "ok", "errors", "timeouts", "crashes"):
            out.setdefault("rewards/" + key, 0.0)
        live = self._pool.restarts if self._pool is not None else 0
        out["rewards/worker_restarts"] = float(self._closed_restarts + live)
        for k, v in self._last_means.items():
            out[f"rewards/{k}/mean"] = v
        return out

    def reset_metrics(self) -> None:
        """Zero all counters (e.g. at the start of a logging interval)."""
        self._counts.clear()
        self._logged.clear()
        self._closed_restarts = 0
        if self._pool is not None:
            self._pool.restarts = 0
