"""The ``torch`` that megatron's CUDA-naming modules see on a CPU box.

megatron-core allocates with ``device="cuda"`` or ``device=torch.cuda.current_device()``,
creates side streams and events (``torch.cuda.Stream``, ``record_event``, ``wait_stream``) and
seeds the CUDA generator. None of that changes the math; it only names a device. So instead of
editing megatron, each module listed in :data:`CUDA_NAMING_MODULES` gets its *global name*
``torch`` rebound to :data:`TORCH_ON_CPU`, an instance of :class:`TorchOnCPU`: a module object
that forwards every attribute to the real ``torch`` except

- ``torch.cuda`` (:class:`_CudaOnCPU`): the current device is the CPU, streams and events are
  no-ops (CPU work is synchronous), and the generator calls go to the CPU generator;
- the tensor factories in :data:`_FACTORIES`: ``device="cuda"`` (or a CUDA ordinal) becomes the
  CPU.

The real ``torch`` module, its classes and every other module keep their own ``torch``: the
rebinding is visible only to code *defined in* the listed megatron modules.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import types
from typing import Any, Callable

import torch

from r1fast.megatron_compat.versions import require


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)  # an int names a CUDA ordinal


class _NullEvent:
    """Stands in for torch.cuda.Event: CPU work is synchronous, so there is nothing to wait on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: "_NullEvent") -> float:
        return 0.0


class _NullStream:
    """Stands in for torch.cuda.Stream (same reason as :class:`_NullEvent`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _NullEvent:
        return event if event is not None else _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other: object) -> bool:  # one CPU "stream": every stream is the current one
        return isinstance(other, _NullStream)

    def __hash__(self) -> int:
        return 0


_CPU = torch.device("cpu")
_NULL_STREAM = _NullStream()


class _CudaOnCPU:
    """``torch.cuda`` as seen by megatron on a CPU box: the current device is the CPU."""

    Stream = _NullStream
    Event = _NullEvent

    @staticmethod
    def current_device() -> torch.device:
        return _CPU

    @staticmethod
    def current_stream(device: Any = None) -> _NullStream:
        return _NULL_STREAM

    @staticmethod
    def default_stream(device: Any = None) -> _NullStream:
        return _NULL_STREAM

    @staticmethod
    def stream(s: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @staticmethod
    def synchronize(device: Any = None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    # The CUDA generator's role (dropout/init streams of the RNG tracker) is played by the CPU
    # generator; tensor_parallel/random.py calls these in model_parallel_cuda_manual_seed.
    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


_FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn",
              "randint", "zeros_like", "ones_like", "empty_like", "full_like")


def _cpu_factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return fn(*args, **kwargs)
    return wrapper


class TorchOnCPU(types.ModuleType):
    """The ``torch`` name inside a bridged megatron module. Everything forwards to torch
    (and is cached on first use), except ``cuda`` and the factories listed in _FACTORIES."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CudaOnCPU()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        setattr(self, name, value)
        return value


TORCH_ON_CPU = TorchOnCPU()

