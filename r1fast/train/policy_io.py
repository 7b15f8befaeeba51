"""Moving a policy's weights in and out: checkpoints, reference copies, HF model folders.
Optimizer shards are saved by :mod:`r1fast.policy.optim` (``optim_state_dict``: each rank its
own distributed-optimizer shard, no gather)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from r1fast.atomic import fsync_dir, sync_tree


def model_state(policy) -> dict[str, torch.Tensor]:
    """This rank's model chunk (tensors only, cloned out of megatron's contiguous buffers)."""
    return {k: v.detach().clone() for k, v in policy.gpt.state_dict().items()
            if isinstance(v, torch.Tensor)}


def load_model_state(policy, source: Any, optimizer=None) -> None:
    """Load weights from a :func:`model_state` dict, an r1fast checkpoint folder, or a Hugging
    Face folder (safetensors, sharded onto this rank's layout). Pass the policy's ``optimizer``
    so megatron re-copies its fp32 master weights from the new values."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_dir():
            raise ValueError(f"initial weights {path} do not exist (run.init_from / init_from "
                             f"must be a Hugging Face folder or an r1fast checkpoint folder)")
        if (path / "config.json").is_file():
            from r1fast.policy.hf_checkpoint import load_hf_checkpoint

            load_hf_checkpoint(policy, path)
            if optimizer is not None:
                optimizer.reload_model_params()
            return
        from r1fast.train.checkpoint import load_checkpoint

        state, _ = load_checkpoint(path)
        if (path / "policy").is_dir():  # distributed checkpoint: any layout
            from r1fast.policy.dist_ckpt import load_sharded

            load_sharded(policy, None, path / "policy")
            if optimizer is not None:
                optimizer.reload_model_params()
            return
        source = state["model"]
    own = policy.gpt.state_dict()
    missing = [k for k, v in own.items() if isinstance(v, torch.Tensor) and k not in source]
    unexpected = [k for k in source if k not in own]
    if missing or unexpected:
        raise ValueError(f"model state does not match this policy: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for k, v in own.items():
            if isinstance(v, torch.Tensor):
                if v.shape != source[k].shape:
                    raise ValueError(f"model state '{k}': shape {list(source[k].shape)} != "
                                     f"{list(v.shape)} (was it saved at another layout?)")
                v.copy_(source[k])
    if optimizer is not None:
        optimizer.reload_model_params()


def copy_weights(src, dst) -> None:
    """dst <- src for two policies with the same layout (e.g. the KL reference)."""
    load_model_state(dst, model_state(src))


def save_model(policy, tokenizer, path: str | Path) -> Path:
    """A self-contained model folder: HF safetensors + config.json, r1fast_config.json, the
    tokenizer and generation_config.json (the tokenizer folder's, sampling defaults included,
    with its stop ids, so HF ``generate`` and vLLM stop where r1fast's sampler does).
    Collective; rank 0 writes, under a temporary name, then renames."""
    import json
    import os
    import shutil

    import torch.distributed as dist

    from r1fast.policy import save_hf_checkpoint

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    save_hf_checkpoint(policy, str(tmp))
    if rank == 0:
        tokenizer.save(tmp)
        stops = [int(t) for t in tokenizer.stop_ids]
        # the model's own sampling defaults stay (vLLM applies them); the stop ids are ours
        gen = {**getattr(tokenizer, "generation_config", {}),
               "eos_token_id": stops if len(stops) > 1 else stops[0],
               "pad_token_id": int(tokenizer.pad_id)}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=1))
        # and the tokenizer's ids in config.json, where some tools read them (they were absent)
        config = json.loads((tmp / "config.json").read_text())
        bos = getattr(tokenizer, "bos_id", None)
        config.update(bos_token_id=None if bos is None else int(bos),
                      eos_token_id=int(tokenizer.eos_id), pad_token_id=int(tokenizer.pad_id))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        sync_tree(tmp)  # durable before the rename publishes it
        old = path.with_name(path.name + ".old")
        if path.exists():  # set aside, not deleted, until the new folder is in place
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old.exists():
            shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()
    return path


def keep_mtp_of_init(policy, init_from: str | None, what: str) -> None:
    """MTP layers (DeepSeek-V3) are not built, so checkpoints do not hold them: an HF folder
    written from ``policy`` takes them, unchanged, from its run's ``init_from``
    (:func:`~r1fast.policy.hf_checkpoint.keep_mtp_from`); a WARNING (``what`` says whose)
    when that folder is gone."""
    import logging

    from r1fast.policy.hf_checkpoint import keep_mtp_from

    if not policy.model_cfg.mtp_layers:
        return
    log = logging.getLogger("r1fast.train")
    if init_from and Path(init_from, "config.json").is_file():
        if not keep_mtp_from(policy, init_from):
            log.info("%s: init_from=%s holds no MTP tensors (transformers saves none); the HF "
                     "folder has none either", what, init_from)
        return
    log.warning("%s: the model has mtp_layers=%d but the run's init_from=%s is gone, so the "
                "HF folder has NO multi-token-prediction tensors although its config counts "
                "them; copy them from the original checkpoint if you need them", what,
                policy.model_cfg.mtp_layers, init_from)

