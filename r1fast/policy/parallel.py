"""Process layout: start torch.distributed and megatron-core's parallel state from a
:class:`~r1fast.policy.config.ParallelConfig`.

Ranks are arranged in megatron's default order ``tp-cp-ep-dp-pp``: neighbouring ranks share a
tensor-parallel group, pipeline stages are the slowest-varying coordinate. The backend is NCCL
with CUDA and gloo without. :func:`init_parallel` is the one place that installs the megatron
adapters (:func:`r1fast.megatron_compat.install`: the CPU bridges when CUDA is absent), right
after torch.distributed starts and before megatron builds anything. Under ``torchrun`` the usual
environment variables are read; a single process with no environment initialises a one-rank
group whose store binds a local port the OS picks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from r1fast.megatron_compat import install as install_megatron_compat
from r1fast.policy.config import ModelConfig, ParallelConfig

_LAYOUT: Optional[tuple[int, int, int]] = None  # (tp, pp, ep) megatron was initialised with
_HOST_GROUP: Optional[Any] = None  # gloo over every rank, made by host_group() when needed


@dataclass(frozen=True)
class ParallelInfo:
    """Where this process sits in the layout."""

    world_size: int
    """Total processes."""
    rank: int
    """Global rank."""
    tp: int
    """Tensor parallel size."""
    pp: int
    """Pipeline parallel size."""
    ep: int
    """Expert parallel size."""
    dp: int
    """Data parallel size (dense parameters)."""
    tp_rank: int
    """Rank inside the tensor parallel group."""
    pp_rank: int
    """Pipeline stage of this rank."""
    ep_rank: int
    """Rank inside the expert parallel group."""
    dp_rank: int
    """Rank inside the data parallel group."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def dist_timeout_s() -> float:
    """Seconds a collective may wait: ``R1FAST_DIST_TIMEOUT_S``, else 600."""
    raw = os.environ.get("R1FAST_DIST_TIMEOUT_S", "600")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:  # NaN too
        raise ValueError(f"R1FAST_DIST_TIMEOUT_S must be a number of seconds > 0, got {raw!r}")
    return value


_TIMEOUT_S: Optional[float] = None
"""The default group's collective timeout as :func:`init_distributed` set it (None: not set
here): megatron's groups and the gloo host group get the same."""


def group_timeout() -> timedelta:
    """How long a collective of any group r1fast makes may wait: the default group's."""
    return timedelta(seconds=_TIMEOUT_S if _TIMEOUT_S is not None else dist_timeout_s())


def init_distributed(backend: Optional[str] = None, timeout_s: Optional[float] = None) -> None:
    """Initialise the default process group if it is not yet (idempotent). ``timeout_s``: how
    long a collective may wait (default ``R1FAST_DIST_TIMEOUT_S``, else 600 s; a checkpoint
    of a 671B run on a slow filesystem keeps the other ranks at a barrier for longer)."""
    global _TIMEOUT_S
    if dist.is_initialized():
        return
    timeout_s = dist_timeout_s() if timeout_s is None else timeout_s
    _TIMEOUT_S = timeout_s
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=timeout_s)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        # port 0: the store binds a port the OS picks (a port found free and bound later
        # could be taken in between); a store object, as tcp://...:0 needs torch >= 2.8
        store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)


