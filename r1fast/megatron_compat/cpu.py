"""The CPU bridges: what megatron-core needs to run its GPU code paths under gloo on a CPU box.

megatron-core assumes CUDA: it names devices, checks CUDA type names and calls collectives that
only NCCL implements. None of that changes the math, so each bridge below rewires exactly one
such assumption and says which megatron file/function it covers. With them the same
GPTModel/MoE/pipeline/optimizer code runs on CPU and reproduces the one-rank result bit for bit
at every TP/PP/EP layout (tests/policy/test_parallel_equivalence.py).

The bridges, in :data:`BRIDGES` order:

1. ``torch_names``: megatron modules see a CPU-flavoured ``torch`` (see
   :mod:`r1fast.megatron_compat.torch_proxy`).
2. ``rng_tracker``: the model-parallel RNG tracker keeps CPU generator states.
3. ``param_type_checks``: megatron's ``param.type() == "torch.cuda.FloatTensor"`` checks and
   ``.cuda()`` calls -- without touching ``torch.Tensor`` (see :func:`_bridge_param_type_checks`).
4. ``uneven_collectives``: gloo has no uneven all-gather/reduce-scatter.
5. ``torch_norm_sequence_parallel``: torch norms may run under sequence parallelism.

Nothing here modifies ``torch``, ``torch.Tensor`` or any other torch class. The bridges are
applied once per process by :func:`r1fast.megatron_compat.install`, only when CUDA is absent,
and :func:`announce` then says so in one WARNING line.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from r1fast.megatron_compat.torch_proxy import bridge_torch_names
from r1fast.megatron_compat.versions import require

log = logging.getLogger("r1fast.megatron_compat")

_ANNOUNCED = False


def cuda_absent() -> bool:
    return not torch.cuda.is_available()


def reason(env: Optional[dict] = None, cuda_build: Optional[str] = "auto") -> str:
    """Why the CPU bridges are on, for the WARNING line: no visible CUDA device, the
    CUDA_VISIBLE_DEVICES value if set, and whether torch is a CUDA build (then this is most
    likely a GPU machine whose devices are hidden)."""
    env = os.environ if env is None else env
    cuda_build = torch.version.cuda if cuda_build == "auto" else cuda_build
    parts = ["no CUDA device is visible"]
    if "CUDA_VISIBLE_DEVICES" in env:
        parts.append(f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r} is set")
    if cuda_build is not None:
        parts.append(f"this torch is a CUDA {cuda_build} build, so this looks like a GPU machine "
                     "with its devices hidden or unusable")
    return "; ".join(parts)


def announce() -> bool:
    """Log, once per process, the WARNING line that the CPU bridges are on and why (rank 0 only
    when torch.distributed is initialised). Returns whether this call logged it."""
    global _ANNOUNCED
    if _ANNOUNCED:
        return False
    _ANNOUNCED = True
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return False
    log.warning("r1fast: megatron-core CPU bridges ON (%s): the policy runs on CPU under gloo",
                reason())
    return True


# --------------------------------------------------------------------------------------------
# 2. RNG tracker: megatron.core.tensor_parallel.random.CudaRNGStatesTracker
# --------------------------------------------------------------------------------------------

def _bridge_rng_tracker() -> None:
    """tensor_parallel/random.py: CudaRNGStatesTracker keeps named *CUDA* generator states and
    swaps them in ``fork()``. On CPU the same bookkeeping is done on the CPU generator. The
    class is replaced by name so that initialize_rng_tracker()/model_parallel_cuda_manual_seed()
    build this one."""
    from megatron.core.tensor_parallel import random as mrandom

    base = require(mrandom, "CudaRNGStatesTracker")
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
    require(mrandom, "_get_cuda_rng_state")
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # A tracker created before the bridge (e.g. by an import side effect) is of the CUDA class.
    mrandom.initialize_rng_tracker(force_reset=True)


# --------------------------------------------------------------------------------------------
# 3. param.type() == "torch.cuda.FloatTensor" checks and tensor.cuda() calls
# --------------------------------------------------------------------------------------------

def cuda_type_name(tensor: torch.Tensor, dtype: Any = None, non_blocking: bool = False,
                   **kwargs: Any) -> Any:
    """``tensor.type()`` as megatron expects it of a parameter on a GPU: the no-argument form
    gives the CUDA name ("torch.cuda.FloatTensor" for a CPU float32 tensor); every other form
    (a conversion) is torch's own ``Tensor.type``."""
    if dtype is None and not kwargs:
        return torch.Tensor.type(tensor).replace("torch.", "torch.cuda.", 1)
    return torch.Tensor.type(tensor, dtype, non_blocking, **kwargs)


