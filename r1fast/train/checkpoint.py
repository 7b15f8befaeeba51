"""Atomic, resumable, verified checkpoints.

A checkpoint is a folder ``<run>/checkpoints/step_<N>/`` holding

- ``policy/`` (and ``reference/`` when the run has a frozen reference): the model and optimizer
  in megatron-core's distributed-checkpoint format (:mod:`r1fast.policy.dist_ckpt`), written by
  every rank and readable at ANY TP/PP/EP/DP layout;
- one ``rank_<r>.pt`` per process with what belongs to that process only (its RNG states);
- ``meta.json``: step, data position, config, layout, the sha256 and size of every file, and
  its own sha256 (``meta_sha256``, over the rest of it), so no part of a checkpoint goes
  unchecked (an older meta.json without it loads with a WARNING that it is not verified).

It is written under a temporary name and renamed into place only when every rank has finished
writing, and the ``latest`` pointer is replaced atomically after that. A process killed at any
moment therefore leaves either the old checkpoint or the new one, never a torn one.

Rank files are loaded with ``torch.load(weights_only=True)`` (as megatron loads its common
state): checkpoints hold only tensors and plain Python containers, so a hostile file cannot
execute code. :func:`load_checkpoint` first verifies every file against ``meta.json`` (the files
split over the ranks), so a flipped byte or a file from another checkpoint is an error that
names the file, never a silent resume.

A damaged ``latest`` pointer (missing target, empty, a path outside the folder, a step without
``meta.json``) does not hide the committed checkpoints: :func:`latest_checkpoint` then scans for
the newest complete ``step_<N>`` folder and logs a WARNING. ``keep_last`` never deletes a
checkpoint of a later step than the one just saved.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from r1fast.atomic import fsync_dir, sync_tree

LATEST = "latest"
_STEP_DIR = re.compile(r"step_(\d{8,})")
log = logging.getLogger("r1fast.train")


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be used (damaged, tampered, incomplete)."""


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


def barrier() -> None:
    """A barrier over every process when torch.distributed is initialised, else nothing."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


_barrier = barrier


def run_steps(trainer, steps: int, save_every: int, logger) -> None:
    """The step loop of SFT and reward-model training: ``trainer.step()`` (which advances
    ``trainer.step_idx``) until ``steps``, each step's metrics to ``logger`` (closed at the
    end, also on an error), a checkpoint (``trainer.save()``) every ``save_every`` steps and
    one at the end; a run whose checkpoint is already at ``steps`` trains nothing (a warning
    says so)."""
    try:
        if trainer.step_idx >= steps:
            log.warning("the checkpoint is at step %d and steps=%d: nothing to train (raise "
                        "steps to continue); writing its model", trainer.step_idx, steps)
            return
        while trainer.step_idx < steps:
            metrics = trainer.step()
            logger.log(trainer.step_idx, metrics)
            if save_every and trainer.step_idx % save_every == 0:
                trainer.save()
        if not save_every or trainer.step_idx % save_every:
            trainer.save()
    finally:
        logger.close()


def _gather(obj: Any, world: int) -> list:
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def file_digest(path: str | Path, sync: bool = False) -> dict:
    """``{"sha256": hex, "bytes": size}`` of a file's content; ``sync`` also makes the file
    durable (``fsync``) first: the writers of a checkpoint's shared parts (megatron's
    ``common.pt``, ``metadata.json``) do not."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return {"sha256": h.hexdigest(), "bytes": size}


