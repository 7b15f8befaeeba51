"""Running a function on several gloo ranks of this machine, for the tests that compare a
parallel layout with one rank.

Two rendezvous, neither with a port picked free and bound later (which another process could
take in between): :func:`run_ranks` gives ``fn`` a torchrun-style environment (``RANK``,
``MASTER_PORT``, ...) for code that calls ``init_process_group()`` itself, whose store this
process serves (:func:`hosted_store`); :func:`run_gloo` makes the group from a file store and
tears it down in step. Both pin each rank to one intra-op thread: two ranks of
two threads each on a 2-core CI box would oversubscribe it. Each rank enables faulthandler,
so that a rank killed by a signal (an abort in C++ teardown, a segfault) leaves every
thread's Python stack in the test's captured stderr rather than only "terminated with
signal SIGABRT".
"""
import faulthandler
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _one_thread_with_stacks() -> None:
    faulthandler.enable(all_threads=True)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def hosted_store(world: int) -> tuple[dist.TCPStore, dict[str, str]]:
    """(the rendezvous store of a ``world``-rank group, the environment variables that make
    every rank's ``init_process_group()`` a client of it). This process serves the store, on a
    port the OS picks as it binds it, the way torchrun's agent serves its workers'
    (``TORCHELASTIC_USE_AGENT_STORE``); keep the store alive until the ranks are done."""
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    return store, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
                   "TORCHELASTIC_USE_AGENT_STORE": "True"}


def _entry(rank, world, rendezvous, fn, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), **rendezvous)
    _one_thread_with_stacks()
    fn(rank, *args)
    if dist.is_initialized():  # fn left its group open: every rank ends its collectives
        # before any tears down (gloo aborts a rank whose peer left in the middle of one)
        dist.barrier()
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args) -> None:
    """``fn(rank, *args)`` on ``world`` spawned processes (``fn`` must be importable: a
    module-level function of a test file or helper)."""
    store, rendezvous = hosted_store(world)
    _joined(mp.start_processes(_entry, args=(world, rendezvous, fn, args), nprocs=world,
                               join=False, start_method="spawn"))
    del store  # served until every rank has exited


def _gloo_entry(rank, world, store, fn, args):
    _one_thread_with_stacks()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        fn(rank, *args)
        # every rank finishes its last collective before any rank closes its sockets: a rank
        # that tears down while its peer is still in gloo is what makes teardown racy
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_gloo(world: int, store: str, fn, *args) -> None:
    """``fn(rank, *args)`` on ``world`` spawned processes inside the default gloo group,
    made from the file store ``store`` (a path in a fresh temporary folder)."""
    _joined(mp.start_processes(_gloo_entry, args=(world, store, fn, args), nprocs=world,
                               join=False, start_method="spawn"))


def _joined(ranks: mp.ProcessContext) -> None:
    """Wait for every rank (an error in one is raised here, as ``join=True`` does); if the wait
    itself is interrupted (pytest-timeout's alarm, Ctrl-C), kill the ranks still running, so
    that none is left waiting in a collective for the rest of the session."""
    try:
        while not ranks.join():
            pass
    finally:
        for p in ranks.processes:
            if p.is_alive():
                p.kill()
