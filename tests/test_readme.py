"""Every ```python block of the README runs as written, top to bottom, as a script file.

The blocks run in a scratch folder that sees the repository's ``recipes/``; the pipeline
example trains several tiny models (minutes), so it is in the slow suite."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
SLOW_MARK = "pretrain_base("  # the whole R1 pipeline in miniature


def _params():
    for i, code in enumerate(BLOCKS):
        marks = [pytest.mark.slow] if SLOW_MARK in code else []
        yield pytest.param(code, id=f"block{i}", marks=marks)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.timeout(2000)  # above the block's own 1800 s, which names the block
@pytest.mark.parametrize("code", list(_params()))
def test_readme_block_runs(code, tmp_path):
    """Saved as a file and run as ``python example.py``, as a user runs it: under ``-c`` the
    processes r1fast spawns (reward workers, checkpoint writers) never re-import the script,
    so a block without the ``__main__`` guard passed here and crashed for its reader."""
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    (tmp_path / "example.py").write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