def nonfinite_tensors(obj: Any, prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors in a nested state holding NaN or Inf."""
    bad: list[str] = []
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.numel() and not bool(torch.isfinite(obj).all()):
            bad.append(prefix or "<tensor>")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            bad += nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad += nonfinite_tensors(v, f"{prefix}[{i}]")
    return bad


def check_finite_state(state: Any, what: str) -> None:
    """Raise ``FloatingPointError`` naming the tensors of ``state`` that hold NaN/Inf."""
    bad = nonfinite_tensors(state)
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise FloatingPointError(f"{what}: non-finite values (NaN/Inf) in tensor(s) "
                                 f"{', '.join(bad[:5])}{more}; refusing to write them")


def save_checkpoint(root: str | Path, step: int, rank_state: dict, meta: dict,
                    keep_last: int = 0,
                    write_shared: Callable[[Path], None] | None = None,
                    shared_tensors: Any = None,
                    _before_commit: Callable[[], None] | None = None) -> Path:
    """Write this rank's ``rank_state``, the shared parts and (rank 0) ``meta`` for ``step``;
    collective.

    ``write_shared(folder)`` is called on every rank with the (temporary) checkpoint folder to
    write the parts all ranks write together (the distributed model and optimizer state);
    ``shared_tensors`` holds this rank's tensors it writes, checked for NaN/Inf with
    ``rank_state`` before anything is written. ``keep_last`` > 0 deletes all but the newest
    ``keep_last`` checkpoints up to this step once it is committed (0 keeps all).
    ``_before_commit`` is a test hook called on rank 0 after all files are written and before
    the rename: a kill there must leave the previous checkpoint as ``latest``.
    """
    rank, world = _rank_world()
    bad = nonfinite_tensors(rank_state) + nonfinite_tensors(shared_tensors or {})
    # every rank must agree to write before any rank changes the folder (collective decision)
    all_bad = [b for r in _gather(bad, world) for b in r]
    if all_bad:
        more = f" (and {len(all_bad) - 5} more)" if len(all_bad) > 5 else ""
        raise FloatingPointError(f"checkpoint of step {step}: non-finite values (NaN/Inf) in "
                                 f"tensor(s) {', '.join(all_bad[:5])}{more}; not written, the "
                                 f"previous checkpoint stays the latest")
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for debris in root.glob(".tmp_step_*"):  # folders of saves killed before their rename
            log.info("removing %s, left by a save that did not finish", debris)
            shutil.rmtree(debris)
        tmp.mkdir()
    _barrier()
    if write_shared is not None:
        write_shared(tmp)
    name = f"rank_{rank:05d}.pt"
    _write_file(tmp / name, lambda f: torch.save(rank_state, f))
    _barrier()
    digests = _digest_files(tmp, rank, world)
    if rank == 0:
        meta = _sealed({**meta, "step": step, "world_size": world, "files": digests})
        _write_file(tmp / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
        sync_tree(tmp, files=False)  # the files were synced as they were hashed
        if _before_commit is not None:
            _before_commit()
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        pointer = root / (LATEST + ".tmp")
        _write_file(pointer, lambda f: f.write(final.name.encode()))
        os.replace(pointer, root / LATEST)
        fsync_dir(root)
        if keep_last:
            # only older steps: a checkpoint of a later step (another run's, or one this run
            # has not reached) is never removed here
            done = sorted(s for s, _ in _step_dirs(root) if s <= step)
            for old in done[:-keep_last]:
                log.info("removing checkpoint step_%08d (keeping the newest %d)", old, keep_last)
                shutil.rmtree(root / f"step_{old:08d}")
    _barrier()
    return final


SEAL = "meta_sha256"


def _seal_of(meta: dict) -> str:
    """sha256 of ``meta`` without its seal, as JSON with sorted keys (the form it is read
    back in, so the writer and a reader hash the same text)."""
    body = {k: v for k, v in meta.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _sealed(meta: dict) -> dict:
    """``meta`` with its own checksum: the file checksums protect the rank and model files,
    this protects the step, data position and those checksums themselves (a flipped digit in
    the data position would otherwise resume on other prompts, silently)."""
    meta = json.loads(json.dumps(meta))  # tuples -> lists, int keys -> str: as it is read
    return {**meta, SEAL: _seal_of(meta)}


def _files_of(folder: Path) -> list[str]:
    """Every file under ``folder`` (but meta.json), as sorted relative paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != "meta.json")


def _digest_files(folder: Path, rank: int, world: int) -> dict[str, dict]:
    """``{relative path: file_digest}`` of every file under ``folder``; each rank syncs and
    hashes every world-th file and the results are gathered (collective)."""
    names = _files_of(folder) if rank == 0 else None
    names = _broadcast(names, world)
    mine = {n: file_digest(folder / n, sync=True) for n in names[rank::world]}
    out: dict[str, dict] = {}
    for part in _gather(mine, world):
        out.update(part)
    return dict(sorted(out.items()))


