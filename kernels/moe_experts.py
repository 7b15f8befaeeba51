"""Triton kernels for the routed experts of a MoE layer as grouped GEMMs: every expert's SwiGLU
MLP over its rows, forward and backward, with the per-expert row counts read on the device.

Why: megatron's experts without Transformer Engine run one small MLP per expert (a loop of
~7 launches x E experts per layer, more in the backward) and split the rows with counts the
host must read first (a wait for the GPU in every MoE layer). In decoding, a step has a few
rows per expert, so that loop is launch-bound: at E=128 about 900 launches per layer per token,
against a weight read of well under a millisecond. Here the forward is two launches, the
backward four, and the counts never leave the GPU.

Inputs: ``x [n, H]`` rows sorted by expert (megatron's permuted order), ``counts [E]`` rows per
expert (a device tensor), ``probs [n]`` the routing weight of each row, and two int64 tables of
the experts' weight addresses (each expert's ``fc1 [2F, H]`` = [gate; up] and ``fc2 [H, F]``,
contiguous; the weights stay where megatron keeps them, nothing is stacked or copied).

Forward (``a = [g | u]`` the pre-activations, rounded to the rows' dtype as megatron's linear
returns them; ``act = silu(g) * (u + offset)``):

- ``_fc1_swiglu_kernel``: ``h = act * p`` -> ``[n, F]`` (gate and up tiles accumulated side by
  side, so ``x`` is read once for both); for training it also stores ``a [n, 2F]``;
- ``_rows_kernel``: ``y = h W_2^T`` -> ``[n, H]``.

Backward, from ``dy [n, H]``:

- ``_rows_kernel`` with the SwiGLU epilogue: ``dh = dy W_2`` in fp32 registers, turned at
  once into ``da = [dh p (u + offset) silu'(g) | dh p silu(g)]`` (``[n, 2F]``, rows' dtype) and
  this column block's part of ``dp = sum_f dh act`` (summed over blocks on the host side,
  deterministic: no atomics);
- ``_rows_kernel``: ``dx = da W_1``;
- ``_weight_grad_kernel`` twice: ``dW_1[e] = da_e^T x_e`` and ``dW_2[e] = dy_e^T h_e``, one
  program per (expert, output tile) looping over that expert's rows (an expert with no rows
  gets zeros).

``_rows_kernel`` is one grouped GEMM ``out[rows of e] = A[rows of e] @ W_e`` with ``W_e[k, j]``
at ``w + k * stride_wk + j * stride_wn``: ``W_2^T`` in the forward, ``W_2`` and ``W_1`` in the
backward. Scheduling of the row kernels: program ``pid`` takes row tile ``pid // column
blocks`` of the concatenated per-expert tilings (expert e has ``ceil(counts[e] / BLOCK_M)`` row
tiles); it finds its expert from a running sum of the tile counts (all E counts loaded as one
vector). The grid is sized on the host for the worst case, ``ceil(n / BLOCK_M) + E`` row tiles,
which needs only ``n``: programs past the last tile run no loop iterations and store nothing.
Accumulation is fp32; fp32 operands use ``input_precision="ieee"``; the interpreter computes
bf16 ``tl.dot`` wrongly, so there the tiles are upcast (exact: bf16 products are exact in fp32).

This module imports nothing from r1fast but the package's launch helper and needs ``triton``;
without a GPU set ``TRITON_INTERPRET=1`` *before importing it*.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from r1fast.kernels._launch import on_device_of, short_trials

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _tile(counts_ptr, w_table_ptr, elem_ptr, E, n_out,
          BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          W_ALIGNED: tl.constexpr):
    """This program's tile: (its expert's weight pointer, rows [BLOCK_M] int64 and their mask,
    output columns [BLOCK_N] of ``n_out`` and their mask, whether the tile exists). Row tile
    ``pid // column blocks`` of the concatenated per-expert tilings: the expert is the number
    of experts whose tiles all come before it. Past the last expert's tiles the row mask is
    all false (no expert id equals E, so the row count sums to 0) and the expert is clamped to
    E - 1 for the address load (``elem_ptr`` gives the weights' element type). ``W_ALIGNED``:
    every address in the table is a multiple of 16 bytes. Said to the compiler, it lets the
    weight tiles be loaded 16 bytes at a time and pipelined (cp.async); an address read from
    memory is otherwise assumed 1-byte aligned, and a 16-bit weight tile comes in element by
    element, outside the pipeline."""
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
    if W_ALIGNED:
        w_ptr = tl.multiple_of(w_ptr, 16)
    cols = (pid % n_cols) * BLOCK_N + tl.arange(0, BLOCK_N)
    return (w_ptr, (first_row + local).to(tl.int64), local < rows_e, cols, cols < n_out,
            e < E)


@triton.jit
def _fc1_swiglu_kernel(x_ptr, counts_ptr, w_table_ptr, probs_ptr, h_ptr, a_ptr,
                       E, H, F, stride_x, stride_h, stride_a, glu_offset, N_BUCKET,
                       BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, SAVE_PRE: tl.constexpr, UPCAST: tl.constexpr,
                       PRECISION: tl.constexpr, W_ALIGNED: tl.constexpr):
    # w: the expert's [2F, H]; rows of x and h [BM]; columns of F [BN]
    w_ptr, rows, mask_m, cols, mask_n, valid = _tile(counts_ptr, w_table_ptr, x_ptr, E, F,
                                                     BLOCK_E, BLOCK_M, BLOCK_N, W_ALIGNED)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_x + offs_k[None, :]  # [BM, BK]
    g_ptrs = w_ptr + cols[None, :].to(tl.int64) * H + offs_k[:, None]  # [BK, BN] gate rows
    # up rows follow the gate rows; no method call on F, which the compiler makes a Python
    # int constant when it is 1
    u_ptrs = w_ptr + (cols[None, :] + F).to(tl.int64) * H + offs_k[:, None]
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
    mask = mask_m[:, None] & mask_n[None, :]  # no rows past the last expert's tiles
    gate = acc_g.to(h_ptr.dtype.element_ty)  # rounded as megatron's fc1 output
    up = acc_u.to(h_ptr.dtype.element_ty)
    if SAVE_PRE:  # the backward's a = [g | u]
        pre = a_ptr + rows[:, None] * stride_a + cols[None, :]
        tl.store(pre, gate, mask=mask)
        tl.store(pre + F, up, mask=mask)
    g = gate.to(tl.float32)
    p = tl.load(probs_ptr + rows, mask=mask_m, other=0.0).to(tl.float32)  # [BM]
    h = g * tl.sigmoid(g) * (up.to(tl.float32) + glu_offset) * p[:, None]
    tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :],
             h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward(dh, rows, cols, mask_m, mask, pid_col, a_ptr, stride_a, probs_ptr,
                     dp_ptr, n_rows, F, glu_offset, da_ptr):
    """Epilogue of ``dh = dy W_2``: ``da [BM, 2 x BN]`` of the tile into ``da_ptr`` (stride
    ``stride_a``, as ``a``) and the tile's ``sum_f dh act`` into row ``pid_col`` of ``dp_ptr
    [column blocks, n_rows]``."""
    pre = a_ptr + rows[:, None] * stride_a + cols[None, :]
    g = tl.load(pre, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(pre + F, mask=mask, other=0.0).to(tl.float32) + glu_offset
    p = tl.load(probs_ptr + rows, mask=mask_m, other=0.0).to(tl.float32)  # [BM]
    s = tl.sigmoid(g)
    silu = g * s
    dact = dh * p[:, None]
    out = da_ptr + rows[:, None] * stride_a + cols[None, :]
    tl.store(out, (dact * u * s * (1.0 + g * (1.0 - s))).to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(out + F, (dact * silu).to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(dp_ptr + pid_col.to(tl.int64) * n_rows + rows, tl.sum(dh * silu * u, 1),
             mask=mask_m)


@triton.jit
def _rows_kernel(a_ptr, counts_ptr, w_table_ptr, out_ptr, E, K, N, stride_a, stride_out,
                 stride_wk, stride_wn, N_BUCKET,
                 pre_ptr, probs_ptr, dp_ptr, n_rows, stride_pre, glu_offset,
                 BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, SWIGLU_BWD: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr, W_ALIGNED: tl.constexpr):
    # out[rows of e, :N] = A[rows of e, :K] @ W_e; with SWIGLU_BWD, out is da (N = F)
    w_ptr, rows, mask_m, cols, mask_n, valid = _tile(counts_ptr, w_table_ptr, a_ptr, E, N,
                                                     BLOCK_E, BLOCK_M, BLOCK_N, W_ALIGNED)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_a + offs_k[None, :]  # [BM, BK]
    w_ptrs = (w_ptr + offs_k[:, None].to(tl.int64) * stride_wk
              + cols[None, :].to(tl.int64) * stride_wn)  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(valid, K, 0)
    for k0 in range(0, k_end, BLOCK_K):
        mask_k = k0 + offs_k < K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    mask = mask_m[:, None] & mask_n[None, :]  # no rows past the last expert's tiles
    if SWIGLU_BWD:
        _swiglu_backward(acc, rows, cols, mask_m, mask, tl.program_id(0) % tl.cdiv(N, BLOCK_N),
                         pre_ptr, stride_pre, probs_ptr, dp_ptr, n_rows, N, glu_offset, out_ptr)
    else:
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _weight_grad_kernel(a_ptr, b_ptr, counts_ptr, out_ptr, E, M, N, stride_a, stride_b,
                        N_BUCKET, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
                        PRECISION: tl.constexpr):
    # out[e] [M, N] = A[rows of e, :M]^T @ B[rows of e, :N]; one program per (e, tile)
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_expert = tl.cdiv(M, BLOCK_M) * tiles_n
    e = pid // per_expert
    t = pid % per_expert
    e_ids = tl.arange(0, BLOCK_E)
    cnt = tl.load(counts_ptr + e_ids, mask=e_ids < E, other=0).to(tl.int32)  # [BLOCK_E]
    first_row = tl.sum(tl.where(e_ids < e, cnt, 0), 0)
    rows_e = tl.sum(tl.where(e_ids == e, cnt, 0), 0)
    offs_m = (t // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (t % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    rows = (first_row + offs_k).to(tl.int64)
    at_ptrs = a_ptr + rows[None, :] * stride_a + offs_m[:, None]  # [BM, BK]: A^T
    b_ptrs = b_ptr + rows[:, None] * stride_b + offs_n[None, :]  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, rows_e, BLOCK_K):
        mask_k = k0 + offs_k < rows_e
        at = tl.load(at_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            at, b = at.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(at, b, acc, input_precision=PRECISION)
        at_ptrs += BLOCK_K * stride_a
        b_ptrs += BLOCK_K * stride_b
    out = out_ptr + e.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------- launchers

def _configs(name: str) -> list:
    """Row tiles from 16 (decoding: a few rows per expert) to 128 (prefill and training
    batches). fc1 holds two accumulators (gate and up) and loads two weight tiles, so its
    tiles are narrower, and so are those of dh, whose epilogue is the SwiGLU backward; the
    weight gradients reduce over an expert's rows, so their tiles are square and long in k.
    Every config compiles for sm_90 without spilling (bench/kernel_resources.py, workload
    ``moe_experts``)."""
    shapes = {
        "fc1": [(16, 64, 64, 4, 4), (32, 64, 64, 8, 3), (64, 64, 64, 8, 3),
                (128, 64, 64, 8, 3)],
        "rows": [(16, 128, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 4),
                 (128, 128, 64, 8, 3)],
        # the row GEMM with the SwiGLU backward in its epilogue (three [BM, BN] fp32 values
        # live at once): a 128x128 tile spills there
        "dh": [(16, 128, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 4),
               (128, 64, 64, 8, 3)],
        "wgrad": [(64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 32, 8, 3),
                  (128, 128, 64, 8, 3)],
    }[name]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w,
                          num_stages=st) for m, n, k, w, st in shapes]


#: autotune keys: the sizes, the row-count bucket, and what changes the access pattern
_KEYS = {"fc1": ["E", "H", "F", "N_BUCKET", "SAVE_PRE", "W_ALIGNED"],
         "rows": ["E", "K", "N", "N_BUCKET", "stride_wk", "W_ALIGNED"],
         "dh": ["E", "K", "N", "N_BUCKET", "W_ALIGNED"],
         "wgrad": ["E", "M", "N", "N_BUCKET"]}
_KERNELS = {"fc1": _fc1_swiglu_kernel, "rows": _rows_kernel, "dh": _rows_kernel,
            "wgrad": _weight_grad_kernel}
#: where the row-count bucket sits among each kernel's runtime arguments
_BUCKET_AT = {"fc1": 13, "rows": 11, "dh": 11, "wgrad": 9}
_INTERP_TILE = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
_tuned: dict[str, object] = {}


#: outputs a config may leave partly unwritten, zeroed before each autotuning trial and before
#: the chosen config's run: dh's dp has one row per column block, and a wider tile writes fewer
#: rows than a narrower trial did (their sums would be counted twice)
_RESET = {"dh": ["dp_ptr"]}


def autotuned(name: str):
    """Kernel ``name`` under Triton's autotuner (its configs, keys and resets)."""
    return triton.autotune(_configs(name), key=_KEYS[name], reset_to_zero=_RESET.get(name),
                           do_bench=short_trials)(_KERNELS[name])


def _kernel(name: str):
    """Plain under the interpreter; autotuned on a GPU (built once)."""
    if name not in _tuned:
        _tuned[name] = _KERNELS[name] if INTERPRET else autotuned(name)
    return _tuned[name]


_pinned: dict[str, triton.Config] = {}


@contextlib.contextmanager
def pinned_config(name: str, config: triton.Config):
    """While active, kernel ``name`` launches with ``config`` instead of the autotuner's pick
    (or the interpreter's small tile): tests check every config's numbers, not only those of
    the one a GPU picks for their shape."""
    _pinned[name] = config
    try:
        yield
    finally:
        del _pinned[name]


def _launch(name: str, n: int, E: int, grid_of, *args, **constexprs) -> None:
    """Launch kernel ``name`` for ``n`` rows, ``grid_of(meta) -> programs``; ``args`` are the
    kernel's runtime arguments before the row-count bucket (an autotune key that the kernel
    does not read, appended here) and the ones after it."""
    precision = "ieee" if args[0].dtype == torch.float32 or INTERPRET else "tf32"
    # at least 16: one compiled variant for every E up to 16 (tests and small models meet
    # many), the extra lanes masked
    fixed = dict(BLOCK_E=max(16, triton.next_power_of_2(E)), UPCAST=INTERPRET,
                 PRECISION=precision, **constexprs)
    kernel, pinned = _kernel(name), _pinned.get(name)
    if pinned is not None:
        kernel = _KERNELS[name]
        fixed.update(pinned.kwargs)
        if not INTERPRET:
            fixed.update(num_warps=pinned.num_warps, num_stages=pinned.num_stages)
    elif INTERPRET:
        fixed.update(_INTERP_TILE)
    bucket = triton.next_power_of_2(max(n, 1))
    before, after = args[:_BUCKET_AT[name]], args[_BUCKET_AT[name]:]
    grid = (lambda m: (grid_of(m),))
    autotuned_here = pinned is None and not INTERPRET
    with on_device_of(args[0]):
        kernel[grid if autotuned_here else grid(fixed)](*before, bucket, *after, **fixed)


def _row_tiles(n: int, E: int, cols: int):
    """Grid of a row kernel: the worst case of the per-expert tilings (module doc)."""
    return lambda m: (triton.cdiv(n, m["BLOCK_M"]) + E) * triton.cdiv(cols, m["BLOCK_N"])


def _rows(a: torch.Tensor, counts: torch.Tensor, table: torch.Tensor, out: torch.Tensor,
          K: int, N: int, stride_wk: int, stride_wn: int, aligned: bool) -> None:
    """``out[rows of e, :N] = a[rows of e, :K] @ W_e`` (``W_e[k, j]`` at ``k * stride_wk + j *
    stride_wn`` from the table's address of expert e)."""
    n, E = a.shape[0], counts.numel()
    _launch("rows", n, E, _row_tiles(n, E, N), a, counts, table, out, E, K, N, a.stride(0),
            out.stride(0), stride_wk, stride_wn, a, a, a, n, 0, 0.0, SWIGLU_BWD=False,
            W_ALIGNED=aligned)


def grouped_swiglu_mlp(x: torch.Tensor, counts: torch.Tensor, fc1_table: torch.Tensor,
                       fc2_table: torch.Tensor, probs: torch.Tensor, ffn: int,
                       glu_offset: float = 0.0, *, aligned: bool,
                       h: torch.Tensor | None = None, out: torch.Tensor | None = None,
                       pre: torch.Tensor | None = None) -> torch.Tensor:
    """``out [n, H]`` (dtype of x): each expert's SwiGLU MLP over its rows of ``x [n, H]``,
    scaled by ``probs [n]`` before the down projection. ``counts [E]`` rows per expert (on
    x's device), ``fc1_table``/``fc2_table [E]`` int64 addresses of contiguous ``[2*ffn, H]``
    and ``[H, ffn]`` weights of x's dtype; ``aligned``: every address in both tables is a
    multiple of 16 bytes (a promise to the compiler: ``ExpertTable.aligned``; False runs
    slower loads, not wrong ones). ``h [n, ffn]`` / ``out`` may be preallocated (tests
    poison them); ``pre [n, 2*ffn]``, when given, receives the pre-activations ``[g | u]`` (the
    backward's input)."""
    n, H = x.shape
    E = counts.numel()
    h = x.new_empty((n, ffn)) if h is None else h
    out = x.new_empty((n, H)) if out is None else out
    if n == 0:
        return out
    counts = counts.contiguous()
    _launch("fc1", n, E, _row_tiles(n, E, ffn), x, counts, fc1_table, probs.contiguous(), h,
            h if pre is None else pre, E, H, ffn, x.stride(0), h.stride(0),
            0 if pre is None else pre.stride(0), float(glu_offset), SAVE_PRE=pre is not None,
            W_ALIGNED=aligned)
    _rows(h, counts, fc2_table, out, ffn, H, 1, ffn, aligned)  # y = h W_2^T
    return out


def grouped_swiglu_mlp_backward(dy: torch.Tensor, x: torch.Tensor, pre: torch.Tensor,
                                h: torch.Tensor, counts: torch.Tensor, fc1_table: torch.Tensor,
                                fc2_table: torch.Tensor, probs: torch.Tensor,
                                glu_offset: float = 0.0, *, aligned: bool,
                                x_grad: bool = True, weights: bool = True,
                                out: dict | None = None) -> dict:
    """Gradients of :func:`grouped_swiglu_mlp` from ``dy [n, H]``, given the forward's ``x``,
    ``pre [n, 2F]`` and ``h [n, F]``: a dict with ``probs [n]`` (fp32) always, ``x [n, H]``
    when ``x_grad``, ``fc1 [E, 2F, H]`` and ``fc2 [E, H, F]`` (x's dtype) when ``weights``.
    ``out`` may hold preallocated ``da``, ``x``, ``fc1``, ``fc2`` (tests poison them)."""
    n, H = x.shape
    F, E = h.shape[1], counts.numel()
    out = out or {}

    def buffer(name, like, shape):  # the caller's, else a new one
        return out[name] if name in out else like.new_empty(shape)

    da = buffer("da", pre, pre.shape)  # [n, 2F]
    grads = {"x": buffer("x", x, x.shape)} if x_grad else {}
    if weights:
        grads["fc1"] = buffer("fc1", x, (E, 2 * F, H))
        grads["fc2"] = buffer("fc2", x, (E, H, F))
    if n == 0:
        grads["probs"] = probs.new_zeros((0,), dtype=torch.float32)
        if weights:
            grads["fc1"].zero_()
            grads["fc2"].zero_()
        return grads
    counts, dy = counts.contiguous(), dy.contiguous()
    # one row of dp per column block of the tile the autotuner picks: as many as the
    # narrowest tile makes, the unused ones zero
    narrowest = _INTERP_TILE["BLOCK_N"] if INTERPRET else min(
        c.kwargs["BLOCK_N"] for c in _configs("dh"))
    dp = torch.zeros((triton.cdiv(F, narrowest), n), device=x.device, dtype=torch.float32)
    _launch("dh", n, E, _row_tiles(n, E, F), dy, counts, fc2_table, da, E, H, F,
            dy.stride(0), da.stride(0), F, 1, pre, probs.contiguous(), dp, n, pre.stride(0),
            float(glu_offset), SWIGLU_BWD=True, W_ALIGNED=aligned)  # dh = dy W_2 -> da, dp
    grads["probs"] = dp.sum(0)
    if x_grad:
        _rows(da, counts, fc1_table, grads["x"], 2 * F, H, H, 1, aligned)  # dx = da W_1
    if weights:
        for name, a, b in (("fc1", da, x), ("fc2", dy, h)):
            M, N = a.shape[1], b.shape[1]
            _launch("wgrad", n, E, lambda m, M=M, N=N: E * triton.cdiv(M, m["BLOCK_M"])
                    * triton.cdiv(N, m["BLOCK_N"]), a, b, counts, grads[name], E, M, N,
                    a.stride(0), b.stride(0))
    return grads
