"""kill -9 at random points of a GRPO resume: the committed checkpoint survives every kill
byte for byte, and a final undisturbed resume ends exactly where an uninterrupted run ends.

The scene is the one a resume exists for: a tiny GRPO run (CPU) logged step 2 to metrics.jsonl
and expert_load.jsonl (plus a torn line) and died before step 2's checkpoint, so the run folder
holds the committed step-1 checkpoint and rows the resume must drop. A fork server
(tests/helpers/resume_killer.py) then starts resumes of it (asked for 2 steps) and SIGKILLs
them during start-up and resume: checkpoint lookup, model build, sha256 verification of every
file, the distributed model/optimizer load, RNG restore, the atomic truncation of both JSONL
files, and fit()'s start-up writes. The kill points are seeded and cover the whole window:

- at file-system boundaries: just before the k-th file operation on the run folder (k drawn
  in each of equal slices of the ~32 operations one recorded resume made), so early and late;
- after random delays drawn from the recorded resume's timing: anywhere in its window (~0.9 s
  after the imports), or in the middle of one of its writes (timed from that write's start).

After every kill: the checkpoints folder is unchanged byte for byte, ``latest_checkpoint``
still names step 1 and it loads with every checksum verified, and each JSONL file is either as
the crash left it or truncated to step 1, never torn or short of a committed row (the next
trial starts from the crash state again; other debris stays). Then an undisturbed resume in
this process runs step 2: metrics.jsonl (but wall-clock values), expert_load.jsonl and every
tensor of the step-2 checkpoint (weights, Adam state, RNG) equal the uninterrupted run's, bit
for bit. The default run makes 6 kills (~15 s); the slow one makes 24 (~30 s).

A non-atomic truncation (in place, with a sleep between emptying and writing) fails the
default run: a kill in the middle of the write leaves expert_load.jsonl empty.
"""
import hashlib
import json
import os
import random
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1fast.train.checkpoint import latest_checkpoint, load_checkpoint
from r1fast.train.metrics import read_jsonl
from tests.helpers.ckpt_state import assert_same, checkpoint_state
from tests.helpers.resume_killer import run_config, varied_reward

pytestmark = pytest.mark.reliability

KILLER = str(Path(__file__).resolve().parents[1] / "helpers" / "resume_killer.py")
TORN = '{"step": 3, "lo'  # the half-written line of a run killed while logging
STEPS = ["--run.steps=2"]


def _tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _wall_clock(key: str) -> bool:
    return key == "time" or key.startswith("time_") or key.endswith("_per_s")


