"""Triton kernels for MoE token permutation: copy token rows into expert-contiguous order and
combine the experts' outputs back, with no atomics anywhere (bitwise deterministic).

Given ``row_map [T, k]`` (row of permuted slot (t, j), a permutation of 0..T*k-1 built by
``r1fast.ops.moe_permute``), two kernels cover forward and backward of both ops:

- ``scatter_rows``: ``out[row_map[t, j]] = w[t, j] * x[t]`` (w optional), and optionally
  ``dw[t, j] = <y[row_map[t, j]], x[t]>``. Permute forward (no w); unpermute backward
  (x = dout, w = weights, y = expert outputs -> dy and dweights).
- ``gather_combine``: ``out[t] = sum_j w[t, j] * y[row_map[t, j]]`` summed in slot order j = 0..k-1
  in fp32. Unpermute forward; permute backward (no w: dx[t] = sum_j dpermuted[row_map[t, j]]).

Each program owns one token and walks its hidden dimension in ``BLOCK_H`` chunks, so it reads
``x[t]`` once for all k copies, and every output element is written by exactly one program.
The dot products of ``dw`` are reduced inside the program in a fixed order (chunk by chunk), so
they are deterministic too. Loads are cast to fp32 before arithmetic (the interpreter computes
bf16 wrongly otherwise, and the sum wants fp32 anyway).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1fast.kernels._launch import on_device_of


@triton.jit
def _scatter_rows_kernel(
    x_ptr, row_map_ptr, w_ptr, y_ptr, out_ptr, dw_ptr,
    H, stride_x, stride_y, stride_o,
    K: tl.constexpr, HAS_W: tl.constexpr, HAS_DW: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    hcols = tl.arange(0, BLOCK_H)
    kcols = tl.arange(0, BLOCK_K)
    dots = tl.zeros([BLOCK_K], dtype=tl.float32)  # <y[row(t, j)], x[t]> per slot j
    for h0 in range(0, H, BLOCK_H):
        hm = h0 + hcols < H
        x = tl.load(x_ptr + t * stride_x + h0 + hcols, mask=hm, other=0.0).to(tl.float32)
        for j in tl.static_range(K):
            r = tl.load(row_map_ptr + t * K + j).to(tl.int64)
            v = x
            if HAS_W:
                v = x * tl.load(w_ptr + t * K + j).to(tl.float32)
            tl.store(out_ptr + r * stride_o + h0 + hcols, v.to(out_ptr.dtype.element_ty), mask=hm)
            if HAS_DW:
                y = tl.load(y_ptr + r * stride_y + h0 + hcols, mask=hm, other=0.0).to(tl.float32)
                dots = tl.where(kcols == j, dots + tl.sum(x * y, 0), dots)
    if HAS_DW:
        tl.store(dw_ptr + t * K + kcols, dots.to(dw_ptr.dtype.element_ty), mask=kcols < K)


@triton.jit
def _gather_combine_kernel(
    y_ptr, row_map_ptr, w_ptr, out_ptr,
    H, stride_y, stride_o,
    K: tl.constexpr, HAS_W: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    hcols = tl.arange(0, BLOCK_H)
    for h0 in range(0, H, BLOCK_H):
        hm = h0 + hcols < H
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for j in tl.static_range(K):  # fixed slot order: the sum is reproducible bit for bit
            r = tl.load(row_map_ptr + t * K + j).to(tl.int64)
            y = tl.load(y_ptr + r * stride_y + h0 + hcols, mask=hm, other=0.0).to(tl.float32)
            if HAS_W:
                acc += tl.load(w_ptr + t * K + j).to(tl.float32) * y
            else:
                acc += y
        tl.store(out_ptr + t * stride_o + h0 + hcols, acc.to(out_ptr.dtype.element_ty), mask=hm)


def _block_h(H: int) -> int:
    return min(triton.next_power_of_2(max(H, 1)), 2048)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def scatter_rows(x: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor | None = None,
                 y: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                 dw: torch.Tensor | None = None):
    """``out [T*k, H]`` (dtype of x) with ``out[row_map[t,j]] = w[t,j] * x[t]``; with ``y``
    also ``dw [T, k]`` (dtype of weights, fp32 without weights). Returns ``(out, dw|None)``.
    ``out``/``dw`` may be preallocated (tests poison them with NaN)."""
    x = _rows(x)
    T, H = x.shape
    k = row_map.shape[1]
    row_map = row_map.contiguous()
    if out is None:
        out = x.new_empty((T * k, H))
    if y is not None:
        y = _rows(y)
        if dw is None:
            dw = x.new_empty((T, k), dtype=weights.dtype if weights is not None else torch.float32)
    if T == 0 or H == 0:
        if dw is not None:
            dw.zero_()
        return out, dw
    if weights is not None:
        weights = weights.contiguous()
    with on_device_of(x):
        _scatter_rows_kernel[(T,)](
            x, row_map, weights if weights is not None else x, y if y is not None else x, out,
            dw if dw is not None else out, H, x.stride(0), y.stride(0) if y is not None else 0,
            out.stride(0), K=k, HAS_W=weights is not None, HAS_DW=y is not None,
            BLOCK_H=_block_h(H), BLOCK_K=triton.next_power_of_2(k),
        )
    return out, dw


def gather_combine(y: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor | None = None,
                   *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out [T, H]`` (dtype of y) with ``out[t] = sum_j w[t,j] * y[row_map[t,j]]``."""
    y = _rows(y)
    T, k = row_map.shape
    H = y.shape[1]
    if out is None:
        out = y.new_empty((T, H))
    if T == 0 or H == 0:
        return out
    with on_device_of(y):
        _gather_combine_kernel[(T,)](
            y, row_map.contiguous(), weights.contiguous() if weights is not None else y, out,
            H, y.stride(0), out.stride(0), K=k, HAS_W=weights is not None, BLOCK_H=_block_h(H),
        )
    return out
