"""Triton kernels for the fused linear log-prob + entropy op (forward and backward).

What is computed (docs/DESIGN.md §3). For hidden states ``x[T, H]``, an LM-head shard
``W[V, H]`` and a temperature ``tau`` (one float, or one per row: ``ROW_TAU``), the logits are
``z = x W^T / tau`` (``[T, V]``, never stored). The forward streams ``z`` tile by tile and
keeps, per row, the online statistics

    m  = max_j z_j                       (running max; -inf before the first tile)
    s  = sum_j exp(z_j - m)              (rescaled by exp(m_old - m_new) when m grows)
    S  = sum_j exp(z_j - m) * z_j        (same rescaling; gives the entropy)
    zy = z_y                             (the target logit, if the target is in this shard)

from which ``lse = m + log s``, ``logp = zy - lse`` and ``entropy = lse - S / s``. The backward
recomputes ``p = exp(z - lse)`` and

    dz_j = g * (1[j = y] - p_j) - h * p_j * (z_j - lse + entropy)     (g = dL/dlogp, h = dL/dH)
    dx = dz W / tau,        dW = dz^T x / tau

Kernels
- ``_fwd_kernel``: each program owns BLOCK_T rows and one *vocabulary split* (a contiguous run
  of BLOCK_V blocks); it writes the split's partial (m, s, S, zy) to ``[NUM_SPLITS, T]`` buffers
  that the caller merges (``M = max m``, ``s = sum s e^{m-M}``, ``S = sum S e^{m-M}``,
  ``zy = sum zy``; the same rule merges vocab-parallel shards across ranks).
  Splitting the vocabulary fills the GPU when T is small, and programs are ordered in groups of
  GROUP_T row blocks x all splits, so the few X row tiles and W vocab tiles that concurrently
  running programs touch stay in L2 (otherwise every program would stream its own X tile from
  HBM for every vocabulary block and the forward would become memory-bound).
- ``_dz_kernel``: recomputes a logit tile and writes ``dz / tau`` for one (token chunk, vocab
  chunk) into a bounded workspace ``[chunk_tokens, chunk_vocab]``.
- ``_mm_kernel``: a plain tiled GEMM ``C (+)= A @ B`` with fp32 accumulation; used twice per
  chunk: ``dx[chunk] (+)= dz @ W[chunk]`` and ``dW[chunk] (+)= dz^T @ x[chunk]``. When there is
  more than one token chunk, dW accumulates in an fp32 buffer and is cast once at the end.
  No atomics anywhere, so results are bitwise deterministic.

Numerics: every tile is loaded in the input dtype and multiplied with fp32 accumulation;
softmax arithmetic is fp32. fp32 inputs use ``input_precision="ieee"`` (no TF32). The Triton
interpreter computes bf16 ``tl.dot`` wrongly, so under the interpreter tiles are upcast to fp32
before the dot (exact: bf16 products are exact in fp32). The dz workspace is stored in the input
dtype for bf16/fp16 (so the two backward GEMMs run on tensor cores) and in fp32 for fp32.

This module imports nothing from r1fast but the package's launch helper and needs ``triton``;
without a GPU set ``TRITON_INTERPRET=1`` *before importing it* (triton.jit reads it at
decoration time).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from r1fast.kernels._launch import on_device_of, short_trials

#: triton.jit returns interpreted functions when this is set at import time, so the launchers
#: decide block sizes and the bf16 upcast from the same snapshot.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_GROUP = 8  # row-block grouping of the backward GEMMs (L2 reuse), as in the Triton tutorials
_FWD_GROUP_T = 16  # row blocks per forward group; x NUM_SPLITS programs run together


# ----------------------------------------------------------------------------- device code

@triton.jit
def _logit_tile(x_ptr, w_ptr, offs_t, offs_v, mask_t, mask_v, H, stride_xt, stride_wv,
                BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                EVEN_H: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc[BLOCK_T, BLOCK_V] = x[offs_t, :] @ W[offs_v, :]^T in fp32 (not yet divided by tau)."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    x_ptrs = x_ptr + offs_t[:, None].to(tl.int64) * stride_xt + offs_h[None, :]  # [BT, BH]
    w_ptrs = w_ptr + offs_v[None, :].to(tl.int64) * stride_wv + offs_h[:, None]  # [BH, BV]
    for h0 in range(0, H, BLOCK_H):
        if EVEN_H:
            x = tl.load(x_ptrs, mask=mask_t[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_v[None, :], other=0.0)
        else:
            mask_h = (h0 + offs_h) < H
            x = tl.load(x_ptrs, mask=mask_t[:, None] & mask_h[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_h[:, None] & mask_v[None, :], other=0.0)
        if UPCAST:  # interpreter only: its bf16 dot is wrong
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    return acc


@triton.jit
def _inv_tau_of_rows(inv_tau, offs_t, mask_t, ROW_TAU: tl.constexpr):
    """The factor 1/tau of rows ``offs_t``: ``[BT, 1]`` loaded from ``inv_tau [T]`` with
    ``ROW_TAU``, else the one float ``inv_tau`` itself (the scalar path's code is unchanged)."""
    if ROW_TAU:
        scale = tl.load(inv_tau + offs_t, mask=mask_t, other=1.0)[:, None]
    else:
        scale = inv_tau
    return scale


@triton.jit
def _grouped_pid(pid, n_rows, n_cols, GROUP: tl.constexpr):
    """(row block, column block) of program ``pid`` in grouped order: GROUP row blocks x all
    column blocks are adjacent program ids, so a wave of programs reuses the same rows in L2."""
    per_group = GROUP * n_cols
    first = (pid // per_group) * GROUP
    group_size = tl.minimum(n_rows - first, GROUP)
    local = pid % per_group
    return first + local % group_size, local // group_size


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, y_ptr, m_ptr, s_ptr, sz_ptr, zy_ptr,
                T, V, H, stride_xt, stride_wv, inv_tau, vocab_start, NUM_SPLITS, T_BUCKET,
                BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                GROUP_T: tl.constexpr, EVEN_H: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, ROW_TAU: tl.constexpr):
    pid_t, split = _grouped_pid(tl.program_id(0), tl.cdiv(T, BLOCK_T), NUM_SPLITS, GROUP_T)

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    scale = _inv_tau_of_rows(inv_tau, offs_t, mask_t, ROW_TAU)  # [BT, 1], or the one float
    # local target id; targets of other shards / ignore_index fall outside [0, V) and never match
    # int32: the [BT, BV] comparison with the column ids below costs half the registers of int64
    y = (tl.load(y_ptr + offs_t, mask=mask_t, other=-1).to(tl.int64) - vocab_start) \
        .to(tl.int32)  # [BT]

    blocks_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), NUM_SPLITS)
    v_begin = split * blocks_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + blocks_per_split * BLOCK_V, V)

    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)  # -inf identity: empty splits merge as 0
    s = tl.zeros((BLOCK_T,), tl.float32)
    sz = tl.zeros((BLOCK_T,), tl.float32)
    zy = tl.zeros((BLOCK_T,), tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        acc = _logit_tile(x_ptr, w_ptr, offs_t, offs_v, mask_t, mask_v, H, stride_xt, stride_wv,
                          BLOCK_T, BLOCK_V, BLOCK_H, EVEN_H, UPCAST, PRECISION)
        z = tl.where(mask_v[None, :], acc * scale, float("-inf"))  # [BT, BV]
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: each block has a valid column
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])  # padded columns: exp(-inf) = 0
        s = s * alpha + tl.sum(e, axis=1)
        # padded columns: e = 0 but z = -inf, so multiply by a zeroed z (0 * -inf is NaN)
        sz = sz * alpha + tl.sum(e * tl.where(mask_v[None, :], z, 0.0), axis=1)
        m = m_new
        # mask_v too: a target of another shard may equal a padded column id (z = -inf there)
        hit = (offs_v[None, :] == y[:, None]) & mask_v[None, :]
        zy += tl.sum(tl.where(hit, z, 0.0), axis=1)

    out = split * T + offs_t
    tl.store(m_ptr + out, m, mask=mask_t)
    tl.store(s_ptr + out, s, mask=mask_t)
    tl.store(sz_ptr + out, sz, mask=mask_t)
    tl.store(zy_ptr + out, zy, mask=mask_t)


