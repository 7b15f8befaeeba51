"""Triton kernels for the routed experts of a MoE layer as two grouped GEMMs: every expert's
SwiGLU MLP over its rows in two launches, with the per-expert row counts read on the device.

Why: megatron's experts without Transformer Engine run one small MLP per expert (a loop of
~7 launches x E experts per layer) and split the rows with counts the host must read first
(a wait for the GPU in every MoE layer). In decoding, a step has a few rows per expert, so that
loop is launch-bound: at E=128 about 900 launches per layer per token, against a weight read
of well under a millisecond. Here the whole layer is two launches and the counts never leave
the GPU.

Inputs: ``x [n, H]`` rows sorted by expert (megatron's permuted order), ``counts [E]`` rows per
expert (a device tensor), ``probs [n]`` the routing weight of each row, and two int64 tables of
the experts' weight addresses (each expert's ``fc1 [2F, H]`` = [gate; up] and ``fc2 [H, F]``,
contiguous; the weights stay where megatron keeps them, nothing is stacked or copied).

- ``_fc1_swiglu_kernel``: ``h = silu(x W_gate^T) * (x W_up^T + offset) * p`` -> ``[n, F]``
  (gate and up tiles accumulated side by side, so ``x`` is read once for both);
- ``_fc2_kernel``: ``y = h W_2^T`` -> ``[n, H]``.

Scheduling: program ``pid`` takes row tile ``pid // column blocks`` of the concatenated
per-expert tilings (expert e has ``ceil(counts[e] / BLOCK_M)`` row tiles); it finds its expert
from a running sum of the tile counts (all E counts loaded as one vector). The grid is sized
on the host for the worst case, ``ceil(n / BLOCK_M) + E`` row tiles, which needs only ``n``:
programs past the last tile run no loop iterations and store nothing. Accumulation is fp32;
fp32 operands use ``input_precision="ieee"``; the interpreter computes bf16 ``tl.dot``
wrongly, so there the tiles are upcast (exact: bf16 products are exact in fp32).

This module imports nothing from r1fast and needs ``triton``; without a GPU set
``TRITON_INTERPRET=1`` *before importing it*.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _tile(counts_ptr, w_table_ptr, elem_ptr, E, n_out,
          BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile: (its expert's weight pointer, rows [BLOCK_M] int64 and their mask,
    output columns [BLOCK_N] of ``n_out`` and their mask, whether the tile exists). Row tile
    ``pid // column blocks`` of the concatenated per-expert tilings: the expert is the number
    of experts whose tiles all come before it. Past the last expert's tiles the row mask is
    all false (no expert id equals E, so the row count sums to 0) and the expert is clamped to
    E - 1 for the address load (``elem_ptr`` gives the weights' element type)."""
    pid = tl.program_id(0)
    n_cols = tl.cdiv(n_out, BLOCK_N)
    tile = pid // n_cols
    e_ids = tl.arange(0, BLOCK_E)
    cnt = tl.load(counts_ptr + e_ids, mask=e_ids < E, other=0).to(tl.int32)  # [BLOCK_E]
    tiles = (cnt + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)  # first tile after expert e
    e = tl.sum((tile_end <= tile).to(tl.int32), 0)
    first_tile = tl.sum(tl.where(e_ids == e, tile_end - tiles, 0), 0)
    first_row = tl.sum(tl.where(e_ids < e, cnt, 0), 0)
    rows_e = tl.sum(tl.where(e_ids == e, cnt, 0), 0)
    local = (tile - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows within expert e
    w_ptr = tl.load(w_table_ptr + tl.minimum(e, E - 1)).to(
        tl.pointer_type(elem_ptr.dtype.element_ty))
    cols = (pid % n_cols) * BLOCK_N + tl.arange(0, BLOCK_N)
    return (w_ptr, (first_row + local).to(tl.int64), local < rows_e, cols, cols < n_out,
            e < E)


@triton.jit
def _fc1_swiglu_kernel(x_ptr, counts_ptr, w_table_ptr, probs_ptr, h_ptr,
                       E, H, F, stride_x, stride_h, glu_offset, N_BUCKET,
                       BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # w: the expert's [2F, H]; rows of x and h [BM]; columns of F [BN]
    w_ptr, rows, mask_m, cols, mask_n, valid = _tile(counts_ptr, w_table_ptr, x_ptr, E, F,
                                                     BLOCK_E, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_x + offs_k[None, :]  # [BM, BK]
    g_ptrs = w_ptr + cols[None, :].to(tl.int64) * H + offs_k[:, None]  # [BK, BN] gate rows
    u_ptrs = g_ptrs + F.to(tl.int64) * H  # up rows follow the gate rows
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(valid, H, 0)  # tiles past the last expert run no iteration
    for k0 in range(0, k_end, BLOCK_K):
        mask_k = k0 + offs_k < H
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wg = tl.load(g_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        wu = tl.load(u_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:  # interpreter only: its bf16 dot is wrong
            a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        acc_g = tl.dot(a, wg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, wu, acc_u, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    p = tl.load(probs_ptr + rows, mask=mask_m, other=0.0).to(tl.float32)  # [BM]
    h = acc_g * tl.sigmoid(acc_g) * (acc_u + glu_offset) * p[:, None]
    mask = mask_m[:, None] & mask_n[None, :]  # no rows past the last expert's tiles
    tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :],
             h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fc2_kernel(h_ptr, counts_ptr, w_table_ptr, y_ptr, E, H, F, stride_h, stride_y, N_BUCKET,
                BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # w: the expert's [H, F]; rows of h and y [BM]; columns of H [BN]
    w_ptr, rows, mask_m, cols, mask_n, valid = _tile(counts_ptr, w_table_ptr, h_ptr, E, H,
                                                     BLOCK_E, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None] * stride_h + offs_k[None, :]  # [BM, BK]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * F + offs_k[:, None]  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(valid, F, 0)
    for k0 in range(0, k_end, BLOCK_K):
        mask_k = k0 + offs_k < F
        a = tl.load(h_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    mask = mask_m[:, None] & mask_n[None, :]  # no rows past the last expert's tiles
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask)


# ----------------------------------------------------------------------------- launchers

def _configs(name: str) -> list:
    """Row tiles from 16 (decoding: a few rows per expert) to 128 (prefill-sized batches).
    fc1 holds two accumulators (gate and up) and loads two weight tiles, so its tiles are
    narrower; every config here compiles for sm_90 without spilling (bench/kernel_resources.py,
    workload ``moe_experts``)."""
    shapes = {
        "fc1": [(16, 64, 64, 4, 4), (32, 64, 64, 8, 3), (64, 64, 64, 8, 3),
                (128, 64, 64, 8, 3)],
        "fc2": [(16, 128, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 4),
                (128, 128, 64, 8, 3)],
    }[name]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w,
                          num_stages=st) for m, n, k, w, st in shapes]


_INTERP_TILE = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
_tuned: dict[str, object] = {}


def _kernel(name: str):
    """Plain under the interpreter; autotuned on a GPU over the row-count bucket (built once)."""
    if name not in _tuned:
        kernel = {"fc1": _fc1_swiglu_kernel, "fc2": _fc2_kernel}[name]
        if not INTERPRET:
            kernel = triton.autotune(_configs(name), key=["E", "H", "F", "N_BUCKET"])(kernel)
        _tuned[name] = kernel
    return _tuned[name]


def _launch(name: str, n: int, cols: int, E: int, *args) -> None:
    """Launch kernel ``name`` over ``n`` rows and ``cols`` output columns; ``args`` are the
    kernel's runtime arguments up to its strides (the row-count bucket, an autotune key that
    the kernel does not read, is appended here)."""
    precision = "ieee" if args[0].dtype == torch.float32 or INTERPRET else "tf32"
    fixed = dict(BLOCK_E=triton.next_power_of_2(E), UPCAST=INTERPRET, PRECISION=precision)
    if INTERPRET:
        fixed.update(_INTERP_TILE)

    def grid(m):
        return ((triton.cdiv(n, m["BLOCK_M"]) + E) * triton.cdiv(cols, m["BLOCK_N"]),)

    bucket = triton.next_power_of_2(max(n, 1))
    _kernel(name)[grid(fixed) if INTERPRET else grid](*args, bucket, **fixed)


def grouped_swiglu_mlp(x: torch.Tensor, counts: torch.Tensor, fc1_table: torch.Tensor,
                       fc2_table: torch.Tensor, probs: torch.Tensor, ffn: int,
                       glu_offset: float = 0.0, *, h: torch.Tensor | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """``out [n, H]`` (dtype of x): each expert's SwiGLU MLP over its rows of ``x [n, H]``,
    scaled by ``probs [n]`` before the down projection. ``counts [E]`` rows per expert (on
    x's device), ``fc1_table``/``fc2_table [E]`` int64 addresses of contiguous ``[2*ffn, H]``
    and ``[H, ffn]`` weights of x's dtype. ``h [n, ffn]`` / ``out`` may be preallocated (tests
    poison them)."""
    n, H = x.shape
    E = counts.numel()
    h = x.new_empty((n, ffn)) if h is None else h
    out = x.new_empty((n, H)) if out is None else out
    if n == 0:
        return out
    counts = counts.contiguous()
    _launch("fc1", n, ffn, E, x, counts, fc1_table, probs.contiguous(), h,
            E, H, ffn, x.stride(0), h.stride(0), float(glu_offset))
    _launch("fc2", n, H, E, h, counts, fc2_table, out, E, H, ffn, h.stride(0), out.stride(0))
    return out
