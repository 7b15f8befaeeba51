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
suite); the slow run makes 12 (~20 s).
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
from tests.helpers.ckpt_writer import SHAPE

pytestmark = pytest.mark.reliability

WRITER = str(Path(__file__).resolve().parents[1] / "helpers" / "ckpt_writer.py")


@pytest.mark.parametrize("trials", [3, pytest.param(12, marks=pytest.mark.slow)])
def test_random_kill_minus_9_never_loses_the_committed_checkpoint(tmp_path, trials):
    rng = random.Random(16)
    root = tmp_path / "ckpt"
    save_checkpoint(root, 0, {"w": torch.full(SHAPE, 0.0), "step": 0}, {"data": 0})
    committed = 0
    for trial in range(trials):
        proc = subprocess.Popen([sys.executable, WRITER, str(root), str(committed)],
                                stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        # poll, not select: late in the full suite this process holds > 1024 descriptors,
        # beyond what select() accepts
        poller = select.poll()
        poller.register(proc.stdout, select.POLLIN)
        if not poller.poll(120_000):  # never hang the suite
            proc.kill()
            proc.wait(10)
            pytest.fail(f"trial {trial}: the writer did not save within 120 s")
        first = proc.stdout.readline()  # it is saving; kill it at a random later moment
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        reported = [int(x) for x in [first, *out.split()] if x.strip()]
        path = latest_checkpoint(root)
        assert path is not None, f"trial {trial}: no checkpoint after the kill"
        state, meta = load_checkpoint(path)  # verifies the sha256 of the rank file
        assert meta["step"] == state["step"] == meta["data"] >= reported[-1]
        assert torch.equal(state["w"], torch.full(SHAPE, float(meta["step"])))
        for i in range(2):  # the shared files (verified by load_checkpoint) are this step's
            part = torch.load(path / "policy" / f"part_{i}.pt", weights_only=True)
            assert torch.equal(part, torch.full(SHAPE, float(meta["step"] + i)))
        committed = meta["step"]
    # a save after all that debris commits and is the latest
    save_checkpoint(root, committed + 1, {"w": torch.ones(1), "step": committed + 1}, {})
    assert latest_checkpoint(root).name == f"step_{committed + 1:08d}"
    assert not list(root.glob(".tmp_step_*"))
