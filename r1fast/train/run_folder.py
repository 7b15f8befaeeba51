"""A run's folder as the processes of one run see it: one folder for every rank
(:func:`check_shared_folder`), a fresh start over an earlier run's files (:func:`start_fresh`,
which sets them aside and never deletes), and what counts as such files
(:func:`has_run_files`). Every decision here is rank 0's, taken once for all ranks: a rank that
looked at the folder itself could see another state than rank 0 (a file-system cache, or a
moment later) and part from the others' collectives. The checkpoint files themselves are
:mod:`r1fast.train.checkpoint`'s."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from r1fast.atomic import fsync_dir, write_text_atomic
from r1fast.train.checkpoint import _rank_world, _step_dirs, barrier

log = logging.getLogger("r1fast.train")

SHARED_MARKER = ".r1fast_shared_check"
SHARED_WAIT_S = 5.0
"""How long a rank retries reading rank 0's marker before it reports the folder unshared."""


def check_shared_folder(folder: str | Path, key: str) -> None:
    """Under several processes (collective): every rank sees the file rank 0 writes into
    ``folder``, else a one-line error naming ``key``. Every rank writes its shards of each
    checkpoint into the run folder, so a node-local path failed only at the first checkpoint
    (``save_every`` steps, maybe hours, in) with a bare FileNotFoundError on one rank. Starts
    torch.distributed when torchrun asked for several processes."""
    import secrets

    from r1fast.policy.parallel import all_ranks_object, expected_world_size, init_distributed

    if expected_world_size() == 1:
        return
    init_distributed()
    folder, rank = Path(folder), _rank_world()[0]
    marker = folder / SHARED_MARKER
    token = None
    if rank == 0:
        token = secrets.token_hex(8)
        write_text_atomic(marker, token)
    token = all_ranks_object(token)[0]
    folder.mkdir(parents=True, exist_ok=True)  # an NFS client may cache "no such folder"
    seen, waited = None, 0.0
    while True:  # and take a few seconds to see a file another node wrote
        try:
            seen = marker.read_text()
        except OSError:
            seen = None
        if seen == token or waited >= SHARED_WAIT_S:
            break
        time.sleep(0.5)
        waited += 0.5
    blind = [r for r, ok in enumerate(all_ranks_object(seen == token)) if not ok]
    if rank == 0:  # every rank has looked (the gather above waits for all)
        marker.unlink(missing_ok=True)
    if blind:
        raise ValueError(f"{key}={folder} is not one folder for every process: rank(s) "
                         f"{blind[:8]} do not see the file rank 0 wrote there; every rank writes "
                         f"its shards of each checkpoint into it, so it must be on a file "
                         f"system all nodes share")


def set_aside(run_dir: str | Path, names: tuple[str, ...]) -> Path:
    """Move the ``names`` that exist in ``run_dir`` into a new ``run_dir/previous_<time>/``
    (never deletes anything); returns that folder."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = run_dir / f"previous_{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = run_dir / f"previous_{stamp}_{n}"
    aside.mkdir(parents=True)
    for name in names:
        if (run_dir / name).exists():
            os.replace(run_dir / name, aside / name)
    fsync_dir(run_dir)
    return aside


def start_fresh(run_dir: str | Path, names: tuple[str, ...], *, overwrite: bool, resume: bool,
                what: str, resume_off: str, overwrite_on: str,
                error: type[Exception] = ValueError) -> None:
    """Step 0 in ``run_dir``. A folder that holds checkpoints or metrics is an ``error`` naming
    them, unless ``overwrite``: then rank 0 moves ``names`` into ``previous_<time>/`` (never
    deleted) with a warning, and every rank waits for it (collective). ``what`` names the run
    ("SFT run"); ``resume_off`` / ``overwrite_on`` spell the settings as the user writes
    them."""
    run_dir = Path(run_dir)
    found = has_run_files(run_dir, tuple(n for n in names if n.endswith(".jsonl")))
    if _rank_world()[1] > 1:
        # every rank acts on rank 0's view: a rank that looked after rank 0 had moved the files
        # saw none, skipped the barrier below, and the ranks' collectives parted (helper-74)
        from r1fast.policy.parallel import all_ranks_object

        found = all_ranks_object(found)[0]
    if not found:
        return
    if not overwrite:
        why = "holds no complete checkpoint" if resume else f"has {resume_off}"
        raise error(f"{what} folder {run_dir} already holds {', '.join(found[:3])}"
                    f"{' ...' if len(found) > 3 else ''} but {why}: starting over from step 0 "
                    f"needs {overwrite_on}, which keeps the old files in {run_dir}/"
                    f"previous_<time>/; or choose another out_dir")
    if _rank_world()[0] == 0:
        aside = set_aside(run_dir, names)
        log.warning("%s starts from step 0 (%s); the previous run's files are in %s", what,
                    overwrite_on, aside)
    barrier()


def has_run_files(run_dir: str | Path,
                  logs: tuple[str, ...] = ("metrics.jsonl", "eval.jsonl")) -> list[str]:
    """What in a run folder a fresh start would overwrite: checkpoint folders (complete or not)
    and the non-empty ``logs`` of the kind of run (a GRPO run's step-0 evaluation is written to
    eval.jsonl before its first checkpoint or metrics row: a later start must not take it as
    its own)."""
    run_dir = Path(run_dir)
    found = [p.name for _, p in _step_dirs(run_dir / "checkpoints")]
    found = [f"checkpoints/{n}" for n in found]
    for name in logs:
        file = run_dir / name
        if file.is_file() and file.stat().st_size > 0:
            found.append(name)
    return found
