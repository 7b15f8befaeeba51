"""``python -m r1fast.policy --preset ...``: the one-line smoke command builds a tiny policy on
this machine and prints its parameter count and a log-probability."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cli_tiny_moe():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "r1fast.policy", "--preset", "tiny-moe",
                           "--length", "8"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "parameters: 157,056" in out
    m = re.search(r"log-prob of a random 8-token sequence: (-?\d+\.\d+)", out)
    assert m and -7 * 20 < float(m.group(1)) < 0


def test_main_in_process_dense(capsys):
    from r1fast.policy.__main__ import main

    assert main(["--preset", "tiny-dense", "--length", "4"]) == 0
    out = capsys.readouterr().out
    assert "(dense)" in out and "parameters:" in out
    assert not torch.distributed.is_initialized()  # main() cleans up after itself