@contextlib.contextmanager
def params_report_cuda_type(optimizer: Any):
    """For the duration of one megatron call, give each CPU parameter of the torch optimizer
    ``optimizer`` an *instance attribute* ``type`` (:func:`cuda_type_name` bound to it).

    Why this is safe: an attribute in an object's ``__dict__`` shadows a class method for that
    object only, so ``torch.Tensor.type`` and every other tensor (including the shards and fp32
    copies megatron makes of these parameters: ``view``/``detach``/``clone`` return new
    objects without it) are unchanged; only the branch megatron takes on the dtype is affected
    (the same one it takes on a GPU). The attribute is deleted when the call returns or raises.
    """
    named = []
    try:
        for group in getattr(optimizer, "param_groups", ()):
            for p in group["params"]:
                if p.device.type == "cpu" and "type" not in vars(p):
                    p.type = functools.partial(cuda_type_name, p)
                    named.append(p)
        yield
    finally:
        for p in named:
            del p.type


def _init_with_cuda_named_params(init: Callable) -> Callable:
    @functools.wraps(init)
    def __init__(self: Any, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        with params_report_cuda_type(optimizer):
            init(self, optimizer, *args, **kwargs)

    __init__._r1fast_bridged = True  # type: ignore[attr-defined]
    return __init__


def _bridge_clip_grads() -> None:
    """optimizer/clip_grads.py: ``clip_grad_by_total_norm_fp32`` asserts
    ``param.grad.type() == 'torch.cuda.FloatTensor'`` on the optimizer's main params, whose
    ``.grad`` is a fresh view of the gradient buffer at every step. The replacement makes the
    same check with the CPU name and then runs the original's body: the same grads, the same
    ``clip_coeff = max_norm / (total_norm + 1e-6)`` and the same ``multi_tensor_applier`` call
    of clip_grads.py (so the numerics are identical). The decoupled-grad form has no type
    check and goes to the original. optimizer.py imported the function by name: both
    references are replaced."""
    from megatron.core.optimizer import clip_grads, optimizer

    original = require(clip_grads, "clip_grad_by_total_norm_fp32")
    if getattr(original, "_r1fast_bridged", False):
        return
    for name in ("multi_tensor_applier", "multi_tensor_scale_impl", "to_local_if_dtensor"):
        require(clip_grads, name)

    @functools.wraps(original)
    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if use_decoupled_grad:
            return original(parameters, max_norm, total_norm, use_decoupled_grad)
        grads = []
        for param in parameters:
            if param.grad is not None:
                if param.grad.type() != "torch.FloatTensor":
                    raise AssertionError(f"clip_grad_by_total_norm_fp32: expected an fp32 "
                                         f"gradient, got {param.grad.type()}")
                grads.append(clip_grads.to_local_if_dtensor(param.grad).detach())
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            dummy_overflow_buf = torch.zeros(1, dtype=torch.int)
            clip_grads.multi_tensor_applier(clip_grads.multi_tensor_scale_impl,
                                            dummy_overflow_buf, [grads, grads], clip_coeff)

    clip_grad_by_total_norm_fp32._r1fast_bridged = True  # type: ignore[attr-defined]
    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    if hasattr(optimizer, "clip_grad_by_total_norm_fp32"):
        optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


def _not_in_embd_group() -> bool:
    return False


def _bridge_tied_embedding_sync() -> None:
    """models/common/language_module/language_module.py:
    ``LanguageModule.setup_embeddings_and_output_layer`` ends (pipeline parallel, tied
    embeddings) with ``weight.data = weight.data.cuda()`` and an all-reduce of the tied weight
    over the embedding group. ``weight.data`` is a new tensor at every access, so nothing on
    the parameter can intercept ``.cuda()``. The replacement runs the original with that tail
    switched off (an instance attribute ``_is_in_embd_group`` returning False, on this model
    object, for this call only; the method is used nowhere else in it) and then does the
    all-reduce itself: the same in-place ``all_reduce(weight.data, group=embd_group)``,
    without the device move a CPU tensor does not need."""
    from megatron.core.models.common.language_module import language_module

    cls = require(language_module, "LanguageModule")
    original = require(cls, "setup_embeddings_and_output_layer")
    require(cls, "_is_in_embd_group")
    if getattr(original, "_r1fast_bridged", False):
        return

    @functools.wraps(original)
    def setup_embeddings_and_output_layer(self) -> None:
        if not (dist.is_initialized() and self._is_in_embd_group()):
            return original(self)
        self._is_in_embd_group = _not_in_embd_group
        try:
            original(self)
        finally:
            del self._is_in_embd_group
        weight = self.shared_embedding_or_output_weight()
        dist.all_reduce(weight.data, group=self.embd_group)

    setup_embeddings_and_output_layer._r1fast_bridged = True  # type: ignore[attr-defined]
    cls.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


def _bridge_param_type_checks() -> None:
    """Where megatron inspects ``param.type()`` or calls ``.cuda()`` (megatron-core 0.16.1):

    - optimizer/distrib_optimizer.py: ``DistributedOptimizer.__init__`` and the
      ``_build_model_and_main_param_groups`` it calls sort the model params into
      fp16/bf16/fp32 groups by their CUDA type name and raise on anything else;
    - optimizer/optimizer.py: ``Float16OptimizerWithFloat16Params.__init__`` does the same
      (the non-distributed optimizer);

    both wrapped so that the torch optimizer's params report the CUDA name for that call
    (:func:`params_report_cuda_type`); and :func:`_bridge_clip_grads`,
    :func:`_bridge_tied_embedding_sync`."""
    from megatron.core.optimizer import distrib_optimizer, optimizer

    for cls in (require(distrib_optimizer, "DistributedOptimizer"),
                require(optimizer, "Float16OptimizerWithFloat16Params")):
        init = require(cls, "__init__")
        if not getattr(init, "_r1fast_bridged", False):
            cls.__init__ = _init_with_cuda_named_params(init)
    _bridge_clip_grads()
    _bridge_tied_embedding_sync()


# --------------------------------------------------------------------------------------------
# 4. gloo collectives: no uneven all_gather / reduce_scatter, no tensor split sizes
# --------------------------------------------------------------------------------------------

# torch 2.13 renamed the single-tensor collectives (the old names warn); the same operation.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _is_gloo(group: Any) -> bool:
    return dist.get_backend(group) == "gloo"


def _bridge_uneven_collectives() -> None:
    """tensor_parallel/mappings.py: _gather_along_first_dim / _reduce_scatter_along_first_dim
    with output/input_split_sizes call torch.distributed.all_gather/reduce_scatter on tensors of
    different sizes, which gloo rejects. Under gloo every chunk is padded to the largest one,
    the even collective runs, and the padding is dropped. Used by the alltoall dispatcher at
    TP>1 (the TP all-gather of routed tokens and its backward)."""
    from megatron.core.tensor_parallel import mappings

    gather = require(mappings, "_gather_along_first_dim")
    reduce_scatter = require(mappings, "_reduce_scatter_along_first_dim")
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
        _all_gather_single(out, padded.contiguous(), group=group)
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
        _reduce_scatter_single(out, padded, group=group)
        return out[: sizes[group.rank()]].contiguous()

    _gather_along_first_dim._r1fast_bridged = True  # type: ignore[attr-defined]
    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim
    _bridge_split_sizes_as_lists(mappings)


def _bridge_split_sizes_as_lists(mappings: Any) -> None:
    """mappings.py: _AllToAll.forward passes the dispatcher's split sizes to all_to_all_single.
    On GPU they arrive as numpy arrays (moved by _maybe_dtoh_and_synchronize); on CPU
    maybe_move_tensor_to_cpu leaves them tensors, which the gloo binding does not accept."""
    all_to_all = require(mappings, "all_to_all")

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

    cls = require(torch_norm, "WrappedTorchNorm")
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

BRIDGES: dict[str, Callable[[], None]] = {
    "torch_names": bridge_torch_names,
    "rng_tracker": _bridge_rng_tracker,
    "param_type_checks": _bridge_param_type_checks,
    "uneven_collectives": _bridge_uneven_collectives,
    "torch_norm_sequence_parallel": _bridge_torch_norm_sequence_parallel,
}
"""The CPU bridges by name, in the order :func:`r1fast.megatron_compat.install` applies them."""
