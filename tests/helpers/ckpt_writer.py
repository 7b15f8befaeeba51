"""A checkpoint writer for the kill -9 tests, run as ``python tests/helpers/ckpt_writer.py ROOT
STEP [RANK WORLD INIT_FILE]``: saves steps STEP+1, STEP+2, ... forever and prints each committed
step (rank 0). With RANK WORLD INIT_FILE it is one of WORLD gloo ranks (file rendezvous), each
writing its rank file and its own shared parts, as the ranks of a real job do. It loads
r1fast/train/checkpoint.py by file (torch only): importing the r1fast.train package would
pull in megatron and cost seconds per trial. A fresh process, not a fork: a forked child of a
process that ran megatron/gloo threads can hang on a lock it inherited."""
import importlib.util
import sys
from pathlib import Path

import torch

SHAPE = (256, 1024)


def part_value(step: int, rank: int, i: int) -> float:
    """What shared part ``i`` of ``rank`` holds at ``step`` (the rank state's ``w`` is part
    -1's value)."""
    return float(step + i + 1000 * rank)


def write_shared(folder: Path, step: int, rank: int) -> None:
    """Stands in for the distributed model/optimizer files (``policy/``), so a kill may also
    land while they are written: two parts per rank."""
    (folder / "policy").mkdir(exist_ok=True)  # every rank makes it
    for i in range(2):
        torch.save(torch.full(SHAPE, part_value(step, rank, i)),
                   folder / "policy" / f"rank{rank}_part{i}.pt")


def main() -> None:
    path = Path(__file__).resolve().parents[2] / "r1fast" / "train" / "checkpoint.py"
    spec = importlib.util.spec_from_file_location("r1fast_checkpoint_file", path)
    ckpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ckpt)
    root, step = sys.argv[1], int(sys.argv[2])
    rank = 0
    if len(sys.argv) > 3:
        import torch.distributed as dist

        rank, world, init = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank,
                                world_size=world)
    while True:
        step += 1
        state = {"w": torch.full(SHAPE, part_value(step, rank, -1)), "step": step}
        ckpt.save_checkpoint(root, step, state, {"data": step}, keep_last=2,
                             write_shared=lambda folder, s=step: write_shared(folder, s, rank))
        if rank == 0:
            print(step, flush=True)


if __name__ == "__main__":
    main()
