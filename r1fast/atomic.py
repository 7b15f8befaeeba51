"""Atomic small-file writes: the one place the package writes a summary, a config or a trimmed
log so that a crash (or a kill at any instant) leaves the old file or the new one, never half.

The pattern is the usual one: write a sibling ``NAME.tmp``, flush and ``fsync`` it, ``rename``
it over the target (atomic on POSIX within one file system), then ``fsync`` the folder so the
rename itself survives a power loss. Plain Python, no torch: every layer may import it.
Checkpoints (many files, verified by hash) have their own protocol in ``train/checkpoint.py``.
"""
from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(path: str | os.PathLike, files: bool = True) -> None:
    """``fsync`` every file and folder under ``path`` (and ``path``): before a folder written
    by other libraries (safetensors, tokenizers) is renamed into place. ``files=False``: the
    folders only (the files were synced already)."""
    root = Path(path)
    for p in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):  # deepest first
        if p.is_file() and files:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(root)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through ``path.tmp`` and a rename; parents are
    created. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # the old file stays; so must no half-written temporary
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
