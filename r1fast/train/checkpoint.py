"""Atomic, resumable checkpoints.

A checkpoint is a folder ``<run>/checkpoints/step_<N>/`` holding one ``rank_<r>.pt`` per
process (its model shard, optimizer shard, RNG states) plus ``meta.json`` (step, data position,
config). It is written under a temporary name and renamed into place only when every rank has
finished writing, and the ``latest`` pointer is replaced atomically after that. A process killed
at any moment therefore leaves either the old checkpoint or the new one, never a torn one.

Files are loaded with ``torch.load(weights_only=True)``: checkpoints hold only tensors and plain
Python containers, so a hostile file cannot execute code.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, writer: Callable[[Any], None]) -> None:
    with open(path, "wb") as f:
        writer(f)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict:
    """Every RNG the run draws from, in a weights_only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy(), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(root: str | Path, step: int, rank_state: dict, meta: dict,
                    keep_last: int | None = 2,
                    _before_commit: Callable[[], None] | None = None) -> Path:
    """Write this rank's ``rank_state`` and (rank 0) ``meta`` for ``step``; collective.

    ``_before_commit`` is a test hook called on rank 0 after all files are written and before
    the rename: a kill there must leave the previous checkpoint as ``latest``.
    """
    rank, world = _rank_world()
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # debris of an earlier killed save
        tmp.mkdir()
    _barrier()
    _write_file(tmp / f"rank_{rank:05d}.pt", lambda f: torch.save(rank_state, f))
    _barrier()
    if rank == 0:
        meta = {**meta, "step": step, "world_size": world}
        _write_file(tmp / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
        _fsync_dir(tmp)
        if _before_commit is not None:
            _before_commit()
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        pointer = root / (LATEST + ".tmp")
        _write_file(pointer, lambda f: f.write(final.name.encode()))
        os.replace(pointer, root / LATEST)
        _fsync_dir(root)
        if keep_last:
            done = sorted(p for p in root.glob("step_*") if p.is_dir())
            for old in done[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The last committed checkpoint folder under ``root``, or None."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "meta.json").is_file() else None


def load_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """Return ``(rank_state, meta)`` of this rank from checkpoint folder ``path``."""
    rank, world = _rank_world()
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    if meta["world_size"] != world:
        raise ValueError(f"checkpoint {path} was written by {meta['world_size']} ranks, this run has "
                         f"{world}; resume with the same parallel layout")
    state = torch.load(path / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=True)
    return state, meta
