"""Bridges that let megatron-core run on a CPU-only box (gloo), and without Transformer Engine.

megatron-core assumes CUDA everywhere: it allocates with ``device="cuda"`` or
``torch.cuda.current_device()``, creates side streams and events, seeds a CUDA RNG tracker and
checks ``param.type() == "torch.cuda.FloatTensor"``. None of that changes the math; it only
names a device. This module rewires exactly those assumptions, and nothing else, so that the
same GPTModel/MoE/pipeline/optimizer code paths run under gloo on CPU and reproduce the
one-rank results bit for bit (see tests/policy/test_parallel_equivalence.py).

How. Each megatron module listed in :data:`_CUDA_NAMING_MODULES` gets its global name ``torch``
replaced by :class:`_TorchOnCPU`, a thin proxy that forwards every attribute to the real
``torch`` except: ``torch.cuda`` (current device is the CPU, streams/events are no-ops, RNG calls
go to the CPU generator) and the tensor factories (``device="cuda"`` becomes ``"cpu"``). The
real ``torch`` module is never modified, so other code in the process is unaffected. The
remaining bridges replace single megatron functions; each says which file/function it covers.

When. :func:`apply_megatron_bridges` is idempotent and applies the CPU bridges only when CUDA
is absent (on a GPU nothing here is touched), plus one bridge only when Transformer Engine is
absent (``te_general_gemm``, which megatron-core 0.16 leaves undefined then, CPU or GPU).

Version. The bridges name megatron internals, so they are pinned to
:data:`MEGATRON_CORE_TESTED` (a warning outside it; a clear error if a patched name is gone).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import types
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist

log = logging.getLogger("r1fast.policy")

MEGATRON_CORE_TESTED = ("0.16.0", "0.17.0")
"""[low, high) range of megatron-core versions these bridges were tested with (0.16.1 measured)."""

_APPLIED: set[str] = set()


def cuda_absent() -> bool:
    return not torch.cuda.is_available()


def te_absent() -> bool:
    return importlib.util.find_spec("transformer_engine") is None


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def check_megatron_version() -> str:
    """Return the installed megatron-core version; warn when outside the tested range."""
    try:
        from megatron.core import package_info
    except ImportError as e:  # pragma: no cover - megatron-core is a hard dependency
        raise ImportError("r1fast.policy needs megatron-core "
                          "(pip install 'megatron-core>=0.16,<0.17')") from e
    version = package_info.__version__
    lo, hi = MEGATRON_CORE_TESTED
    if not (_version_tuple(lo) <= _version_tuple(version) < _version_tuple(hi)):
        warnings.warn(f"megatron-core {version} is outside the range r1fast's CPU bridges were "
                      f"tested with [{lo}, {hi}); the policy may fail on CPU", RuntimeWarning,
                      stacklevel=2)
    return version


def _require(module: Any, name: str) -> Any:
    if not hasattr(module, name):
        raise RuntimeError(f"r1fast.policy.cpu_compat: megatron-core {module.__name__} has no "
                           f"{name!r}; this megatron-core version is not supported "
                           f"(tested range {MEGATRON_CORE_TESTED})")
    return getattr(module, name)


# --------------------------------------------------------------------------------------------
# 1. The torch proxy: CUDA device names -> CPU, streams/events -> no-ops.
# --------------------------------------------------------------------------------------------

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


class _TorchOnCPU(types.ModuleType):
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


_TORCH_ON_CPU = _TorchOnCPU()

# Module -> what its CUDA assumptions are (all are served by the proxy above).
_CUDA_NAMING_MODULES = {
    "megatron.core.tensor_parallel.random":
        "model_parallel_cuda_manual_seed / CudaRNGStatesTracker.add: torch.cuda.manual_seed, "
        "get_rng_state",
    "megatron.core.tensor_parallel.mappings":
        "_gather_along_*/_reduce_scatter_*/_AllToAll: torch.empty(device=current_device())",
    "megatron.core.tensor_parallel.layers":
        "ColumnParallelLinear/RowParallelLinear/VocabParallelEmbedding: device=current_device()",
    "megatron.core.models.common.embeddings.rotary_pos_embedding":
        "RotaryEmbedding.__init__/forward/get_freqs: .to(torch.cuda.current_device())",
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
}


def _bridge_torch_names() -> None:
    for modname in _CUDA_NAMING_MODULES:
        mod = importlib.import_module(modname)
        _require(mod, "torch")
        mod.torch = _TORCH_ON_CPU


# --------------------------------------------------------------------------------------------
# 2. RNG tracker: megatron.core.tensor_parallel.random.CudaRNGStatesTracker
# --------------------------------------------------------------------------------------------

def _bridge_rng_tracker() -> None:
    """tensor_parallel/random.py: CudaRNGStatesTracker keeps named *CUDA* generator states and
    swaps them in ``fork()``. On CPU the same bookkeeping is done on the CPU generator. The
    class is replaced by name so that initialize_rng_tracker()/model_parallel_cuda_manual_seed()
    build this one."""
    from megatron.core.tensor_parallel import random as mrandom

    base = _require(mrandom, "CudaRNGStatesTracker")
    if getattr(base, "_r1fast_cpu", False):
        return

    class CPURNGStatesTracker(base):  # type: ignore[misc, valid-type]
        _r1fast_cpu = True

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    mrandom.CudaRNGStatesTracker = CPURNGStatesTracker
    _require(mrandom, "_get_cuda_rng_state")
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # A tracker created before the bridge (e.g. by an import side effect) is of the CUDA class.
    mrandom.initialize_rng_tracker(force_reset=True)


# --------------------------------------------------------------------------------------------
# 3. param.type() == "torch.cuda.FloatTensor" checks and tensor.cuda() calls
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _cuda_tensor_methods():
    """While active, two Tensor methods behave on CPU tensors as megatron expects of CUDA
    ones: ``type()`` (no arguments) reports the CUDA type name that the optimizer asserts on,
    and ``cuda()`` returns the tensor itself. Only these forms change, only for the call."""
    original_type, original_cuda = torch.Tensor.type, torch.Tensor.cuda

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original_type(self)
            return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name
        return original_type(self, dtype, non_blocking, **kwargs)

    def cuda_(self, *args, **kwargs):
        return self if self.device.type == "cpu" else original_cuda(self, *args, **kwargs)

    torch.Tensor.type, torch.Tensor.cuda = type_, cuda_
    try:
        yield
    finally:
        torch.Tensor.type, torch.Tensor.cuda = original_type, original_cuda


def _with_cuda_tensor_methods(fn: Callable) -> Callable:
    if getattr(fn, "_r1fast_bridged", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _cuda_tensor_methods():
            return fn(*args, **kwargs)

    wrapper._r1fast_bridged = True  # type: ignore[attr-defined]
    return wrapper


def _bridge_tensor_methods() -> None:
    from megatron.core.models.common.language_module import language_module
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    # distrib_optimizer.py: DistributedOptimizer.__init__ and _build_model_and_main_param_groups
    # sort params by param.type() into fp16/bf16/fp32 groups and raise on anything else.
    DO = distrib_optimizer.DistributedOptimizer
    DO.__init__ = _with_cuda_tensor_methods(_require(DO, "__init__"))
    # optimizer.py: Float16OptimizerWithFloat16Params.__init__ (non-distributed bf16 path).
    F16 = _require(optimizer, "Float16OptimizerWithFloat16Params")
    F16.__init__ = _with_cuda_tensor_methods(F16.__init__)
    # clip_grads.py: clip_grad_by_total_norm_fp32 asserts param.grad.type(); optimizer.py
    # imported it by name, so both references are replaced.
    wrapped = _with_cuda_tensor_methods(_require(clip_grads, "clip_grad_by_total_norm_fp32"))
    clip_grads.clip_grad_by_total_norm_fp32 = wrapped
    if hasattr(optimizer, "clip_grad_by_total_norm_fp32"):
        optimizer.clip_grad_by_total_norm_fp32 = wrapped
    # language_module.py: LanguageModule.setup_embeddings_and_output_layer moves the tied
    # output weight of the last pipeline stage with weight.data.cuda() before all-reducing it.
    LM = _require(language_module, "LanguageModule")
    LM.setup_embeddings_and_output_layer = _with_cuda_tensor_methods(
        _require(LM, "setup_embeddings_and_output_layer"))


# --------------------------------------------------------------------------------------------
# 4. gloo collectives: no uneven all_gather / reduce_scatter, no tensor split sizes
# --------------------------------------------------------------------------------------------

def _is_gloo(group: Any) -> bool:
    return dist.get_backend(group) == "gloo"


def _bridge_uneven_collectives() -> None:
    """tensor_parallel/mappings.py: _gather_along_first_dim / _reduce_scatter_along_first_dim
    with output/input_split_sizes call torch.distributed.all_gather/reduce_scatter on tensors of
    different sizes, which gloo rejects. Under gloo every chunk is padded to the largest one,
    the even collective runs, and the padding is dropped. Used by the alltoall dispatcher at
    TP>1 (the TP all-gather of routed tokens and its backward)."""
    from megatron.core.tensor_parallel import mappings

    gather = _require(mappings, "_gather_along_first_dim")
    reduce_scatter = _require(mappings, "_reduce_scatter_along_first_dim")
    if getattr(gather, "_r1fast_bridged", False):
        return

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1 or not _is_gloo(group):
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        width = max(sizes)
        padded = input_.new_zeros((width,) + tuple(input_.shape[1:]))  # [max_chunk, ...]
        padded[: input_.shape[0]] = input_
        out = input_.new_empty((width * len(sizes),) + tuple(input_.shape[1:]))
        dist.all_gather_into_tensor(out, padded.contiguous(), group=group)
        return torch.cat([out[r * width: r * width + s] for r, s in enumerate(sizes)], dim=0)

    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None,
                                        use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1 or not _is_gloo(group):
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(s) for s in input_split_sizes]
        width = max(sizes)
        padded = input_.new_zeros((width * len(sizes),) + tuple(input_.shape[1:]))
        for r, chunk in enumerate(torch.split(input_, sizes, dim=0)):
            padded[r * width: r * width + sizes[r]] = chunk
        out = input_.new_empty((width,) + tuple(input_.shape[1:]))
        dist.reduce_scatter_tensor(out, padded, group=group)
        return out[: sizes[group.rank()]].contiguous()

    _gather_along_first_dim._r1fast_bridged = True  # type: ignore[attr-defined]
    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim

    # mappings.py: _AllToAll.forward passes the dispatcher's split sizes to all_to_all_single.
    # On GPU they arrive as numpy arrays (moved by _maybe_dtoh_and_synchronize); on CPU
    # maybe_move_tensor_to_cpu leaves them tensors, which the gloo binding does not accept.
    all_to_all = _require(mappings, "all_to_all")

    def _as_list(sizes: Any) -> Any:
        return sizes.tolist() if hasattr(sizes, "tolist") else sizes

    def all_to_all_lists(group, input_, output_split_sizes_=None, input_split_sizes=None):
        return all_to_all(group, input_, _as_list(output_split_sizes_), _as_list(input_split_sizes))

    mappings.all_to_all = all_to_all_lists
    from megatron.core.transformer.moe import token_dispatcher

    if getattr(token_dispatcher, "all_to_all", None) is all_to_all:
        token_dispatcher.all_to_all = all_to_all_lists


# --------------------------------------------------------------------------------------------
# 5. Sequence parallelism with the local (torch) norms
# --------------------------------------------------------------------------------------------

def _bridge_torch_norm_sequence_parallel() -> None:
    """transformer/torch_norm.py: WrappedTorchNorm asserts ``not config.sequence_parallel``
    (TE's norm is expected then). A torch RMSNorm/LayerNorm is just as correct under sequence
    parallelism provided its weight is flagged ``sequence_parallel`` so that
    finalize_model_grads all-reduces its gradient across the TP group, as TENorm does."""
    from megatron.core.transformer import torch_norm

    cls = _require(torch_norm, "WrappedTorchNorm")
    original_new = cls.__new__
    if getattr(original_new, "_r1fast_bridged", False):
        return

    def __new__(klass, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                zero_centered_gamma=False, normalization="LayerNorm"):
        if not config.sequence_parallel:
            return original_new(klass, config, hidden_size, eps, persist_layer_norm,
                                zero_centered_gamma, normalization)
        config.sequence_parallel = False  # pass the assert, build the same norm
        try:
            norm = original_new(klass, config, hidden_size, eps, persist_layer_norm,
                                zero_centered_gamma, normalization)
        finally:
            config.sequence_parallel = True
        for p in norm.parameters():
            setattr(p, "sequence_parallel", True)
        return norm

    __new__._r1fast_bridged = True  # type: ignore[attr-defined]
    cls.__new__ = __new__


# --------------------------------------------------------------------------------------------
# 6. Without Transformer Engine (CPU or GPU)
# --------------------------------------------------------------------------------------------

def _bridge_te_general_gemm() -> None:
    """transformer/moe/moe_utils.py: RouterGatingLinearFunction tests
    ``te_general_gemm is not None``, but 0.16 only defines the name when TE imports. Defining
    it as None selects its torch.mm path."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# --------------------------------------------------------------------------------------------

_CPU_BRIDGES: dict[str, Callable[[], None]] = {
    "torch_names": _bridge_torch_names,
    "rng_tracker": _bridge_rng_tracker,
    "tensor_methods": _bridge_tensor_methods,
    "uneven_collectives": _bridge_uneven_collectives,
    "torch_norm_sequence_parallel": _bridge_torch_norm_sequence_parallel,
}


def apply_megatron_bridges() -> list[str]:
    """Apply the bridges this process needs (idempotent) and return the names applied so far:
    the CPU bridges only when CUDA is absent, the TE bridge only when TE is absent."""
    check_megatron_version()
    if cuda_absent():
        for name, bridge in _CPU_BRIDGES.items():
            if name not in _APPLIED:
                bridge()
                _APPLIED.add(name)
                log.debug("r1fast.policy: applied megatron CPU bridge %s", name)
    if te_absent() and "te_general_gemm" not in _APPLIED:
        _bridge_te_general_gemm()
        _APPLIED.add("te_general_gemm")
    return sorted(_APPLIED)


def applied_bridges() -> list[str]:
    return sorted(_APPLIED)
