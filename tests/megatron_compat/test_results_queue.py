"""Processes a run leaves behind when it is stopped: megatron's checkpoint-writer Manager dies
with a run killed by SIGKILL (r1fast.megatron_compat.results_queue), and SIGTERM ends the CLI
through its exit handlers (r1fast.cli.exit_on_sigterm). helper-78: a single-process run killed
after its first checkpoint left a ~270 MB server under init that held the terminal's output."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SAVER = """
import sys
from megatron.core.dist_checkpointing.strategies import filesystem_async
from r1fast.megatron_compat import results_queue
results_queue.install()
queue = filesystem_async._get_write_results_queue()  # what megatron's writer takes
print(queue._manager._process.pid, flush=True)
sys.stdin.read()  # until killed
"""


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_the_writer_manager_dies_with_a_killed_run():
    proc = subprocess.Popen([sys.executable, "-c", SAVER], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    server = int(proc.stdout.readline())
    assert _alive(server)
    proc.kill()
    proc.wait(30)
    deadline = time.monotonic() + 20
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(server):  # the old behaviour: clean up, then fail
        os.kill(server, signal.SIGKILL)
        pytest.fail(f"megatron's results-queue server {server} outlived its killed parent")


@pytest.mark.parametrize("world", [1, 2])
def test_sigterm_runs_the_exit_handlers_of_a_single_process(tmp_path, world):
    """One process: SIGTERM raises SystemExit(143), so finally blocks run. Under torchrun the
    default action stays: a rank blocked in a collective runs no Python handler, and would
    outlive the signal until the collective's timeout (helper-79)."""
    marker = tmp_path / "finally"
    script = ("import time\nfrom r1fast.cli import exit_on_sigterm\nexit_on_sigterm()\n"
              f"try:\n    print('ready', flush=True)\n    time.sleep(60)\n"
              f"finally:\n    open({str(marker)!r}, 'w').close()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, WORLD_SIZE=str(world)))
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    if world == 1:
        assert proc.wait(30) == 128 + signal.SIGTERM and marker.exists()
    else:
        assert proc.wait(30) == -signal.SIGTERM and not marker.exists()
