"""Test-wide setup. Without a GPU, Triton kernels run in the interpreter; the variable must be
set before the first kernel launch, so it is set here, before any test imports a kernel."""
import os
import sys
from pathlib import Path

import torch

# Helpers shared by several test files import as ``tests.helpers.<module>``; test files never
# import each other. The repository root is appended (not prepended) so nothing is shadowed.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    """Refuse to start on a Triton interpreter that cannot run r1fast's kernels: the Triton tests
    would otherwise skip as "Triton unavailable" and the run would pass without testing them."""
    from r1fast.ops._dispatch import interpreter_missing, triton_importable, triton_interpret

    why = interpreter_missing() if triton_importable() and triton_interpret() else None
    if why is not None:
        raise pytest.UsageError(f"{why}; or set TRITON_INTERPRET=0 to skip the Triton tests")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
