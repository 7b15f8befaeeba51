"""kill -9 at random moments of back-to-back checkpoint saves: every time, the newest committed
checkpoint (at least the last one the writer reported) loads with valid checksums, and the next
save over the debris commits."""
import multiprocessing as mp
import os
import random
import signal
import time

import pytest
import torch

from r1fast.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.reliability


def _writer(root, step, conn):
    """Saves steps step+1, step+2, ... forever, reporting each committed step."""
    torch.set_num_threads(1)
    while True:
        step += 1
        state = {"w": torch.full((512, 1024), float(step)), "step": step}
        save_checkpoint(root, step, state, {"data": step}, keep_last=2)
        conn.send(step)


def test_random_kill_minus_9_never_loses_the_committed_checkpoint(tmp_path):
    rng = random.Random(16)
    ctx = mp.get_context("fork")  # torch is already imported here: a trial costs no import
    root = tmp_path / "ckpt"
    save_checkpoint(root, 0, {"w": torch.full((512, 1024), 0.0), "step": 0}, {"data": 0})
    committed = 0
    for trial in range(8):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_writer, args=(root, committed, send))
        proc.start()
        send.close()
        reported = [recv.recv()]  # it is saving; kill it at a random moment of a later save
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        while recv.poll():
            try:
                reported.append(recv.recv())
            except EOFError:
                break
        path = latest_checkpoint(root)
        assert path is not None, f"trial {trial}: no checkpoint after the kill"
        state, meta = load_checkpoint(path)  # verifies the sha256 of the rank file
        assert meta["step"] == state["step"] == meta["data"] >= reported[-1]
        assert torch.equal(state["w"], torch.full((512, 1024), float(meta["step"])))
        committed = meta["step"]
    # a save after all that debris commits and is the latest
    save_checkpoint(root, committed + 1, {"w": torch.ones(1), "step": committed + 1}, {})
    assert latest_checkpoint(root).name == f"step_{committed + 1:08d}"
    assert not list(root.glob(".tmp_step_*"))