class Killer:
    """The fork server as a subprocess: ``ask(request)`` -> its answer (bounded waits)."""

    def __init__(self, log: Path):
        self.log = open(log, "w")
        self.log_path = log
        self.proc = subprocess.Popen([sys.executable, KILLER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        # poll, not select: late in the full suite this process may hold > 1024 descriptors
        self.poller = select.poll()
        self.poller.register(self.proc.stdout, select.POLLIN)

    def answer(self, timeout_s: float = 120.0) -> dict:
        if not self.poller.poll(timeout_s * 1000):  # never hang the suite
            self.close()
            pytest.fail(f"the resume killer did not answer in {timeout_s} s:\n{self.stderr()}")
        line = self.proc.stdout.readline()
        if not line:
            pytest.fail(f"the resume killer died:\n{self.stderr()}")
        return json.loads(line)

    def ask(self, run_dir: Path, **request) -> dict:
        request = {"run_dir": str(run_dir), "overrides": STEPS, **request}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        got = self.answer()
        assert got["status"] in ("killed", "passed"), f"{request} -> {got}:\n{self.stderr()}"
        return got

    def stderr(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def _crashed_copy(full: Path, run: Path) -> dict[str, bytes]:
    """``run``: ``full`` as a crash after logging step 2, before its checkpoint, left it;
    returns the JSONL files' bytes in that state."""
    shutil.copytree(full, run)
    shutil.rmtree(run / "checkpoints" / "step_00000002")
    (run / "checkpoints" / "latest").write_text("step_00000001")
    (run / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text() + TORN)
    return {n: (run / n).read_bytes() for n in ("metrics.jsonl", "expert_load.jsonl")}


def _first_row(data: bytes) -> bytes:
    """What the resume's truncation to step 1 leaves of a JSONL file: its step-1 line."""
    line = data.split(b"\n")[0]
    assert json.loads(line)["step"] == 1
    return line + b"\n"


def _kill_plan(rec: dict, events: int, timers: int, rng: random.Random) -> list[dict]:
    """Seeded kill points over the recorded resume (``rec``: its file-system events, when
    each began, and the window's length).

    - ``events`` boundaries: just before the k-th event, k drawn in each of equal slices of
      the event list (early and late);
    - ``timers`` delays, in turn: anywhere in the window (start-up included); a random moment
      of the time the resume spent writing (an event that may change the folder, up to the
      next event), so a long write is hit more often; a random write event, at a random moment
      of it. The last two are timed from the child's start of that event, not of the window,
      so the model build's jitter does not move them."""
    n, ts = len(rec["events"]), rec["times"]
    plan = [{"mode": "event", "k": rng.randint(1 + i * n // events, (i + 1) * n // events)}
            for i in range(events)]
    spans = [(j + 1, (ts[j + 1] if j + 1 < n else rec["window_s"]) - ts[j])
             for j, e in enumerate(rec["events"]) if e.endswith(" w")]
    for i in range(timers):
        if i % 3 == 0:
            plan.append({"mode": "timer", "after_s": rng.uniform(0.0, rec["window_s"])})
            continue
        if i % 3 == 1:
            k, after = _moment_of(spans, rng.uniform(0.0, sum(d for _, d in spans)))
        else:
            k, d = rng.choice(spans)
            after = rng.uniform(0.0, d)
        plan.append({"mode": "timer", "k": k, "after_s": after})
    return plan


def _moment_of(spans: list[tuple[int, float]], at: float) -> tuple[int, float]:
    """``(k, offset)``: where moment ``at`` of the spans ``(k, duration)`` laid end to end
    falls."""
    for k, d in spans:
        if at <= d:
            return k, at
        at -= d
    return spans[-1]  # float rounding past the end: the end of the last span


def _check_after_kill(run: Path, committed: dict[str, str], crash: dict[str, bytes],
                      what: str) -> None:
    ckpts = run / "checkpoints"
    assert _tree(ckpts) == committed, f"{what}: the checkpoints folder changed"
    path = latest_checkpoint(ckpts)
    assert path is not None and path.name == "step_00000001", f"{what}: latest is {path}"
    _, meta = load_checkpoint(path)  # verifies meta.json's seal and every file's sha256
    assert meta["step"] == 1
    for name, data in crash.items():
        now = (run / name).read_bytes()
        assert now in (data, _first_row(data)), f"{what}: {name} is torn or lost rows: {now!r}"


@pytest.mark.parametrize("events, timers", [
    pytest.param(3, 3, id="6-kills"),
    pytest.param(10, 14, id="24-kills", marks=pytest.mark.slow)])
def test_kill_minus_9_during_resume_never_loses_the_checkpoint(tmp_path, events, timers):
    from r1fast.train.grpo import GRPOTrainer

    killer = Killer(tmp_path / "killer.log")  # imports megatron while the full run trains
    try:
        full, run = tmp_path / "full", tmp_path / "run"
        GRPOTrainer(run_config(full, [*STEPS, "--run.save_every=1"]), reward=varied_reward).fit()
        crash = _crashed_copy(full, run)
        committed = _tree(run / "checkpoints")
        ready = killer.answer()
        assert ready["status"] == "ready", ready
        shutil.copytree(run, tmp_path / "probe")
        rec = killer.ask(tmp_path / "probe", mode="record")
        for name, data in crash.items():  # it truncated both files: the window is real
            assert (tmp_path / "probe" / name).read_bytes() == _first_row(data), name
        plan = _kill_plan(rec, events, timers, random.Random(16))
        killed = []
        for trial, kill in enumerate(plan):
            for name, data in crash.items():  # the crash state again (debris elsewhere stays)
                (run / name).write_bytes(data)
            got = killer.ask(run, **kill)
            killed.append(got["status"] == "killed")
            _check_after_kill(run, committed, crash, f"trial {trial} {kill}")
    finally:
        killer.close()
    assert all(killed[:events]), killed  # a file-system kill point is always reached
    assert sum(killed) >= len(plan) - 1, killed  # a delay may outlast a fast window, once

    rows = GRPOTrainer(run_config(run, STEPS), reward=varied_reward).fit()  # undisturbed
    assert [r["step"] for r in rows] == [2]
    a, b = read_jsonl(full / "metrics.jsonl"), read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2]
    assert [{k: v for k, v in r.items() if not _wall_clock(k)} for r in a] == \
        [{k: v for k, v in r.items() if not _wall_clock(k)} for r in b]
    assert read_jsonl(full / "expert_load.jsonl") == read_jsonl(run / "expert_load.jsonl")
    for folder in ("f", "r"):
        (tmp_path / folder).mkdir()
    want = checkpoint_state(full / "checkpoints" / "step_00000002", tmp_path / "f")
    got = checkpoint_state(run / "checkpoints" / "step_00000002", tmp_path / "r")
    assert_same(want, got)
    step1 = checkpoint_state(run / "checkpoints" / "step_00000001", tmp_path / "r")["policy"]
    assert any(k.startswith("optimizer.") for k in want["policy"])  # Adam state compared
    assert any(not torch.equal(v, want["policy"][k]) for k, v in step1.items()
               if not k.startswith("optimizer.")), "step 2 changed no weight"
