"""What a helper process runs first so that it does not outlive the process that started it
(Linux ``prctl(PR_SET_PDEATHSIG)``). Standard library only: a ``spawn`` child imports this module
to run :func:`die_with_parent`, and anything heavier here (torch) would load into every such
child (~200 MB each, helper-79)."""
from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """Ask the kernel to send this process SIGTERM when the thread that started it dies;
    exit at once when ``parent`` is already gone (it died before the request took effect)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(0)