@triton.jit
def _dz_kernel(x_ptr, w_ptr, y_ptr, lse_ptr, ent_ptr, g_ptr, h_ptr, dz_ptr,
               T, V, H, stride_xt, stride_wv, stride_dzt, inv_tau, vocab_start, T_BUCKET,
               BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
               GROUP_T: tl.constexpr, EVEN_H: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr, ROW_TAU: tl.constexpr):
    pid_t, pid_v = _grouped_pid(tl.program_id(0), tl.cdiv(T, BLOCK_T), tl.cdiv(V, BLOCK_V),
                                GROUP_T)

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_t = offs_t < T
    mask_v = offs_v < V
    y = tl.load(y_ptr + offs_t, mask=mask_t, other=-1).to(tl.int64) - vocab_start
    lse = tl.load(lse_ptr + offs_t, mask=mask_t, other=0.0)
    ent = tl.load(ent_ptr + offs_t, mask=mask_t, other=0.0)
    g = tl.load(g_ptr + offs_t, mask=mask_t, other=0.0)
    h = tl.load(h_ptr + offs_t, mask=mask_t, other=0.0)
    scale = _inv_tau_of_rows(inv_tau, offs_t, mask_t, ROW_TAU)  # [BT, 1], or the one float

    acc = _logit_tile(x_ptr, w_ptr, offs_t, offs_v, mask_t, mask_v, H, stride_xt, stride_wv,
                      BLOCK_T, BLOCK_V, BLOCK_H, EVEN_H, UPCAST, PRECISION)
    z = acc * scale
    p = tl.exp(z - lse[:, None])  # [BT, BV], fp32: 1 - p_y never goes through a 16-bit buffer
    dz = tl.where(offs_v[None, :] == y[:, None], g[:, None], 0.0) \
        - p * (g[:, None] + h[:, None] * (z - lse[:, None] + ent[:, None]))
    dz = dz * scale  # fold 1/tau of both dx and dW here
    ptrs = dz_ptr + offs_t[:, None].to(tl.int64) * stride_dzt + offs_v[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_v[None, :])


