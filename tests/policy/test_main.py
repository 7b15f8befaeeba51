"""``python -m r1fast.policy --preset ...``: the one-line smoke command builds a tiny policy on
this machine and prints its parameter count and a log-probability."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
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


@pytest.mark.parametrize("length,allowed", [("0", ">= 2"), ("-3", ">= 2"),
                                            ("513", "<= max_position_embeddings 512")])
def test_bad_length_is_a_one_line_error(capsys, length, allowed):
    from r1fast.policy.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--preset", "tiny-dense", "--length", length])
    assert exc.value.code == 2
    cap = capsys.readouterr()
    assert cap.out == "" and len(cap.err.strip().splitlines()) == 1
    assert cap.err.startswith(f"r1fast: error: r1fast policy: --length must be {allowed}")
    assert f"got {length}" in cap.err
    assert not torch.distributed.is_initialized()


def test_one_token_is_refused_two_is_the_shortest(capsys):
    """One token predicts nothing (its mean log-prob was NaN); two predict one."""
    from r1fast.policy.__main__ import main

    with pytest.raises(SystemExit):
        main(["--preset", "tiny-dense", "--length", "1"])
    assert "--length must be >= 2" in capsys.readouterr().err
    assert main(["--preset", "tiny-dense", "--length", "2"]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out and "random 2-token sequence" in out
