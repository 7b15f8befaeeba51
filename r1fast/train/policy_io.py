"""Moving a policy's state in and out: weights, optimizer shards, and a decoder for sampling.

Checkpoints hold, per rank, the tensors of its model chunk and of its optimizer shard. Megatron's
distributed optimizer keeps the fp32 master weights and Adam moments sharded over data-parallel
ranks and leaves them out of ``state_dict()`` (it has a separate, collective save path); here
each rank saves its own shard directly, keyed by parameter name, so a resume on the same layout
restores every bit without any gather.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def _chained(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _param_names(policy) -> dict[int, str]:
    return {id(p): n for n, p in policy.gpt.named_parameters()}


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
        if (path / "config.json").is_file():
            from r1fast.policy.hf_checkpoint import load_hf_checkpoint

            load_hf_checkpoint(policy, path)
            if optimizer is not None:
                optimizer.reload_model_params()
            return
        from r1fast.train.checkpoint import load_checkpoint

        state, _ = load_checkpoint(path)
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


def optimizer_state(optimizer, scheduler) -> dict[str, Any]:
    """This rank's optimizer: each chained optimizer's state_dict plus, for distributed
    optimizers, the local shard of master weights and moments keyed by parameter name."""
    parts = []
    for opt in _chained(optimizer):
        entry = {"state_dict": opt.state_dict()}
        if hasattr(opt, "model_param_group_index_map"):  # megatron DistributedOptimizer
            names = {id(p): n for model in opt.model_chunks
                     for n, p in model.module.named_parameters()}
            entry["shards"] = {names[id(p)]: {k: v.detach().clone() for k, v in
                                              opt._get_main_param_and_optimizer_states(p).items()}
                               for p in opt.model_param_group_index_map}
        parts.append(entry)
    return {"optimizers": parts, "scheduler": scheduler.state_dict()}


@torch.no_grad()
def load_optimizer_state(optimizer, scheduler, state: dict[str, Any]) -> None:
    chain = _chained(optimizer)
    if len(chain) != len(state["optimizers"]):
        raise ValueError(f"optimizer state has {len(state['optimizers'])} parts, this optimizer "
                         f"{len(chain)}")
    for opt, entry in zip(chain, state["optimizers"]):
        opt.load_state_dict(entry["state_dict"])
        if "shards" in entry:
            params = {n: p for model in opt.model_chunks for n, p in model.module.named_parameters()}
            for name, tensors in entry["shards"].items():
                _set_shard(opt, params[name], tensors)
            opt._copy_main_params_to_model_params()
    scheduler.load_state_dict(state["scheduler"])


def _set_shard(opt, model_param, tensors: dict[str, torch.Tensor]) -> None:
    """Restore one parameter's master shard and Adam state. Megatron's own setter copies into
    the state its ``load_state_dict`` allocated, where one ``step`` tensor is shared by every
    parameter (torch Adam then advances it once per parameter); give each its own tensors."""
    if opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        opt._set_main_param_and_optimizer_states(model_param, tensors)
        return
    group, order = opt.model_param_group_index_map[model_param]
    main = opt.optimizer.param_groups[group]["params"][order]
    main.copy_(tensors["param"])
    opt.optimizer.state[main] = {k: v.clone() for k, v in tensors.items() if k != "param"}


class PolicyDecoder:
    """The sampler's view of a policy (see :class:`r1fast.rollout.sampler.Decoder`).

    Each step runs the policy on the whole prefix and keeps the logits of the new positions:
    exact and simple, quadratic in length. It works at every TP/EP/PP layout (logits are
    gathered over TP and broadcast from the last pipeline stage).
    """

    def __init__(self, policy):
        self.policy = policy
        self.buf: torch.Tensor | None = None

    def reset(self, batch_size: int, max_len: int) -> None:
        self.buf = torch.zeros(batch_size, max_len, dtype=torch.long)

    def step(self, tokens: torch.Tensor, offset: int) -> torch.Tensor:
        n = tokens.shape[1]
        self.buf[:, offset: offset + n] = tokens.cpu()
        logits = self.policy.logits(self.buf[:, : offset + n])  # [B, offset + n, V]
        return logits[:, offset: offset + n].float().cpu()
