"""kill -9 at random moments of back-to-back checkpoint saves: every time, the newest committed
checkpoint (at least the last one the writer reported) loads with valid checksums, and the next
save over the debris commits.

Each trial starts a fresh writer process (tests/helpers/ckpt_writer.py) that saves steps back to
back (keep_last=2; two 1 MiB "shared" files stand in for the distributed model/optimizer files,
plus its rank file and meta.json) and SIGKILLs it a seeded random 0-0.3 s after it reported its
first committed save, so the kill lands somewhere in a later save: writing a file, hashing,
the rename, the ``latest`` pointer, keep_last's deletion. After each kill the newest checkpoint
must load with every checksum verified and hold the content of its step; the next trial's writer
starts over the debris. The default run makes 3 kills (~5 s: a fresh interpreter per trial costs
about a second; the first version made 8 in forked children, which could hang in the full
suite); the slow run makes 12 (~20 s). The same with two gloo writer ranks (file rendezvous),
each rank killed in turn and the other torn down a moment later: whatever either rank was
doing, the newest committed checkpoint holds both ranks' files of one step.
"""
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from r1fast.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tests.helpers.ckpt_writer import SHAPE, part_value

pytestmark = pytest.mark.reliability

WRITER = str(Path(__file__).resolve().parents[1] / "helpers" / "ckpt_writer.py")


def _start_writers(root: Path, committed: int, world: int, init: Path) -> list:
    args = [[]] if world == 1 else [[str(r), str(world), str(init)] for r in range(world)]
    return [subprocess.Popen([sys.executable, WRITER, str(root), str(committed), *a],
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}) for a in args]


def _kill_all(procs: list, victim: int, rng: random.Random) -> str:
    """SIGKILL ``procs[victim]``; the others are blocked in the save's next collective (or
    still writing): they get SIGKILL a moment later, as a launcher tears a job down. Returns
    rank 0's output after its first line."""
    procs[victim].send_signal(signal.SIGKILL)
    time.sleep(rng.uniform(0.0, 0.2))
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    outs = [proc.communicate(timeout=30)[0] for proc in procs]
    return outs[0]


def _check_latest(root: Path, reported: int, trial: int) -> int:
    """The newest checkpoint loads with every checksum verified (all ranks' files) and every
    file holds its step; returns that step."""
    path = latest_checkpoint(root)
    assert path is not None, f"trial {trial}: no checkpoint after the kill"
    state, meta = load_checkpoint(path)  # verifies the sha256 of every file meta.json lists
    step, world = meta["step"], meta["world_size"]
    assert step == meta["data"] >= reported
    # this (one-process) reader gets rank 0's state from the loader when one rank wrote it
    assert (state is None) == (world != 1)
    for rank in range(world):
        rank_state = state if state is not None else torch.load(
            path / f"rank_{rank:05d}.pt", weights_only=True)
        assert rank_state["step"] == step
        assert torch.equal(rank_state["w"], torch.full(SHAPE, part_value(step, rank, -1)))
        for i in range(2):  # the shared files (verified by load_checkpoint) are this step's
            part = torch.load(path / "policy" / f"rank{rank}_part{i}.pt", weights_only=True)
            assert torch.equal(part, torch.full(SHAPE, part_value(step, rank, i)))
    return step


@pytest.mark.parametrize("world, trials", [
    (1, 3), pytest.param(2, 3, marks=pytest.mark.multiproc),
    pytest.param(1, 12, marks=pytest.mark.slow),
    pytest.param(2, 12, marks=[pytest.mark.slow, pytest.mark.multiproc])])
def test_random_kill_minus_9_never_loses_the_committed_checkpoint(tmp_path, world, trials):
    """``world`` = 2: two gloo ranks write each checkpoint (rank files, shared parts); each
    rank is killed in turn, so the kill may land in either rank's writes, in a collective, or
    in rank 0's commit."""
    rng = random.Random(16 + world)
    root = tmp_path / "ckpt"
    save_checkpoint(root, 0, {"w": torch.full(SHAPE, part_value(0, 0, -1)), "step": 0},
                    {"data": 0})
    committed = 0
    for trial in range(trials):
        procs = _start_writers(root, committed, world, tmp_path / f"rendezvous_{trial}")
        # poll, not select: late in the full suite this process holds > 1024 descriptors,
        # beyond what select() accepts
        poller = select.poll()
        poller.register(procs[0].stdout, select.POLLIN)
        if not poller.poll(120_000):  # never hang the suite
            for proc in procs:
                proc.kill()
                proc.wait(10)
            pytest.fail(f"trial {trial}: the writers did not save within 120 s")
        first = procs[0].stdout.readline()  # saving; kill at a random later moment
        time.sleep(rng.uniform(0.0, 0.3))
        out = _kill_all(procs, trial % world, rng)  # each rank is the victim in turn
        reported = [int(x) for x in [first, *out.split()] if x.strip()]
        committed = _check_latest(root, reported[-1], trial)
    # a save after all that debris commits and is the latest
    save_checkpoint(root, committed + 1, {"w": torch.ones(1), "step": committed + 1}, {})
    assert latest_checkpoint(root).name == f"step_{committed + 1:08d}"
    assert not list(root.glob(".tmp_step_*"))