@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
               stride_cm, stride_cn, K_BUCKET, M_BUCKET, A_ROWS,
               ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr):
    """C[M, N] (+)= A[M, K] @ B[K, N], fp32 accumulator; C may be fp32 or 16-bit. K_BUCKET,
    M_BUCKET and A_ROWS (A row-major) only key the autotuner."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N),
                                GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am \
        + offs_k[None, :].to(tl.int64) * stride_ak  # [BM, BK]
    b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk \
        + offs_n[None, :].to(tl.int64) * stride_bn  # [BK, BN]
    # Accumulating GEMMs start from C: adding C after the loop would hold a second
    # [BM, BN] fp32 tile in registers at the epilogue, and the 128x256 tiles spill then.
    if ACCUMULATE:
        c_in = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
        acc = tl.load(c_in, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------- launch configs

def _cfg(names, values, warps, stages):
    return triton.Config(dict(zip(names, values)), num_warps=warps, num_stages=stages)


_TILE = ("BLOCK_T", "BLOCK_V", "BLOCK_H")
_MM = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
# Hopper, 16-bit inputs (wgmma): 128-row tiles over 8 warps, K=64 steps, 3-4 stages. Every config
# here compiles without spills inside a loop (bench/kernel_resources.py, sm_90, Triton 3.6); a
# 128x256 tile does not fit: the forward then spilled 134 times in its vocabulary loop.
_TILE_CONFIGS_16 = [
    _cfg(_TILE, (128, 128, 64), 8, 3),
    _cfg(_TILE, (128, 128, 64), 8, 4),
    _cfg(_TILE, (64, 256, 64), 8, 3),
    _cfg(_TILE, (128, 64, 64), 4, 4),
    _cfg(_TILE, (64, 128, 64), 4, 4),
]
_MM_CONFIGS_16 = [
    _cfg(_MM, (128, 256, 64), 8, 3),
    _cfg(_MM, (256, 128, 64), 8, 3),
    _cfg(_MM, (128, 128, 64), 8, 4),
    _cfg(_MM, (64, 128, 64), 4, 4),
]
# fp32 inputs take the exact FMA path (no TF32): smaller tiles, or the accumulators spill
# (64x64 with K=32 steps spilled in the forward's loop on 4 warps; K=16 steps do not).
_TILE_CONFIGS_32 = [
    _cfg(_TILE, (64, 64, 16), 4, 3),
    _cfg(_TILE, (64, 128, 32), 8, 3),
    _cfg(_TILE, (128, 64, 32), 8, 3),
]
_MM_CONFIGS_32 = [
    _cfg(_MM, (128, 128, 32), 8, 3),
    _cfg(_MM, (64, 128, 32), 4, 3),
    _cfg(_MM, (64, 64, 32), 4, 3),
]


def _by_dtype(fp32_configs, ptr_arg):
    """Autotune pruner: the fp32 list for fp32 operands, the 16-bit list otherwise."""
    def prune(configs, named_args, **_):
        want_fp32 = named_args[ptr_arg].dtype == torch.float32
        return [c for c in configs if any(c is f for f in fp32_configs) == want_fp32]
    return prune


# The interpreter runs every tile op in numpy: small tiles keep tests fast and still exercise
# several blocks and the masks at odd shapes.
_INTERP_TILE = {"BLOCK_T": 16, "BLOCK_V": 32, "BLOCK_H": 16}
_INTERP_MM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}

_tuned: dict[str, object] = {}


def _kernel(name: str):
    """The kernel to launch: plain under the interpreter, autotuned on a GPU (built once).

    Autotune keys leave the token count out (it changes every RL step) except as a power-of-two
    bucket, so a new batch length does not trigger a new tuning run."""
    if name in _tuned:
        return _tuned[name]
    kernel = {"fwd": _fwd_kernel, "dz": _dz_kernel, "mm": _mm_kernel}[name]
    if name != "mm":  # EVEN_H drops the H mask from the inner loop when BLOCK_H divides H
        kernel = triton.heuristics({"EVEN_H": lambda a: a["H"] % a["BLOCK_H"] == 0})(kernel)
    if not INTERPRET:
        if name == "mm":
            # restore C between trials: with ACCUMULATE the kernel reads what it writes
            kernel = triton.autotune(
                # dx (dz row-major) and dW (dz transposed) can share N and K: the layout of A
                # and an M bucket keep their tunings apart
                _MM_CONFIGS_16 + _MM_CONFIGS_32,
                key=["N", "K_BUCKET", "M_BUCKET", "A_ROWS", "ACCUMULATE"],
                prune_configs_by={"early_config_prune": _by_dtype(_MM_CONFIGS_32, "a_ptr")},
                restore_value=["c_ptr"], do_bench=short_trials)(kernel)
        else:
            prune = _by_dtype(_TILE_CONFIGS_32, "x_ptr")
            kernel = triton.autotune(
                _TILE_CONFIGS_16 + _TILE_CONFIGS_32, key=["H", "V", "T_BUCKET"],
                prune_configs_by={"early_config_prune": prune}, do_bench=short_trials)(kernel)
    _tuned[name] = kernel
    return kernel


def _meta(interp: dict) -> dict:
    return dict(interp) if INTERPRET else {}


def _precision(dtype: torch.dtype) -> str:
    # fp32 operands (and the interpreter's upcast tiles) must not be rounded to TF32;
    # for 16-bit operands the setting is ignored
    return "ieee" if dtype == torch.float32 or INTERPRET else "tf32"


def _bucket(n: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), 1 << 16)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_splits(T: int, V: int, device: torch.device) -> int:
    """Vocabulary splits of the forward: enough programs to fill the GPU at small T, and about
    sqrt(#SM) splits at large T so a group of row blocks x splits shares L2."""
    if INTERPRET:
        return max(1, min(2, triton.cdiv(V, _INTERP_TILE["BLOCK_V"])))
    sms = _sm_count(device)
    n_t = triton.cdiv(max(T, 1), 128)
    splits = max(8, triton.cdiv(2 * sms, n_t))
    return max(1, min(splits, triton.cdiv(V, 512)))


# ----------------------------------------------------------------------------- launchers

def rows_of(inv_temperature: float | torch.Tensor, t0: int, t1: int) -> float | torch.Tensor:
    """The inverse temperature of token rows ``[t0, t1)``: the one float, or that slice of the
    ``[T]`` fp32 tensor of one per row."""
    if isinstance(inv_temperature, torch.Tensor):
        return inv_temperature[t0:t1]
    return inv_temperature


def forward_partials(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     inv_temperature: float | torch.Tensor, vocab_start: int = 0, *,
                     num_splits: int | None = None,
                     out: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, ...]:
    """Per-split online statistics (m, s, S, zy), each ``[num_splits, T]`` fp32.

    ``hidden [T, H]`` and ``weight [V, H]`` share a dtype (fp32/bf16/fp16); ``targets [T]`` hold
    global ids, ``vocab_start`` is the global id of ``weight``'s first row; ``inv_temperature``
    is one float or a contiguous ``[T]`` fp32 tensor (one per row). ``out`` may hold
    preallocated buffers (tests fill them with NaN to prove every element is written)."""
    T, H = hidden.shape
    V = weight.shape[0]
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    splits = num_splits or default_num_splits(T, V, hidden.device)
    if out is None:
        out = tuple(torch.empty(splits, T, device=hidden.device, dtype=torch.float32)
                    for _ in range(4))
    m, s, sz, zy = out
    for name, buf in zip(("m", "s", "S", "zy"), out):
        if buf.shape != (splits, T) or buf.dtype != torch.float32 or not buf.is_contiguous():
            raise ValueError(f"out[{name}] must be a contiguous float32 [{splits}, {T}] tensor")
    if T == 0:
        return out
    kernel = _kernel("fwd")

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_T"]) * splits,)

    with on_device_of(hidden):
        kernel[grid](hidden, weight, targets, m, s, sz, zy, T, V, H, hidden.stride(0),
                     weight.stride(0), inv_temperature, vocab_start, splits, _bucket(T),
                     GROUP_T=_FWD_GROUP_T,
                     UPCAST=INTERPRET and hidden.dtype != torch.float32,
                     PRECISION=_precision(hidden.dtype),
                     ROW_TAU=isinstance(inv_temperature, torch.Tensor), **_meta(_INTERP_TILE))
    return out


def dz_chunk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
             lse: torch.Tensor, ent: torch.Tensor, grad_logp: torch.Tensor,
             grad_ent: torch.Tensor, inv_temperature: float | torch.Tensor, vocab_start: int,
             out: torch.Tensor) -> torch.Tensor:
    """Write ``dz / tau`` for ``hidden [t, H]`` x ``weight [v, H]`` into ``out [t, v]`` (a view
    of the workspace whose rows may be strided). Row vectors (and a tensor
    ``inv_temperature``) are ``[t]`` fp32."""
    T, H = hidden.shape
    V = weight.shape[0]
    if T == 0 or V == 0:
        return out
    kernel = _kernel("dz")

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_T"]) * triton.cdiv(V, meta["BLOCK_V"]),)

    with on_device_of(hidden):
        kernel[grid](hidden, weight, targets, lse, ent, grad_logp, grad_ent, out,
                     T, V, H, hidden.stride(0), weight.stride(0), out.stride(0),
                     inv_temperature, vocab_start, _bucket(T),
                     GROUP_T=_GROUP,
                     UPCAST=INTERPRET and hidden.dtype != torch.float32,
                     PRECISION=_precision(hidden.dtype),
                     ROW_TAU=isinstance(inv_temperature, torch.Tensor), **_meta(_INTERP_TILE))
    return out


