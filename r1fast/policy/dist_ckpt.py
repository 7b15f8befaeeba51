"""Layout-free checkpoints of the policy and its optimizer, through megatron-core's distributed
checkpointing (``megatron.core.dist_checkpointing``, the torch_dist backend).

Every parameter is saved as a ``ShardedTensor``: this rank's piece of one *global* tensor, with
its offset in it (the TP slice, the expert index under EP, the global layer number under PP).
The optimizer's fp32 master weights and Adam moments are saved the same way, in model space
(megatron's ``fully_reshardable`` format of the distributed optimizer), so a checkpoint written
at one TP/PP/EP/DP layout loads at any other: each loading rank reads exactly the global slices
its own layout needs. Nothing is gathered on one rank except the distributed optimizer's
per-bucket DP shards, which megatron all-gathers within the DP group (over gloo on a CPU box).

Usage::

    save_sharded(policy, optimizer, folder)            # collective, every rank
    load_sharded(policy, optimizer, folder)            # same or another layout
    load_sharded(policy, None, folder)                 # weights only (export, init_from)

The folder is megatron's format (``metadata.json``, ``common.pt``, ``__<r>_<i>.distcp``);
atomic commit, checksums and the step counter are :mod:`r1fast.train.checkpoint`'s job.

Two things megatron-core 0.16 does not do for a plain torch Adam (no Apex, no Transformer Engine,
the optimizer r1fast builds) are done here, each where it happens:

- ``state_dict`` needs every parameter to have Adam state; an optimizer that has not stepped yet
  gets torch's initial state first (zero moments, step 0), which is what its first step makes.
- loading the ``fully_reshardable`` parameter state copies every entry of the live Adam state,
  including ``step``, from a source that (by design) has no ``step``; the step is set from the
  common state first, then the per-parameter tensors are loaded with ``step`` set aside, then
  each parameter gets its own copy of it back (torch Adam increments it in place).
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from r1fast.policy.optim import _init_unstepped_adam, _sub_optimizers
from r1fast.policy.parallel import all_ranks_object

# megatron's format of the distributed optimizer state that reshards over TP/PP/EP/DP
OPTIM_FORMAT = "fully_reshardable"


def _optim_metadata() -> dict[str, Any]:
    return {
        "distrib_optim_sharding_type": OPTIM_FORMAT,
        # gloo gathers to DP rank 0 on the host; NCCL all-gathers on the device. On a CPU box
        # only the first exists (the second moves tensors with .cuda()).
        "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available(),
        # key the dense and expert optimizers' state by parameter, not by their position in
        # the chain: another layout may chain them differently
        "chained_optim_avoid_prefix": True,
    }


@contextlib.contextmanager
def _quiet_deprecations():
    """torch.distributed.checkpoint warns, on every save and load, that megatron still uses its
    deprecated ShardedTensor and ``load_state_dict``: library internals, nothing a user can
    act on, so those two FutureWarnings are not shown (every other warning is)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Please use DTensor instead",
                                category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*`load_state_dict` is deprecated",
                                category=FutureWarning)
        yield


def _ensure_adam_state(optimizer) -> None:
    for opt in _sub_optimizers(optimizer):
        _init_unstepped_adam(getattr(opt, "optimizer", None))


def _drop_empty_param_state(common: dict) -> dict:
    """With the gloo gather only DP rank 0 holds the optimizer's ``param_state``; the others
    hold None. megatron compares every rank's common state with rank 0's before saving and
    would warn about that expected difference; compare without it."""
    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items()
                    if not (k == "param_state" and v is None)}
        return obj
    return strip(common)


def model_sharded_state(policy, extra: Optional[Mapping[str, torch.Tensor]] = None) -> dict:
    """The GPT chunk's sharded state dict, plus ``extra`` parameters that train with it outside
    the chunk (a reward model's head), each whole and replicated over TP and DP."""
    from megatron.core.utils import make_sharded_tensor_for_checkpoint

    model = policy.gpt.sharded_state_dict()
    for key, param in (extra or {}).items():
        if key in model:
            raise ValueError(f"extra checkpoint parameter {key!r} clashes with the model's")
        model[key] = make_sharded_tensor_for_checkpoint(param, key)
    return model


def sharded_state(policy, optimizer, *, is_loading: bool,
                  extra: Optional[Mapping[str, torch.Tensor]] = None) -> dict:
    """The sharded state dict of this rank: ``{"model": ..., "optimizer": ...}`` (no optimizer
    entry when ``optimizer`` is None); ``extra``: see :func:`model_sharded_state`."""
    model = model_sharded_state(policy, extra)
    state = {"model": model}
    if optimizer is not None:
        _ensure_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(model, is_loading=is_loading,
                                                          metadata=_optim_metadata())
    return state


