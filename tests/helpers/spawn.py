"""Running a function on several gloo ranks of this machine (torch.multiprocessing spawn with a
torchrun-style environment), for the tests that compare a parallel layout with one rank."""
import os
import socket

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    fn(rank, *args)


def run_ranks(world: int, fn, *args) -> None:
    """``fn(rank, *args)`` on ``world`` spawned processes (``fn`` must be importable: a
    module-level function of a test file or helper)."""
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True,
                       start_method="spawn")
