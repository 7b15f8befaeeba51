"""linear_logprob on GEMM tiles: cuBLAS computes each logit tile, Triton reduces it.

The same op as ``linear_logprob.py`` (read its docstring for the math), arranged the other way
round. There, one Triton kernel computes a logit tile on the tensor cores and folds it into
the softmax statistics in its epilogue, so the logits never reach memory; its speed is that of
a Triton GEMM. Here the logits of a ``[chunk_tokens, chunk_vocab]`` tile are written in fp32
by a vendor GEMM (``torch.mm`` with ``out_dtype=float32`` on CUDA: cuBLAS, bf16/fp16 inputs,
fp32 accumulation and output), and bandwidth-bound Triton row kernels read the tile back:

- forward: ``_tile_stats_kernel`` turns each tile row into the partial (m, s, S, z_y) of that
  vocabulary chunk; chunks merge with the same rule as vocabulary splits and shards;
- backward: the tile is recomputed, ``_tile_dz_kernel`` writes ``dz / tau`` in the input dtype,
  and two more GEMMs give ``dx += dz W`` (fp32) and ``dW = dz^T x``.

Cost against the fused kernels: the same 2THV + 6THV FLOPs, plus 8 bytes per logit forward
(write and read the fp32 tile) and 10 backward (write, read, write dz in 16 bits), and the
backward's ``dx += dz W`` per vocabulary chunk (the fp32 ``[T, H]`` GEMM result written, then
it and dx read and dx written: 1 GB per chunk at T=16384, H=4096; 19 chunks of 8192 columns).
At T=16384, V=151936 that is ~45 + ~19 GB of traffic, ~20 ms at 3.35 TB/s, next to ~115 ms
of GEMMs at 700 TFLOP/s: this arrangement wins when cuBLAS runs its GEMMs more than ~17%
faster than the fused Triton kernels run theirs. Which one does is measured by
bench/bench_linear_logprob.py on the GPU. Workspace: the fp32 tile and its 16-bit dz,
``chunk_tokens x chunk_vocab`` each.

On a CPU (tests, the interpreter) the tile GEMM is an fp32 ``torch.mm`` of upcast operands:
the same numbers, since bf16 products are exact in fp32.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from r1fast.kernels._launch import on_device_of
from r1fast.kernels.linear_logprob import INTERPRET, chunk_tiles, rows_of

_ROW_BLOCK = 4096 if not INTERPRET else 64  # columns per step of a row kernel


@triton.jit
def _inv_tau_of_row(inv_tau, row, ROW_TAU: tl.constexpr):
    """1/tau of one row: ``inv_tau[row]`` with ``ROW_TAU``, else the one float ``inv_tau``."""
    if ROW_TAU:
        scale = tl.load(inv_tau + row)
    else:
        scale = inv_tau
    return scale


@triton.jit
def _tile_stats_kernel(z_ptr, y_ptr, m_ptr, s_ptr, sz_ptr, zy_ptr, V, stride_zt, inv_tau,
                       vocab_start, BLOCK_V: tl.constexpr, ROW_TAU: tl.constexpr):
    """One row of an fp32 logit tile -> this chunk's online statistics of ``z * inv_tau``."""
    row = tl.program_id(0)
    scale = _inv_tau_of_row(inv_tau, row, ROW_TAU)
    y = (tl.load(y_ptr + row).to(tl.int64) - vocab_start).to(tl.int32)  # local id, or outside
    z_row = z_ptr + row.to(tl.int64) * stride_zt
    m = float("-inf")
    s = 0.0
    sz = 0.0
    zy = 0.0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(z_row + offs, mask=mask, other=float("-inf")) * scale  # [BV]
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)  # masked columns: exp(-inf) = 0
        s = s * alpha + tl.sum(e, axis=0)
        sz = sz * alpha + tl.sum(e * tl.where(mask, z, 0.0), axis=0)
        zy += tl.sum(tl.where((offs == y) & mask, z, 0.0), axis=0)
        m = m_new
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(sz_ptr + row, sz)
    tl.store(zy_ptr + row, zy)