def _broadcast(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``step_<N>`` folder under ``root``, by step."""
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.fullmatch(p.name)
            if m and p.is_dir() and not p.is_symlink():
                out.append((int(m.group(1)), p))
    return sorted(out)


def is_complete(path: Path) -> bool:
    """A committed checkpoint folder: a readable ``meta.json`` with its step and world size,
    every rank file, and every file it lists."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        world = int(meta["world_size"])
        int(meta["step"])
        listed = list(meta.get("files", {}))
        if SEAL in meta and meta[SEAL] != _seal_of(meta):
            return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return (all((path / f"rank_{r:05d}.pt").is_file() for r in range(world))
            and all((path / n).is_file() for n in listed))


def _pointer_target(root: Path) -> tuple[Path | None, str]:
    """The folder ``latest`` names, or None and why it cannot be used."""
    pointer = root / LATEST
    try:
        name = pointer.read_text().strip()
    except OSError as e:
        return None, f"{pointer} cannot be read ({e.strerror})"
    except UnicodeDecodeError:
        return None, f"{pointer} is not text"
    if not _STEP_DIR.fullmatch(name):
        return None, f"{pointer} holds {name[:60]!r}, not a step_<N> folder name"
    path = root / name
    if not path.is_dir():
        return None, f"{pointer} names {name}, which does not exist"
    if not is_complete(path):
        return None, f"{pointer} names {name}, which has no valid meta.json or misses a rank file"
    return path, ""


def resume_point(root: str | Path, *, resume: bool, overwrite: bool,
                 start_over: str, expect: tuple[str, str] | None = None) -> Path | None:
    """The checkpoint a run continues from: the latest under ``root`` when ``resume``, else
    None. ``overwrite`` starts over only where there is nothing to resume; when a checkpoint is
    resumed anyway, a WARNING says that ``overwrite`` did nothing and how to start over
    (``start_over``, the setting as the user writes it). ``expect``: (the meta.json key this
    kind of run writes, its name): a checkpoint without it is another kind of run's, refused
    before anything is built or loaded. Under several processes (torch.distributed started:
    :func:`r1fast.train.run_folder.check_shared_folder` first) every rank takes rank 0's
    checkpoint (collective)."""
    path = _rank_zeros(latest_checkpoint(root) if resume else None)
    if path is not None and expect is not None and expect[0] not in read_meta(path):
        raise CheckpointError(f"checkpoint {path} is not a {expect[1]} checkpoint (its "
                              f"meta.json has no {expect[0]!r}: another kind of run writes "
                              f"there); choose another out_dir for this {expect[1]} run")
    if path is not None and overwrite:
        log.warning("resuming from %s: overwrite applies only to a run that does not resume; "
                    "to start over from step 0, set %s", path, start_over)
    return path


def _rank_zeros(path: Path | None) -> Path | None:
    """Rank 0's ``path`` on every rank (collective under several processes). Each rank found
    the latest checkpoint itself: a node whose file-system cache still showed the previous
    ``latest`` resumed an older step than the others, and its ranks trained other weights on
    other data without an error until the next save (helper-78)."""
    if _rank_world()[1] == 1:
        return path
    from r1fast.policy.parallel import all_ranks_object

    views = all_ranks_object(None if path is None else str(path))
    stale = [r for r, v in enumerate(views) if v != views[0]]
    if stale and _rank_world()[0] == 0:
        log.warning("rank(s) %s saw another latest checkpoint (%s) than rank 0 (%s), as a "
                    "file-system cache can; every rank resumes rank 0's", stale[:8],
                    views[stale[0]], views[0])
    return None if views[0] is None else Path(views[0])


def latest_checkpoint(root: str | Path) -> Path | None:
    """The last committed checkpoint folder under ``root``, or None when there is none.

    Follows the ``latest`` pointer; when the pointer is missing or damaged, the newest complete
    ``step_<N>`` folder is used instead and a WARNING says so."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.exists() or pointer.is_symlink():
        path, why = _pointer_target(root)
        if path is not None:
            return path
    else:
        why = f"{pointer} is missing"
    complete = [p for _, p in _step_dirs(root) if is_complete(p)]
    if not complete:
        if pointer.exists() or pointer.is_symlink():
            log.warning("%s, and %s holds no complete checkpoint", why, root)
        return None
    log.warning("%s; using the newest complete checkpoint %s instead", why, complete[-1])
    return complete[-1]


def read_meta(path: str | Path) -> dict:
    """``meta.json`` of checkpoint folder ``path``; :class:`CheckpointError` when unreadable."""
    meta_path = Path(path) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        int(meta["world_size"])
        int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {meta_path} is unreadable or incomplete "
                              f"({type(e).__name__}: {e})") from e
    if SEAL in meta and meta[SEAL] != _seal_of(meta):  # older checkpoints have no seal
        raise CheckpointError(f"checkpoint {meta_path} is damaged or was changed after it was "
                              f"written: its content does not match its {SEAL}")
    return meta


def verify_checkpoint(path: str | Path, meta: dict) -> None:
    """Check every file ``meta.json`` lists against its sha256 and size (the files split over
    the ranks; collective); :class:`CheckpointError` naming the damaged or missing files."""
    rank, world = _rank_world()
    path = Path(path)
    files = meta.get("files") or {}
    problems = []
    for name in sorted(files)[rank::world]:
        file = path / name
        if not file.is_file():
            problems.append(f"{file} is missing")
            continue
        got, want = file_digest(file), files[name]
        if got != want:
            problems.append(
                f"{file} is damaged or was changed after it was written: sha256 "
                f"{got['sha256'][:16]}.. ({got['bytes']} bytes), meta.json records "
                f"{want['sha256'][:16]}.. ({want['bytes']} bytes)")
    problems = sorted(p for part in _gather(problems, world) for p in part)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"checkpoint file {problems[0]}{more}")


def load_checkpoint(path: str | Path, *, verify: bool = True) -> tuple[dict | None, dict]:
    """Return ``(rank_state, meta)`` of this rank from checkpoint folder ``path``; collective.

    With ``verify`` (the default) every file must match the sha256 and size that ``meta.json``
    records (:func:`verify_checkpoint`); a meta.json without its own ``meta_sha256`` (an older
    checkpoint) loads with a WARNING that it is not verified. ``rank_state`` is None when the
    checkpoint was written by another number of ranks: its per-rank files do not belong to
    this run's ranks (the shared ``policy/`` folder still loads at any layout). A checkpoint of
    the older format (model and optimizer inside the rank files) only loads at the world size
    that wrote it."""
    rank, world = _rank_world()
    path = Path(path)
    meta = read_meta(path)
    written_by = int(meta["world_size"])
    if verify:
        if "files" not in meta:
            log.warning("checkpoint %s records no checksums (written by an older r1fast); "
                        "loading it unverified", path)
        else:
            if SEAL not in meta and rank == 0:  # written before meta.json had its own seal
                log.warning("checkpoint file %s is not verified: it has no %s (written by an "
                            "older r1fast), so a changed step, data position or file checksum "
                            "in it would go unnoticed; the other files are verified against it",
                            path / "meta.json", SEAL)
            verify_checkpoint(path, meta)
    sharded = (path / "policy").is_dir()
    if written_by != world:
        if not sharded:
            raise ValueError(f"checkpoint {path} was written by {written_by} ranks, this run has "
                             f"{world}; resume with the same parallel layout (this checkpoint "
                             f"predates resharding)")
        return None, meta
    file = path / f"rank_{rank:05d}.pt"
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} is missing")
    state = torch.load(file, map_location="cpu", weights_only=True)
    return state, meta


OPTIM_READ_LIVE = ("optim.max_nonfinite_skips", "optim.clip_grad", "optim.total_steps")
"""``optim`` keys the engine reads from the running config at every step (the skip budget, the
clipping norm), or never (the schedule's length comes from the run's): a resume may change
them, as the fix a NonFiniteError suggests (more skips) must be possible without a restart."""


def check_resumed_config(saved: str | None, now: str, path, free: tuple[str, ...]) -> None:
    """A resume whose config differs from the checkpoint's (``saved``, the ``dump_toml`` text
    in its meta) says so: ``optim.*`` changes are an error, since megatron restores the
    optimizer and its LR schedule from the checkpoint and they would not apply (except
    :data:`OPTIM_READ_LIVE`); any other change is a WARNING listing it. Keys starting with
    one of ``free`` (run length, layout, logging) may change silently."""
    from r1fast.typed_toml import ConfigError, config_changes

    if not saved:
        return
    # optim.total_steps: the engine sets the schedule's length from the run (older SFT
    # checkpoints recorded it as the run's steps, now the config keeps the default)
    changes = [c for c in config_changes(saved, now)
               if not c[0].startswith(free) and c[0] != "optim.total_steps"]
    optim = [c for c in changes if c[0].startswith("optim.") and c[0] not in OPTIM_READ_LIVE]
    if optim:
        listed = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in optim)
        raise ConfigError(f"resuming {path} with other optimizer settings ({listed}): the "
                          f"optimizer and its LR schedule resume from the checkpoint, so these "
                          f"would not apply; resume with the checkpoint's values, or start a new "
                          f"run from the model (run.init_from / init_from)")
    if changes:
        log.warning("resuming %s with a config that differs from the checkpoint's: %s", path,
                    "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes))
