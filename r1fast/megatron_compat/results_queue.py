"""megatron's checkpoint writer reports its results through a ``multiprocessing`` Manager that
it starts at the first save and keeps for the life of the process (``filesystem_async``'s
``_results_queue``). A process stopped without running its exit handlers (SIGKILL, the OOM
killer) left that server behind: a ~270 MB orphan under init that holds the parent's stdout
open, so ``r1fast train ... | tee log`` never ended (helper-78). :func:`install` starts the
same kind of Manager first, with its server set to receive SIGTERM when the thread that started
it (the trainer's main thread) dies; megatron then finds its queue already made and uses it.
Linux only (``prctl``); elsewhere megatron makes its own, as before."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from multiprocessing.managers import SyncManager

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """Runs first in the Manager's server process."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent was gone before the signal was asked for
        os._exit(0)


def install() -> None:
    """Make megatron's results queue on a Manager that dies with this process (idempotent;
    call it from the thread that saves)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None or not sys.platform.startswith("linux"):
        return
    manager = SyncManager(ctx=mp.get_context("spawn"))  # megatron's kind: spawn, not fork
    manager.start(initializer=_die_with_parent, initargs=(os.getpid(),))
    # the queue proxy holds the manager, so it lives as long as megatron keeps the queue
    filesystem_async._results_queue = manager.Queue()