def expected_world_size() -> int:
    """Processes of this run: torch.distributed's once it is up, else torchrun's ``WORLD_SIZE``
    (1 without it), so that a layout can be checked before anything starts."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_layout(parallel: ParallelConfig, model: Optional[ModelConfig] = None
                 ) -> ParallelConfig:
    """``parallel`` at this run's world size, validated for ``model`` (a ValueError naming the
    field); cheap: no process group, no megatron (trainers call it before building anything)."""
    world = expected_world_size()
    if parallel.world_size is not None and parallel.world_size != world:
        raise ValueError(f"parallel.world_size={parallel.world_size}, but torch.distributed has "
                         f"{world} process(es) (torchrun --nproc-per-node x --nnodes / "
                         f"WORLD_SIZE); set it to {world} or leave it out")
    return ParallelConfig(**{**parallel.__dict__, "world_size": world}).validate(model)


def init_parallel(parallel: ParallelConfig, model: Optional[ModelConfig] = None, seed: int = 0,
                  backend: Optional[str] = None) -> ParallelInfo:
    """Start torch.distributed and megatron's parallel state for ``parallel`` and seed the
    model-parallel RNG streams. Idempotent for the same layout; a different layout while one is
    active raises ``ValueError`` (call :func:`destroy_parallel` first)."""
    global _LAYOUT
    init_distributed(backend)
    install_megatron_compat()  # after the process group: its WARNING line is rank 0's only
    parallel = check_layout(parallel, model)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    layout = (parallel.tp, parallel.pp, parallel.ep)
    if ps.model_parallel_is_initialized():
        if _LAYOUT is not None and _LAYOUT != layout:
            raise ValueError(f"init_parallel: megatron is already initialised with (tp, pp, ep) = "
                             f"{_LAYOUT}, asked for {layout}; call destroy_parallel() first")
    else:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp,
            pipeline_model_parallel_size=parallel.pp,
            expert_model_parallel_size=parallel.ep,
            expert_tensor_parallel_size=parallel.etp,
            # megatron's groups (TP, DP, EP, their gloo twins) waited its 30-minute default
            distributed_timeout_minutes=group_timeout().total_seconds() / 60,
        )
        _LAYOUT = layout
    model_parallel_cuda_manual_seed(seed)
    return parallel_info()


def parallel_info() -> ParallelInfo:
    """The layout of the initialised megatron parallel state."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("parallel_info: call init_parallel() first")
    return ParallelInfo(
        world_size=dist.get_world_size(), rank=dist.get_rank(),
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        ep=ps.get_expert_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def host_group() -> Optional[Any]:
    """The group for object collectives that carry tensors (an HF export's weights): over
    NCCL, ``gather_object`` stages every rank's pickled bytes on the destination's GPU (world
    x the largest object: ~83 GB for Qwen3-30B's export on 8 ranks), so they go over a gloo
    group made once (collective at that first call); None (the default group) when the
    default group is gloo already."""
    global _HOST_GROUP
    if dist.get_backend() == "gloo":
        return None
    if _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo", timeout=group_timeout())
    return _HOST_GROUP


def all_ranks_object(obj: Any) -> list:
    """``obj`` of every rank, in rank order (collective; ``[obj]`` without a process group):
    small picklable values such as names, shapes and per-problem scores, sent over
    :func:`host_group`, so nothing is staged on a GPU."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=host_group())
    return out


def exchange_objects(outgoing: list, group, rank: int) -> list:
    """Objects between the ranks of ``group`` (None: the default group): ``outgoing[r]`` goes
    to rank r, this rank's own stays here unpickled; returns what each rank sent here, in rank
    order (collective: one scatter per rank)."""
    received = []
    for src in range(len(outgoing)):
        box: list = [None]
        sent = [None if r == rank else o for r, o in enumerate(outgoing)]
        src_global = src if group is None else dist.get_global_rank(group, src)
        dist.scatter_object_list(box, sent if src == rank else None, src=src_global, group=group)
        received.append(outgoing[rank] if src == rank else box[0])
    return received


def destroy_parallel(destroy_process_group: bool = True) -> None:
    """Tear down megatron's parallel state (and the default process group)."""
    global _LAYOUT, _HOST_GROUP, _TIMEOUT_S
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    _LAYOUT = None
    if destroy_process_group:
        _HOST_GROUP = _TIMEOUT_S = None
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()


def mark_expert_params(gpt: torch.nn.Module) -> None:
    """Flag routed-expert weights expert-parallel (``allreduce=False``: reduced over the
    expert-DP group) at any EP; megatron does it only for EP > 1. Under sequence parallelism
    each TP rank's experts see only its tokens, so their gradients must be summed over expert
    DP (which spans the TP ranks); at EP = 1, expert DP = TP x DP, so this is exact there too."""
    for name, p in gpt.named_parameters():
        if ".mlp.experts." in name:
            p.allreduce = False