def save_sharded(policy, optimizer, folder: str | Path,
                 extra: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Write this rank's pieces of the model (and optimizer, and ``extra`` parameters: see
    :func:`model_sharded_state`) into ``folder``; collective."""
    from megatron.core import dist_checkpointing

    from r1fast.megatron_compat import results_queue

    results_queue.install()  # megatron's writer Manager, stopped with this process
    folder = Path(folder)
    if (not dist.is_initialized() or dist.get_rank() == 0):
        folder.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    with _quiet_deprecations():
        dist_checkpointing.save(sharded_state(policy, optimizer, is_loading=False, extra=extra),
                                str(folder),
                                preprocess_common_before_consistancy_check=_drop_empty_param_state)


def load_sharded(policy, optimizer: Optional[Any], folder: str | Path,
                 extra: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Load ``folder`` (written by :func:`save_sharded` at any layout) into this rank's model
    chunk (and ``extra`` parameters) and, when given, its optimizer shard; collective. A key
    of this model missing from the checkpoint, or one the checkpoint has and this model
    lacks, is an error."""
    from megatron.core import dist_checkpointing

    check_same_model(policy, folder, extra)
    template = sharded_state(policy, optimizer, is_loading=True, extra=extra)
    with _quiet_deprecations():
        if optimizer is not None:
            loaded = dist_checkpointing.load(template, str(folder), strict="raise_all")
        else:  # weights only: the checkpoint's optimizer state is expected and skipped
            # megatron's names: "missing" = in the checkpoint, not asked for; "unexpected" =
            # asked for, not in the checkpoint
            loaded, unknown, absent = dist_checkpointing.load(template, str(folder),
                                                              strict="return_all")
            unknown = sorted(k for k in unknown if not k.startswith("optimizer."))
            if unknown or absent:
                raise ValueError(f"checkpoint {folder} does not match this model: it lacks "
                                 f"{sorted(absent)[:5]}, and holds unknown {unknown[:5]}")
    with torch.no_grad():
        for key, param in (extra or {}).items():
            param.copy_(loaded["model"].pop(key))
    result = policy.gpt.load_state_dict(loaded["model"], strict=False)
    bad = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if bad or result.unexpected_keys:
        raise ValueError(f"checkpoint {folder} does not match this model: missing {bad[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    if optimizer is not None:
        # the checkpoint's fp32 masters; megatron's reload_model_params would copy the other
        # way (16-bit weights -> masters: right for a weights-only load, a rounding of every
        # master here), so it is not called: the weights are those masters, already rounded
        _load_optimizer(optimizer, loaded["optimizer"])


def check_same_model(policy, folder: str | Path,
                     extra: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """One-line ValueError when the checkpoint in ``folder`` holds another model: a weight whose
    global shape differs, or weights only one side has, over all ranks' chunks (megatron would
    fail deep inside with every key listed); collective."""
    from megatron.core.dist_checkpointing import load_tensors_metadata
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    with _quiet_deprecations():
        saved = {k: tuple(v.global_shape) for k, v in load_tensors_metadata(str(folder)).items()
                 if not k.startswith("optimizer.")}
    model = model_sharded_state(policy, extra)
    apply_factories(model)
    wanted = {v.key: tuple(v.global_shape) for v in nested_values(model)
              if isinstance(v, ShardedTensor)}
    for part in all_ranks_object(wanted):  # pipeline stages hold other layers
        wanted.update(part)
    shapes = [f"{k} is {list(saved[k])} there and {list(wanted[k])} here"
              for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]]
    only_here = sorted(set(wanted) - set(saved))
    only_there = sorted(set(saved) - set(wanted))
    if shapes or only_here or only_there:
        parts = ([f"shape of {shapes[0]}"] if shapes else []) + \
            ([f"it lacks {only_here[:3]}"] if only_here else []) + \
            ([f"it holds unknown {only_there[:3]}"] if only_there else [])
        raise ValueError(f"checkpoint {folder} does not match this model ({len(shapes)} shape "
                         f"difference(s), {len(only_here)} missing, {len(only_there)} unknown "
                         f"weight(s)): {'; '.join(parts)}")


def _load_optimizer(optimizer, state: Any) -> None:
    subs = _sub_optimizers(optimizer)
    states = [state] if len(subs) == 1 else [state[k] for k in sorted(state)]
    if len(states) != len(subs):
        raise ValueError(f"checkpoint holds {len(states)} optimizers, this layout chains "
                         f"{len(subs)}")
    for opt, st in zip(subs, states):
        param_state = st.pop("param_state", None) if isinstance(st, dict) else None
        opt.load_state_dict(st)  # param groups, step, scaler; moments are placeholders here
        inner = opt.optimizer
        steps = {id(p): s.pop("step") for p, s in inner.state.items() if "step" in s}
        if param_state is not None:
            opt.load_parameter_state_from_fully_reshardable(param_state)
        for p, s in inner.state.items():
            if id(p) in steps:
                s["step"] = steps[id(p)].detach().clone()  # one tensor per parameter
    if hasattr(optimizer, "_synchronize_steps"):
        optimizer._synchronize_steps()