# Module -> what its CUDA assumptions are (all are served by the proxy above).
CUDA_NAMING_MODULES = {
    "megatron.core.tensor_parallel.random":
        "model_parallel_cuda_manual_seed / CudaRNGStatesTracker.add: torch.cuda.manual_seed, "
        "get_rng_state",
    "megatron.core.tensor_parallel.mappings":
        "_gather_along_*/_reduce_scatter_*/_AllToAll: torch.empty(device=current_device())",
    "megatron.core.tensor_parallel.layers":
        "ColumnParallelLinear/RowParallelLinear/VocabParallelEmbedding: device=current_device()",
    "megatron.core.models.common.embeddings.rotary_pos_embedding":
        "RotaryEmbedding.__init__/forward/get_freqs: .to(torch.cuda.current_device())",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding":
        "YarnRotaryEmbedding.__init__ (MLA with YaRN): inv_freq .to(current_device())",
    "megatron.core.models.gpt.gpt_model":
        "GPTModel._preprocess: sequence_len_offset tensor on current_device()",
    "megatron.core.transformer.attention":
        "Attention._allocate_memory: static KV cache on current_device()",
    "megatron.core.transformer.moe.router":
        "Router.gating / TopKRouter.__init__: weights and expert-bias buffers on current_device()",
    "megatron.core.transformer.moe.token_dispatcher":
        "MoEAlltoAllTokenDispatcher: torch.cuda.Stream/stream/current_stream/record_event",
    "megatron.core.transformer.moe.moe_utils":
        "save_to_aux_losses_tracker: torch.zeros(device='cuda')",
    "megatron.core.transformer.moe.experts":
        "GroupedMLP weights on current_device()",
    "megatron.core.pipeline_parallel.schedules":
        "forward_backward_*: total_num_tokens = torch.zeros(device='cuda')",
    "megatron.core.pipeline_parallel.p2p_communication":
        "_communicate_shapes/_communicate: shape tensors on current_device(), "
        "torch.cuda.synchronize",
    "megatron.core.optimizer.clip_grads":
        "get_grad_norm_fp32 / clip_grad_by_total_norm_fp32 / count_zeros_fp32: device='cuda'",
    "megatron.core.optimizer.optimizer":
        "MegatronOptimizer/MixedPrecisionOptimizer: found_inf, _scale_one on device='cuda'",
    "megatron.core.optimizer.distrib_optimizer":
        "DistributedOptimizer: buffers on current_device()",
    "megatron.core.distributed.param_and_grad_buffer":
        "_ParamAndGradBucketGroup: communication stream, buffers on current_device()",
    "megatron.core.distributed.distributed_data_parallel":
        "DistributedDataParallel.__init__: torch.cuda.Stream for overlapped communication",
    "megatron.core.distributed.finalize_model_grads":
        "finalize_model_grads: num_tokens scaling tensors",
    "megatron.core.utils":
        "GlobalMemoryBuffer.get_tensor / local_multi_tensor_l2_norm: device='cuda'",
    "megatron.core.transformer.utils":
        "get_default_causal_mask / get_sliding_window_causal_mask: torch.ones(device='cuda')",
    "megatron.core.transformer.module":
        "MegatronModule.get_layer_static_inputs: device=current_device()",
    "megatron.core.transformer.transformer_layer":
        "TransformerLayer.get_layer_static_inputs: .to(current_device())",
    "megatron.core.transformer.dot_product_attention":
        "DotProductAttention.__init__ (softmax offset params): device=current_device()",
    "megatron.core.transformer.moe.shared_experts":
        "SharedExpertMLP: torch.cuda.Stream for overlapped shared experts",
    "megatron.core.tensor_parallel.utils":
        "split/gather_tensor_into_1d_equal_chunks: device=current_device()",
    "megatron.core.tensor_parallel.data":
        "broadcast_data: torch.tensor(device='cuda')",
    "megatron.core.optimizer.grad_scaler":
        "ConstantGradScaler/DynamicGradScaler (fp16 training): device='cuda'",
    "megatron.core.pipeline_parallel.utils":
        "ScheduleNode streams (combined 1F1B): torch.cuda.Stream/current_stream",
    "megatron.core.dist_checkpointing.strategies.filesystem_async":
        "FileSystemWriterAsync.preload_tensors (distributed checkpoint save): "
        "torch.cuda.synchronize",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver":
        "save_state_dict_async_finalize: failure flag on torch.cuda.current_device()",
    "megatron.core.dist_checkpointing.strategies.async_utils":
        "AsyncRequest.execute_sync / AsyncCallsQueue: torch.cuda.synchronize, flags on "
        "current_device()",
}


def bridge_torch_names() -> None:
    """Point the global name ``torch`` of every module in :data:`CUDA_NAMING_MODULES` at the
    proxy (a module that no longer has that global raises through :func:`require`)."""
    for modname in CUDA_NAMING_MODULES:
        mod = importlib.import_module(modname)
        require(mod, "torch")
        mod.torch = TORCH_ON_CPU
