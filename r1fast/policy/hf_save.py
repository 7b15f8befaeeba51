"""Writing a policy as a Hugging Face model folder, at any layout and any size.

Every tensor of the policy, all-gathered over its TP group, has one owner rank
(:func:`~r1fast.policy.hf_checkpoint.owned_hf_tensors`). The ranks first exchange only names
and sizes, so that every rank knows the whole plan before a byte is written:

- a non-finite tensor anywhere stops every rank with the same error, before any file exists;
- a model of at most ``max_shard_bytes`` goes to rank 0 (host memory), which writes
  ``model.safetensors``;
- a larger one is cut into shards per owner, numbered over all ranks
  (``model-0000i-of-0000n.safetensors``), and each owner writes its own; rank 0 writes
  ``model.safetensors.index.json``. No process holds more than its own tensors: DeepSeek-V3
  is 1.3 TB in bf16, which no rank could gather.

Rank 0 also writes ``r1fast_config.json`` and, for a supported family, ``config.json``, and
adds the tensors the policy carries without building them (DeepSeek's MTP layers).
Transformers and :func:`~r1fast.policy.hf_checkpoint.load_hf_checkpoint` read either form.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Optional

import torch
import torch.distributed as dist

from r1fast.checks import one_line
from r1fast.policy.hf_checkpoint import (INDEX, R1FAST_CONFIG, SAFETENSORS, owned_hf_tensors,
                                         passthrough_tensors)
from r1fast.policy.parallel import all_ranks_object, host_group

log = logging.getLogger("r1fast.policy")


def _shards(keys_bytes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Consecutive groups of the keys, each at most ``max_shard_bytes`` unless one tensor
    alone is larger."""
    shards: list[list[str]] = [[]]
    size = 0
    for k, nbytes in keys_bytes:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    return shards if shards[0] else []


def _write(tensors: dict[str, torch.Tensor], keys: list[str], file: str) -> None:
    """One safetensors file, durable when this returns: on a shared file system only the
    rank that wrote it can flush it."""
    from safetensors.torch import save_file

    save_file({k: tensors[k].contiguous() for k in keys}, file, metadata={"format": "pt"})
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _write_configs(policy, path: str, dtype: Optional[torch.dtype]) -> None:
    cfg = policy.model_cfg
    with open(os.path.join(path, R1FAST_CONFIG), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    try:
        hf = cfg.to_hf_config()
    except ValueError:
        hf = None  # no HF family has this architecture; r1fast_config.json describes it
    if hf is not None:
        if dtype is not None:
            hf["dtype"] = hf["torch_dtype"] = str(dtype).replace("torch.", "")
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)