@triton.jit
def _tile_dz_kernel(z_ptr, dz_ptr, y_ptr, lse_ptr, ent_ptr, g_ptr, h_ptr, V, stride_zt,
                    stride_dzt, inv_tau, vocab_start, BLOCK_V: tl.constexpr,
                    ROW_TAU: tl.constexpr):
    """One row: ``dz / tau`` from the fp32 logits, in dz's dtype (the next GEMMs' input)."""
    row = tl.program_id(0)
    scale = _inv_tau_of_row(inv_tau, row, ROW_TAU)
    y = (tl.load(y_ptr + row).to(tl.int64) - vocab_start).to(tl.int32)
    lse = tl.load(lse_ptr + row)
    ent = tl.load(ent_ptr + row)
    g = tl.load(g_ptr + row)
    h = tl.load(h_ptr + row)
    z_row = z_ptr + row.to(tl.int64) * stride_zt
    dz_row = dz_ptr + row.to(tl.int64) * stride_dzt
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(z_row + offs, mask=mask, other=0.0) * scale
        p = tl.exp(z - lse)  # fp32: 1 - p_y never goes through a 16-bit number
        dz = tl.where(offs == y, g, 0.0) - p * (g + h * (z - lse + ent))
        tl.store(dz_row + offs, (dz * scale).to(dz_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

@contextlib.contextmanager
def _ieee_fp32():
    """fp32 GEMMs exact in fp32 (no TF32), whatever TF32 setting the caller chose (the fused
    tiles use IEEE fp32 too), and that setting as it was afterwards. Through torch's precision
    API where it exists (torch >= 2.9): after a caller set it, reading the legacy
    ``allow_tf32`` flag raises, and writing the flag over ``set_float32_matmul_precision
    ("medium")`` left torch in a mixed state whose getter raised for the rest of the process."""
    matmul = torch.backends.cuda.matmul
    name, ieee = (("fp32_precision", "ieee") if hasattr(matmul, "fp32_precision")
                  else ("allow_tf32", False))
    before = getattr(matmul, name)
    setattr(matmul, name, ieee)
    try:
        yield
    finally:
        setattr(matmul, name, before)


def mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = a @ b`` in out's dtype, rounded once from fp32 accumulators."""
    if a.is_cuda and a.dtype == torch.float32:
        with _ieee_fp32():
            torch.mm(a, b, out=out)
    elif a.is_cuda:  # 16-bit operands: TF32 does not apply
        torch.mm(a, b, out=out)
    else:
        out.copy_(torch.mm(a.float(), b.float()))


def tile_stats(z: torch.Tensor, targets: torch.Tensor, inv_temperature: float | torch.Tensor,
               vocab_start: int, out: torch.Tensor) -> torch.Tensor:
    """``out [4, t]`` (views allowed) = the (m, s, S, z_y) of each row of the fp32 logit tile
    ``z [t, v]`` (unit column stride) scaled by ``inv_temperature`` (one float, or ``[t]``
    fp32: one per row); ``vocab_start`` is the global id of the tile's first column."""
    if z.shape[0]:
        m, s, sz, zy = out
        with on_device_of(z):
            _tile_stats_kernel[(z.shape[0],)](
                z, targets, m, s, sz, zy, z.shape[1], z.stride(0), inv_temperature, vocab_start,
                BLOCK_V=_ROW_BLOCK, ROW_TAU=isinstance(inv_temperature, torch.Tensor),
                num_warps=8)
    return out


def tile_dz(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor,
            grad_logp: torch.Tensor, grad_ent: torch.Tensor,
            inv_temperature: float | torch.Tensor, vocab_start: int,
            out: torch.Tensor) -> torch.Tensor:
    """``out [t, v]`` (its dtype, unit column stride) = ``dz / tau`` of the logit tile ``z``;
    the row vectors are ``[t]`` fp32."""
    if z.shape[0]:
        with on_device_of(z):
            _tile_dz_kernel[(z.shape[0],)](
                z, out, targets, lse, ent, grad_logp, grad_ent, z.shape[1], z.stride(0),
                out.stride(0), inv_temperature, vocab_start, BLOCK_V=_ROW_BLOCK,
                ROW_TAU=isinstance(inv_temperature, torch.Tensor), num_warps=8)
    return out


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result and fp32 accumulation: cuBLAS with ``out_dtype`` for
    16-bit CUDA operands, an fp32 GEMM of upcast operands elsewhere (the same numbers)."""
    if a.is_cuda and a.dtype != torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    with _ieee_fp32():
        return torch.mm(a.float(), b.float())


def forward_partials(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     inv_temperature: float | torch.Tensor, vocab_start: int, chunk_tokens: int,
                     chunk_vocab: int) -> torch.Tensor:
    """``[n_chunks, 4, T]`` fp32 statistics (m, s, S, z_y) of each vocabulary chunk of this
    weight shard; the caller merges them as it merges vocabulary splits."""
    T = hidden.shape[0]
    V = weight.shape[0]
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    ct, cv = max(1, min(T, chunk_tokens)), min(V, chunk_vocab)
    stats = torch.empty(triton.cdiv(V, cv), 4, T, device=hidden.device, dtype=torch.float32)
    with on_device_of(hidden):
        for t0, t1, v0, v1 in chunk_tiles(T, V, ct, cv):
            z = mm_fp32(hidden[t0:t1], weight[v0:v1].t())  # [t, v] fp32 logits * tau
            tile_stats(z, targets[t0:t1], rows_of(inv_temperature, t0, t1), vocab_start + v0,
                       stats[v0 // cv, :, t0:t1])
            del z  # the allocator hands the same block to the next tile
    return stats


def backward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
             lse: torch.Tensor, ent: torch.Tensor, grad_logp: torch.Tensor,
             grad_ent: torch.Tensor, inv_temperature: float | torch.Tensor, vocab_start: int,
             chunk_tokens: int, chunk_vocab: int, *,
             need_weight_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``dx [T, H]`` fp32 and ``dW [V, H]`` in weight's dtype (None when not needed), as
    ``linear_logprob.backward``; with more than one token chunk a 16-bit dW is accumulated in
    an fp32 ``[V, H]`` buffer."""
    T, H = hidden.shape
    V = weight.shape[0]
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    rows = [t.contiguous().float() for t in (lse, ent, grad_logp, grad_ent)]
    dx = torch.zeros(T, H, device=hidden.device, dtype=torch.float32)
    dw = torch.empty_like(weight) if need_weight_grad else None
    if T == 0:
        return dx, dw.zero_() if dw is not None else None
    ct, cv = min(T, chunk_tokens), min(V, chunk_vocab)
    one_chunk = T <= ct
    dw_acc = None if dw is None or one_chunk else torch.zeros(V, H, device=dw.device,
                                                              dtype=torch.float32)
    ws = torch.empty(ct, cv, device=hidden.device, dtype=hidden.dtype)  # dz / tau
    with on_device_of(hidden):
        for t0, t1, v0, v1 in chunk_tiles(T, V, ct, cv):
            x, w = hidden[t0:t1], weight[v0:v1]
            z = mm_fp32(x, w.t())  # [t, v] fp32, recomputed
            dz = tile_dz(z, targets[t0:t1], *(v[t0:t1] for v in rows),
                         rows_of(inv_temperature, t0, t1), vocab_start + v0,
                         ws[: t1 - t0, : v1 - v0])
            del z
            dx[t0:t1] += mm_fp32(dz, w)  # dx += dz @ W
            if dw is not None and one_chunk:  # dW of this vocabulary chunk, written once
                mm_into(dz.t(), x, dw[v0:v1])
            elif dw is not None:
                dw_acc[v0:v1] += mm_fp32(dz.t(), x)
    if dw_acc is not None:
        dw.copy_(dw_acc)
    return dx, dw
