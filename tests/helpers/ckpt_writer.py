"""A checkpoint writer for the kill -9 test, run as ``python tests/helpers/ckpt_writer.py ROOT
STEP``: saves steps STEP+1, STEP+2, ... forever and prints each committed step. It loads
r1fast/train/checkpoint.py by file (torch only): importing the r1fast.train package would
pull in megatron and cost seconds per trial. A fresh process, not a fork: a forked child of a
process that ran megatron/gloo threads can hang on a lock it inherited."""
import importlib.util
import sys
from pathlib import Path

import torch

SHAPE = (256, 1024)


def write_shared(folder: Path, step: int) -> None:
    """Stands in for the distributed model/optimizer files (``policy/``), so a kill may also
    land while they are written."""
    (folder / "policy").mkdir()
    for i in range(2):
        torch.save(torch.full(SHAPE, float(step + i)), folder / "policy" / f"part_{i}.pt")


def main() -> None:
    path = Path(__file__).resolve().parents[2] / "r1fast" / "train" / "checkpoint.py"
    spec = importlib.util.spec_from_file_location("r1fast_checkpoint_file", path)
    ckpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ckpt)
    root, step = sys.argv[1], int(sys.argv[2])
    while True:
        step += 1
        state = {"w": torch.full(SHAPE, float(step)), "step": step}
        ckpt.save_checkpoint(root, step, state, {"data": step}, keep_last=2,
                             write_shared=lambda folder, s=step: write_shared(folder, s))
        print(step, flush=True)


if __name__ == "__main__":
    main()