def write_hf_folder(policy, path: str, *, dtype: Optional[torch.dtype] = None,
                    max_shard_bytes: int = 4 << 30) -> list[str]:
    """``policy`` as an HF folder at ``path`` (module docstring); returns the names of the
    weight files this rank wrote. Collective: every rank must call it; ``path`` must be on a
    file system all ranks share when the model is larger than ``max_shard_bytes``. A failure
    on any rank (a full disk, a missing MTP source folder) raises on every rank, so none waits
    in a collective for one that is gone."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = owned_hf_tensors(policy, dtype)
    error, token = None, None  # this rank's failure (raised on every rank by _agree)
    if rank == 0:
        _, error = _attempt(lambda: mine.update(passthrough_tensors(policy)))
    sized = [(k, mine[k].numel() * mine[k].element_size()) for k in sorted(mine)]
    bad = [k for k, _ in sized if mine[k].is_floating_point()
           and not bool(torch.isfinite(mine[k]).all())]
    plans = all_ranks_object((sized, bad, _said(error)))
    _agree([p[2] for p in plans], path, error)
    bad = sorted(k for _, b, _ in plans for k in b)
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise FloatingPointError(f"save_hf_checkpoint: tensor(s) {', '.join(bad[:5])}{more} hold "
                                 f"NaN/Inf; nothing written to {path}")
    if rank == 0:  # after the checks: a refused export leaves no folder
        token, error = _attempt(lambda: _make_folder(path))
    made_error, token = all_ranks_object((_said(error), token))[0]
    _agree([made_error], path, error)
    total = sum(n for sized_keys, _, _ in plans for _, n in sized_keys)
    if total <= max_shard_bytes:  # small: one file, written by rank 0
        if len(plans) > 1:
            parts = [None] * len(plans) if rank == 0 else None
            dist.gather_object(mine, parts, dst=0, group=host_group())  # in host memory
            mine = {k: v for part in parts for k, v in part.items()} if rank == 0 else {}
        written = [SAFETENSORS] if rank == 0 else []
    else:
        shards = [(owner, keys) for owner, (sized_keys, _, _) in enumerate(plans)
                  for keys in _shards(sized_keys, max_shard_bytes)]
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        written = [name for (owner, _), name in zip(shards, names) if owner == rank]
        where = {k: name for (_, keys), name in zip(shards, names) for k in keys}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(where.items()))}

    def write_mine() -> None:
        if total > max_shard_bytes:
            _check_shared(path, token)
            for (owner, keys), name in zip(shards, names):
                if owner == rank:
                    _write(mine, keys, os.path.join(path, name))
        if rank == 0:
            if total <= max_shard_bytes:
                _write(mine, sorted(mine), os.path.join(path, SAFETENSORS))
            else:
                with open(os.path.join(path, INDEX), "w") as f:
                    json.dump(index, f, indent=2)
            _write_configs(policy, path, dtype)

    _, error = _attempt(write_mine)
    # also a barrier: every file is written when any rank returns
    _agree(all_ranks_object(_said(error)), path, error)
    if rank == 0:  # no rank reads it any more
        os.remove(os.path.join(path, _MARKER))
    return written


_MARKER = ".r1fast_export"


#: the weight files of an earlier save: ours, or transformers' own names (the same)
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def _make_folder(path: str) -> str:
    """Make ``path`` (without the weight files of an earlier save, which loaders would read
    beside the new ones: r1fast and vLLM follow an old index, transformers prefers a single
    file) and put a random token in it, which every rank then reads back."""
    token = os.urandom(8).hex()
    os.makedirs(path, exist_ok=True)
    stale = sorted(f for f in os.listdir(path) if _WEIGHT_FILE.fullmatch(f))
    for name in stale:
        os.remove(os.path.join(path, name))
    if stale:
        log.warning("save_hf_checkpoint: removed the weight files of an earlier save from %s "
                    "(%d: %s)", path, len(stale), ", ".join(stale[:3]) + (
                        ", ..." if len(stale) > 3 else ""))
    with open(os.path.join(path, _MARKER), "w") as f:
        f.write(token)
    return token


def _check_shared(path: str, token: str) -> None:
    """Whether this rank sees rank 0's folder: a node-local path would scatter the shards
    over the nodes' own disks."""
    try:
        with open(os.path.join(path, _MARKER)) as f:
            seen = f.read()
    except FileNotFoundError:
        seen = None
    if seen != token:
        raise FileNotFoundError(f"{path} is not the folder rank 0 made: each rank writes its own "
                                f"shards there, so it must be on a file system all nodes share")


def _attempt(work) -> tuple[Any, BaseException | None]:
    """``(work(), None)``, or ``(None, its exception)``: a rank's own I/O failure, which
    :func:`_agree` then raises on every rank."""
    try:
        return work(), None
    except Exception as exc:
        return None, exc


def _said(error: BaseException | None) -> str | None:
    return None if error is None else one_line(error, 500)


def _agree(errors: list, path: str, mine: BaseException | None) -> None:
    """Raise on every rank when any failed (naming the first by rank)."""
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        r, text = failed[0]
        raise RuntimeError(f"save_hf_checkpoint: rank {r} failed ({text}); {path} is "
                           f"incomplete") from mine