def matmul_into(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, accumulate: bool) -> None:
    """``c (+)= a @ b`` with fp32 accumulation; ``a [M, K]``, ``b [K, N]`` any strides (inner
    stride of b must be 1 for speed), ``c [M, N]`` fp32 or 16-bit."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    kernel = _kernel("mm")

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    with on_device_of(a):
        kernel[grid](a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                     c.stride(0), c.stride(1), _bucket(K), _bucket(M), int(a.stride(1) == 1),
                     ACCUMULATE=accumulate,
                     GROUP_M=_GROUP, UPCAST=INTERPRET and a.dtype != torch.float32,
                     PRECISION=_precision(a.dtype), **_meta(_INTERP_MM))


def chunk_tiles(T: int, V: int, chunk_tokens: int, chunk_vocab: int):
    """``(t0, t1, v0, v1)`` of every ``[chunk_tokens, chunk_vocab]`` tile of ``[T, V]``, the
    token chunks outermost (the order the backward's accumulations rely on)."""
    for t0 in range(0, T, chunk_tokens):
        for v0 in range(0, V, chunk_vocab):
            yield t0, min(T, t0 + chunk_tokens), v0, min(V, v0 + chunk_vocab)


def backward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
             lse: torch.Tensor, ent: torch.Tensor, grad_logp: torch.Tensor,
             grad_ent: torch.Tensor, inv_temperature: float | torch.Tensor, vocab_start: int,
             chunk_tokens: int, chunk_vocab: int, *, need_weight_grad: bool = True,
             grad_hidden: torch.Tensor | None = None,
             grad_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of this shard: ``dx [T, H]`` fp32 (a partial sum under vocab parallelism) and
    ``dW [V, H]`` in weight's dtype (None when ``need_weight_grad`` is False: the dW GEMMs,
    a third of the backward, are skipped).

    Workspace: dz ``[min(T, chunk_tokens), min(V, chunk_vocab)]`` in the input dtype (fp32 for
    fp32 inputs) plus, only when T > chunk_tokens and the weight is 16-bit, an fp32 ``[V, H]``
    dW accumulator. Rows with ``grad_logp = grad_ent = 0`` (ignored rows) contribute nothing.
    ``grad_hidden`` / ``grad_weight`` may be preallocated (tests poison them with NaN)."""
    T, H = hidden.shape
    V = weight.shape[0]
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    rows = [t.contiguous().float() for t in (lse, ent, grad_logp, grad_ent)]
    dx = grad_hidden if grad_hidden is not None else torch.empty(
        T, H, device=hidden.device, dtype=torch.float32)
    dw = None
    if need_weight_grad:
        dw = grad_weight if grad_weight is not None else torch.empty_like(weight)
    if T == 0:
        if dw is not None:
            dw.zero_()
        return dx, dw
    ct, cv = min(T, chunk_tokens), min(V, chunk_vocab)
    # fp32 dW accumulation across token chunks; a single chunk writes dW directly
    dw_acc = dw
    if dw is not None and T > ct and dw.dtype != torch.float32:
        dw_acc = torch.empty(V, H, device=dw.device, dtype=torch.float32)
    ws_dtype = torch.float32 if hidden.dtype == torch.float32 else hidden.dtype
    ws = torch.empty(ct, cv, device=hidden.device, dtype=ws_dtype)  # [ct, cv] dz workspace
    for t0, t1, v0, v1 in chunk_tiles(T, V, ct, cv):
        x, w = hidden[t0:t1], weight[v0:v1]
        dz = ws[: t1 - t0, : v1 - v0]
        dz_chunk(x, w, targets[t0:t1], *(v[t0:t1] for v in rows),
                 rows_of(inv_temperature, t0, t1), vocab_start + v0, dz)
        matmul_into(dz, w, dx[t0:t1], accumulate=v0 > 0)        # dx += dz @ W
        if dw is not None:
            matmul_into(dz.t(), x, dw_acc[v0:v1], accumulate=t0 > 0)  # dW += dz^T @ x
    if dw_acc is not dw:
        dw.copy_(dw_acc)
    return dx, dw
