"""Measuring a built policy, to hold the planner's formulas to the real thing.

- :func:`measure_state_bytes`: parameters, DDP gradient buffers, the optimizer's fp32 master
  copies and Adam state a rank really holds (the planner's ``param_bytes``, ``grad_bytes``,
  ``master_bytes``, ``adam_bytes``).
- :func:`measure_saved_bytes`: every distinct storage autograd saved for backward while a
  function ran (the forward's total).
- :func:`measure_peak_saved_bytes`: the most bytes of saved storages alive at once while a
  function ran, e.g. a whole forward-backward. This is the activation peak: without
  recompute it equals the forward's total (the backward only frees), with full recompute it
  is the kept layer inputs plus one re-run layer, as the planner's
  :func:`~r1fast.plan.activations.stage_activation_bytes` predicts.

- :func:`measure_peak_alloc_bytes`: the most bytes of storages created while a function ran
  that are alive at once: every tensor an op makes, not only what autograd saves, so it also
  measures no-grad forwards (the rollout's prefill, the planner's ``prefill_bytes``).

Both saved-tensor measurements use ``torch.autograd.graph.saved_tensors_hooks`` and count each
storage once (a view saved twice is one storage). The peak tracks liveness exactly: the pack
hook wraps each saved tensor in a small holder that autograd owns, and a ``weakref.finalize``
on the holder runs when autograd releases it (CPython frees by reference count, so the
measurement is deterministic). Not counted: tensors no backward needs (gradients, the
forward's temporaries), which is what "activations" means in the plan.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable


def measure_state_bytes(policy, optimizer=None) -> dict[str, int]:
    """What a built policy (and its megatron optimizer, after a step) really holds on this rank:
    ``params`` (sum of numel * element size), ``grads`` (DDP grad buffers), ``master`` (fp32
    copies the optimizer owns) and ``adam`` (its state tensors). The planner's counterparts are
    ``param_bytes``, ``grad_bytes``, ``master_bytes`` and ``adam_bytes``."""
    import torch

    params = list(policy.gpt.parameters())
    own = {p.untyped_storage().data_ptr() for p in params}
    out = {"params": sum(p.numel() * p.element_size() for p in params), "grads": 0,
           "master": 0, "adam": 0}
    module = policy.module
    for buf in list(getattr(module, "buffers", [])) + list(
            getattr(module, "expert_parallel_buffers", [])):
        out["grads"] += buf.grad_data.numel() * buf.grad_data.element_size()
    if optimizer is not None:
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            inner = getattr(opt, "optimizer", opt)
            for group in inner.param_groups:
                for p in group["params"]:
                    if p.untyped_storage().data_ptr() not in own:  # not a view of the model
                        out["master"] += p.numel() * p.element_size()
                    for v in inner.state.get(p, {}).values():
                        if isinstance(v, torch.Tensor) and v.dim() > 0:  # not the step count
                            out["adam"] += v.numel() * v.element_size()
    return out


def measure_saved_bytes(fn: Callable[[], Any], exclude: Iterable = ()) -> tuple[Any, int]:
    """Run ``fn()`` and return (its result, bytes of the distinct storages autograd saved for
    backward meanwhile), ignoring the storages of the tensors in ``exclude`` (the parameters).
    The planner's counterpart is ``activation_bytes["none"]`` (a forward's total)."""
    import torch

    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in skip:
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(seen.values())


class _Held:
    """What autograd stores in place of a saved tensor while the peak is measured."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor) -> None:
        self.tensor = tensor


def measure_peak_saved_bytes(fn: Callable[[], Any],
                             exclude: Iterable = ()) -> tuple[Any, int, int]:
    """Run ``fn()`` (e.g. a forward-backward) and return (its result, the peak bytes of saved
    storages alive at once, the bytes still alive when ``fn`` returned), ignoring the storages
    of the tensors in ``exclude`` (the parameters). See the module docstring."""
    import torch

    skip = {t.untyped_storage().data_ptr() for t in exclude}
    live: dict[int, list[int]] = {}  # storage -> [holders alive, bytes]
    total = [0, 0]  # [alive now, peak]

    def release(key: int) -> None:
        entry = live[key]
        entry[0] -= 1
        if entry[0] == 0:
            total[0] -= entry[1]
            del live[key]

    def pack(t):
        held = _Held(t)
        key = t.untyped_storage().data_ptr()
        if key in skip:
            return held
        if key in live:
            live[key][0] += 1
        else:
            live[key] = [1, t.untyped_storage().nbytes()]
            total[0] += live[key][1]
            total[1] = max(total[1], total[0])
        weakref.finalize(held, release, key)
        return held

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda held: held.tensor):
        result = fn()
    return result, total[1], total[0]


def measure_peak_alloc_bytes(fn: Callable[[], Any]) -> tuple[Any, int, int]:
    """Run ``fn()`` and return (its result, the peak bytes of storages created meanwhile and
    alive at once, the bytes of those still alive when it returned).

    A ``TorchDispatchMode`` sees every op's outputs; a storage not seen before (by data
    pointer) counts its bytes until ``weakref.finalize`` on its Python object fires: torch
    keeps one Python object per storage for the storage's whole life, so the callback runs when
    the memory is freed. Storages that existed before (parameters, a cache written in place)
    and outputs that alias an input count nothing. Not seen: workspaces inside one kernel."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    live: dict[int, int] = {}  # data pointer -> bytes, storages made during fn and alive
    total = [0, 0]  # [alive now, peak]

    def release(key: int) -> None:
        total[0] -= live.pop(key)

    class _Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs or {}))
                      if isinstance(t, torch.Tensor)}
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in inputs or key in live or storage.nbytes() == 0:
                    continue
                live[key] = storage.nbytes()
                total[0] += live[key]
                total[1] = max(total[1], total[0])
                weakref.finalize(storage, release, key)
            return out

    with _Allocations():
        result = fn()
    return result, total[1], total[0]
