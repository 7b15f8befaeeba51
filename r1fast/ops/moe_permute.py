"""MoE token permutation: gather each token's row into expert-contiguous order before the
experts' grouped GEMMs (:func:`moe_permute`), and combine the experts' outputs back into token
order weighted by the router (:func:`moe_unpermute`). Both are deterministic: no atomics, the
combine sums the k slots of a token in fixed slot order in fp32.

Order: the permuted rows of expert e are contiguous and experts come in increasing order
(expert e starts at ``cumsum(tokens_per_expert)[e-1]``); within an expert, rows are ordered by
token, then by slot (a stable sort of the flattened indices), which is the order of Megatron's
``permute`` for top-k routing maps. ``row_map [T, k]`` holds the permuted row of slot (t, j).

Row map: a stable ``torch.argsort`` of the T*k expert ids (deterministic on CPU and CUDA; one
radix sort of ~131K int64 at T=16384, k=8) and a scatter of ``arange`` through it; counts come
from a ``searchsorted`` of the sorted ids (``torch.bincount`` would wait for the GPU: its output
size depends on the data).

Host syncs: none on the hot path when ``num_experts`` is given. The value checks (expert ids in
``[0, E)``, a row map that is a permutation) need the data, so on a GPU they run only under
``R1FAST_DEBUG_CHECKS=1`` or ``validate=True`` (``r1fast.ops._dispatch.debug_checks``);
out-of-range ids otherwise give undefined rows, as an out-of-range index into a tensor would.
The expert ids of CPU tensors are always checked (no device to wait for).

The row copies and the weighted combine are the bandwidth-bound part
and run in the Triton (``r1fast.kernels.moe_permute``) or CUDA (``csrc/moe_route.cu``) kernels.

Gradients: permute is differentiable w.r.t. ``x`` (``dx[t] = sum_j dpermuted[row_map[t,j]]``);
unpermute w.r.t. ``y`` (``dy[row_map[t,j]] = w[t,j] * dout[t]``) and ``weights``
(``dw[t,j] = <y[row_map[t,j]], dout[t]>``, fp32 accumulation).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from r1fast.ops._dispatch import checks_values, debug_checks, resolve_impl
from r1fast.ops._validate import FLOAT_DTYPES, INDEX_DTYPES, check_tensor

_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA_MAX_TOPK = 16


class MoEPermuted(NamedTuple):
    permuted: Tensor  # [T*k, H], expert-contiguous
    row_map: Tensor  # [T, k] int64: row of slot (t, j) in ``permuted``
    tokens_per_expert: Tensor  # [E] int64


def expert_counts(sorted_ids: Tensor, num_experts: int) -> Tensor:
    """``[E]`` int64 count of each expert id in the ascending ``sorted_ids`` (no host sync,
    unlike ``torch.bincount`` on CUDA, whose output size depends on the data)."""
    edges = torch.arange(num_experts + 1, device=sorted_ids.device, dtype=sorted_ids.dtype)
    bounds = torch.searchsorted(sorted_ids, edges)  # first position of each id
    return (bounds[1:] - bounds[:-1]).to(torch.int64)


def permute_row_map(indices: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """``(row_map [T, k] int64, tokens_per_expert [E] int64)`` for expert ids ``indices``."""
    flat = indices.reshape(-1).to(torch.int64)  # [T*k]
    order = torch.argsort(flat, stable=True)  # slots sorted by expert, then by (t, j)
    row_map = torch.empty_like(flat)
    row_map[order] = torch.arange(flat.numel(), device=flat.device)
    return row_map.view(indices.shape), expert_counts(flat[order], num_experts)


# ----------------------------------------------------------------------------- fast paths

def _backend(impl: str):
    if impl == "triton":
        from r1fast.kernels import moe_permute as kernels

        return kernels
    if impl == "cuda":
        return _CudaPermute
    raise ValueError(f"no fast backend {impl!r}")


class _CudaPermute:
    """Same signatures as the launchers in ``r1fast.kernels.moe_permute``, on the CUDA
    extension (weights go to the kernels as fp32; dw comes back in the weights' dtype)."""

    @staticmethod
    def scatter_rows(x, row_map, weights=None, y=None, *, out=None, dw=None):
        from r1fast.ops import _cuda_ext

        x = x.contiguous()
        T, H = x.shape
        k = row_map.shape[1]
        out = x.new_empty((T * k, H)) if out is None else out
        dw32 = None if y is None else x.new_empty((T, k), dtype=torch.float32)
        _cuda_ext.load("moe_permute").moe_scatter_rows(
            x, row_map.contiguous(), None if weights is None else weights.float().contiguous(),
            None if y is None else y.contiguous(), out, dw32)
        if dw32 is None:
            return out, None
        res = dw32 if weights is None else dw32.to(weights.dtype)
        if dw is not None:
            res = dw.copy_(res)
        return out, res

    @staticmethod
    def gather_combine(y, row_map, weights=None, *, out=None):
        from r1fast.ops import _cuda_ext

        y = y.contiguous()
        T = row_map.shape[0]
        out = y.new_empty((T, y.shape[1])) if out is None else out
        _cuda_ext.load("moe_unpermute").moe_gather_combine(
            y, row_map.contiguous(), None if weights is None else weights.float().contiguous(),
            out)
        return out


@torch.library.custom_op("r1fast::moe_permute_rows", mutates_args=())
def _permute_rows_op(x: Tensor, row_map: Tensor, impl: str) -> Tensor:
    return _backend(impl).scatter_rows(x, row_map)[0]


@_permute_rows_op.register_fake
def _(x, row_map, impl):
    return x.new_empty((row_map.numel(), x.shape[1]))


@torch.library.custom_op("r1fast::moe_combine_rows", mutates_args=())
def _combine_rows_op(y: Tensor, row_map: Tensor, weights: Optional[Tensor], impl: str) -> Tensor:
    return _backend(impl).gather_combine(y, row_map, weights)


@_combine_rows_op.register_fake
def _(y, row_map, weights, impl):
    return y.new_empty((row_map.shape[0], y.shape[1]))


@torch.library.custom_op("r1fast::moe_combine_rows_bwd", mutates_args=())
def _combine_bwd_op(grad_out: Tensor, row_map: Tensor, weights: Tensor, y: Tensor,
                    impl: str) -> tuple[Tensor, Tensor]:
    dy, dw = _backend(impl).scatter_rows(grad_out, row_map, weights, y)
    return dy, dw


@_combine_bwd_op.register_fake
def _(grad_out, row_map, weights, y, impl):
    return grad_out.new_empty(y.shape, dtype=grad_out.dtype), torch.empty_like(weights)


def _permute_setup(ctx, inputs, output):
    _x, row_map, impl = inputs
    ctx.save_for_backward(row_map)
    ctx.impl = impl


def _permute_backward(ctx, grad):
    (row_map,) = ctx.saved_tensors
    return _combine_rows_op(grad.contiguous(), row_map, None, ctx.impl), None, None


_permute_rows_op.register_autograd(_permute_backward, setup_context=_permute_setup)


def _combine_setup(ctx, inputs, output):
    y, row_map, weights, impl = inputs
    ctx.save_for_backward(y, row_map, weights)
    ctx.impl = impl


def _combine_backward(ctx, grad):
    y, row_map, weights = ctx.saved_tensors
    grad = grad.contiguous()
    if weights is None:  # unit weights: the backward is a plain permute of the gradient
        return _permute_rows_op(grad, row_map, ctx.impl), None, None, None
    dy, dw = _combine_bwd_op(grad, row_map, weights, y, ctx.impl)
    return dy.to(y.dtype), None, dw, None


_combine_rows_op.register_autograd(_combine_backward, setup_context=_combine_setup)


# ----------------------------------------------------------------------------- reference

def _permute_reference(x: Tensor, row_map: Tensor) -> Tensor:
    T, k = row_map.shape
    slot = torch.empty_like(row_map.reshape(-1))
    slot[row_map.reshape(-1)] = torch.arange(T * k, device=x.device)  # slot of each row
    # Gather through a permutation (not index_select of tokens): its backward scatters each
    # row once, and the k copies of a token are summed by expand's backward, deterministically.
    return x.unsqueeze(1).expand(T, k, x.shape[1]).reshape(T * k, x.shape[1])[slot]


def _unpermute_reference(y: Tensor, row_map: Tensor, weights: Tensor) -> Tensor:
    acc = torch.float64 if torch.float64 in (y.dtype, weights.dtype) else torch.float32
    rows = y.to(acc)[row_map]  # [T, k, H]
    return (rows * weights.to(acc).unsqueeze(-1)).sum(1).to(y.dtype)


def naive_moe_permute(x: Tensor, indices: Tensor, num_experts: int) -> MoEPermuted:
    """Expert-contiguous permutation written out with Python loops in fp64 (test ground
    truth): for each expert in order, each (token, slot) choosing it in (t, j) order."""
    T, k = indices.shape
    rows, row_map = [], torch.empty((T, k), dtype=torch.int64)
    for e in range(num_experts):
        for t in range(T):
            for j in range(k):
                if int(indices[t, j]) == e:
                    row_map[t, j] = len(rows)
                    rows.append(x[t].double())
    counts = torch.tensor([int((indices == e).sum()) for e in range(num_experts)])
    permuted = torch.stack(rows) if rows else x.new_zeros((0, x.shape[1]), dtype=torch.float64)
    return MoEPermuted(permuted, row_map, counts)


def naive_moe_unpermute(y: Tensor, row_map: Tensor, weights: Tensor) -> Tensor:
    """``out[t] = sum_j w[t, j] * y[row_map[t, j]]`` with a Python loop in fp64."""
    T, k = row_map.shape
    out = []
    for t in range(T):
        acc = y.new_zeros(y.shape[1], dtype=torch.float64)
        for j in range(k):
            acc = acc + weights[t, j].double() * y[int(row_map[t, j])].double()
        out.append(acc)
    return torch.stack(out) if out else y.new_zeros((0, y.shape[1]), dtype=torch.float64)


# ----------------------------------------------------------------------------- public API

def _resolve(op: str, impl: str, x: Tensor, k: int) -> str:
    supported = ["torch", "triton", "cuda"]
    if x.dtype not in _FAST_DTYPES:
        if impl in ("triton", "cuda"):
            raise ValueError(f"{op}: impl={impl!r} takes float32, bfloat16 or float16 rows, "
                             f"got {str(x.dtype).replace('torch.', '')}")
        supported = ["torch"]
    if k > CUDA_MAX_TOPK:
        if impl == "cuda":
            raise ValueError(f"{op}: impl='cuda' supports k <= {CUDA_MAX_TOPK}, got {k}")
        supported.remove("cuda")
    return resolve_impl(op, impl, x.device, supported=supported)


def moe_permute(x: Tensor, indices: Tensor, num_experts: Optional[int] = None, *,
                impl: str = "auto", validate: Optional[bool] = None) -> MoEPermuted:
    """Copy token rows ``x [T, H]`` to expert-contiguous order for expert ids ``indices [T, k]``.

    Returns :class:`MoEPermuted` ``(permuted [T*k, H], row_map [T, k] int64,
    tokens_per_expert [E] int64)``; ``E = num_experts`` or ``max(indices) + 1`` (one host sync:
    pass ``num_experts`` on the hot path). ``validate``: check that the ids are in ``[0, E)``
    (a host sync); None follows ``R1FAST_DEBUG_CHECKS``.
    """
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    T, H = x.shape
    check_tensor("indices", indices, ndim=2, dtypes=INDEX_DTYPES, device=x.device)
    if indices.shape[0] != T:
        raise ValueError(f"indices must have shape [{T}, k] (one row per token of x), "
                         f"got {list(indices.shape)}")
    k = indices.shape[1]
    if k < 1:
        raise ValueError(f"indices must have at least one slot per token, got shape {[T, k]}")
    if num_experts is None:
        num_experts = int(indices.max()) + 1 if indices.numel() else 1
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if checks_values(validate, indices.device) and indices.numel() and \
            bool(((indices < 0) | (indices >= num_experts)).any()):
        raise ValueError(f"indices must hold expert ids in [0, {num_experts}), got values in "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    row_map, counts = permute_row_map(indices, num_experts)
    return MoEPermuted(_permute_rows(x, row_map, impl, "moe_permute"), row_map, counts)


def moe_permute_rows(x: Tensor, row_map: Tensor, *, impl: str = "auto",
                     validate: Optional[bool] = None) -> Tensor:
    """``permuted [T*k, H]`` with ``permuted[row_map[t, j]] = x[t]``, for a caller that already
    holds the row map (megatron's dispatcher derives it from its routing map,
    ``r1fast.policy.dispatcher``). Differentiable w.r.t. ``x``; the gradient sums a token's k
    rows in slot order. ``validate``: check that ``row_map`` is a permutation (a sort and a
    host sync); None follows ``R1FAST_DEBUG_CHECKS``."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_row_map(row_map, row_map.numel(), x.device, values=debug_checks(validate))
    if row_map.shape[0] != x.shape[0]:
        raise ValueError(f"row_map must have shape [{x.shape[0]}, k] (one row per token of x), "
                         f"got {list(row_map.shape)}")
    return _permute_rows(x, row_map.to(torch.int64), impl, "moe_permute_rows")


def _permute_rows(x: Tensor, row_map: Tensor, impl: str, op: str) -> Tensor:
    chosen = _resolve(op, impl, x, row_map.shape[1])
    if chosen == "torch":
        return _permute_reference(x, row_map)
    return _permute_rows_op(x, row_map, chosen)


def check_row_map(row_map: Tensor, num_rows: int, device: torch.device, *,
                  values: bool = True) -> None:
    """``row_map`` must be [T, k] integers forming a permutation of 0..T*k-1 (a repeated row
    would make the backward write one row twice and drop another). The shape/dtype checks read
    metadata; the permutation check (``values=True``) sorts the map: a host sync."""
    check_tensor("row_map", row_map, ndim=2, dtypes=INDEX_DTYPES, device=device)
    if row_map.numel() != num_rows:
        raise ValueError(f"row_map must have T*k = {num_rows} entries (one per row of y), "
                         f"got shape {list(row_map.shape)}")
    if values and row_map.numel():
        srt = row_map.reshape(-1).sort().values
        if not bool((srt == torch.arange(num_rows, device=device)).all()):
            raise ValueError(f"row_map must be a permutation of 0..{num_rows - 1} "
                             "(as returned by moe_permute)")


def moe_unpermute(y: Tensor, row_map: Tensor, weights: Tensor, *, impl: str = "auto",
                  validate: Optional[bool] = None) -> Tensor:
    """Combine expert outputs ``y [T*k, H]`` back to tokens: ``out[t] = sum_j weights[t, j] *
    y[row_map[t, j]]`` (fp32 sum in slot order), returned as ``[T, H]`` in the dtype of ``y``.
    Differentiable w.r.t. ``y`` and ``weights``. ``validate``: check that ``row_map`` is a
    permutation (a sort and a host sync); None follows ``R1FAST_DEBUG_CHECKS``."""
    check_tensor("y", y, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weights", weights, ndim=2, dtypes=FLOAT_DTYPES, device=y.device)
    check_row_map(row_map, y.shape[0], y.device, values=debug_checks(validate))
    if tuple(weights.shape) != tuple(row_map.shape):
        raise ValueError(f"weights must have shape {list(row_map.shape)} (as row_map), "
                         f"got {list(weights.shape)}")
    chosen = _resolve("moe_unpermute", impl, y, row_map.shape[1])
    if chosen == "torch":
        return _unpermute_reference(y, row_map, weights)
    return _combine_rows_op(y, row_map.to(torch.int64), weights, chosen)
