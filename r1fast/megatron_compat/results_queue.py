"""megatron's checkpoint writer reports its results through a ``multiprocessing`` Manager that
it starts at the first save and keeps for the life of the process (``filesystem_async``'s
``_results_queue``). A process stopped without running its exit handlers (SIGKILL, the OOM
killer) left that server behind: a ~270 MB orphan under init that holds the parent's stdout
open, so ``r1fast train ... | tee log`` never ended (helper-78). :func:`install` starts the
same kind of Manager first, with its server set to receive SIGTERM when the thread that started
it (the trainer's main thread) dies (:func:`r1fast.process_death.die_with_parent`); megatron
then finds its queue already made and uses it. Linux main thread only; elsewhere megatron makes
its own, as before (a server tied to a worker thread would die with that thread and leave a
dead queue for later saves)."""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
from multiprocessing.managers import SyncManager

from r1fast.process_death import die_with_parent


def install() -> None:
    """Make megatron's results queue on a Manager that dies with this process (idempotent)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None or not sys.platform.startswith("linux") \
            or threading.current_thread() is not threading.main_thread():
        return
    manager = SyncManager(ctx=mp.get_context("spawn"))  # megatron's kind: spawn, not fork
    manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    # the queue proxy holds the manager, so it lives as long as megatron keeps the queue
    filesystem_async._results_queue = manager.Queue()
