"""Triton kernels for MoE routing: top-k expert selection with its weights, and the scores of
the load-balancing auxiliary loss. Forward and backward are one kernel each.

Layout: a program owns ``BLOCK_T`` tokens and holds their whole router row ``[BLOCK_T, E]`` in
registers (E is small: 8..512), so every step below is a row reduction:

1. scores ``s``: the raw logits (softmax *after* top-k, Megatron's ``pre_softmax=False``), the
   full softmax (``pre_softmax=True``) or the sigmoid. Math is fp32 whatever the input dtype.
2. selection key ``s + bias`` (aux-loss-free balancing: the bias moves choices, never weights).
3. optional group-limited selection (DeepSeek-V3): experts form ``N_GROUPS`` contiguous groups;
   a group's score is the sum of its top-``GROUP_M`` keys (by default ``topk // topk_groups``,
   Megatron's rule, 2 for DeepSeek-V3; 1 for DeepSeek-V2's group_limited_greedy); the best
   ``TOPK_GROUPS`` groups stay candidates.
4. top-k by ``K`` rounds of "largest key, lowest index among equals" (ties break to the lowest
   expert index, deterministically), or the replayed indices.
5. weights: the selected scores (softmax over the selected logits for softmax-after-top-k),
   optionally divided by their sum + 1e-20, times ``scaling``. Counts per expert are added with
   integer atomics (exact and order-independent, so deterministic).

The backward recomputes ``s`` from the logits and the saved indices (no [T, E] probability
tensor is stored) and writes the full ``dlogits`` row once, no atomics.

Score codes shared with ``r1fast.ops.moe_route`` and ``csrc/moe_route.h``:
0 = softmax after top-k, 1 = softmax before top-k, 2 = sigmoid.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from r1fast.kernels._launch import on_device_of

SOFTMAX_POST, SOFTMAX_PRE, SIGMOID = 0, 1, 2


@triton.jit
def _scores(l, cmask, SCORE: tl.constexpr):
    """Scores of one block of rows ``l`` [BT, BE] (padding columns hold -inf)."""
    if SCORE == 1:
        mx = tl.max(l, 1)
        ex = tl.where(cmask[None, :], tl.exp(l - mx[:, None]), 0.0)
        s = ex / tl.sum(ex, 1)[:, None]
    elif SCORE == 2:
        s = tl.sigmoid(l)
    else:
        s = l
    return s


@triton.jit
def _nan_as_largest(key):
    """Selection keys with NaN ranked above every number, as torch.topk ranks it. A NaN
    router logit (a diverging run) otherwise matches no maximum (``key == mx`` is false), and
    the argmax below returned column 2^30: an expert id out of range, fed to the
    permutation."""
    return tl.where(key != key, float("inf"), key)


@triton.jit
def _argmax_first(key, cand, cols):
    """Per row, the lowest column among candidates holding the largest key. A row whose
    candidates all hold -inf still returns its lowest candidate, never a taken column."""
    mx = tl.max(tl.where(cand, key, float("-inf")), 1)
    return tl.min(tl.where(cand & (key == mx[:, None]), cols[None, :], 1 << 30), 1)


@triton.jit
def _group_candidates(key, cand, cols, e_per_group, N_GROUPS: tl.constexpr,
                      TOPK_GROUPS: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """Restrict ``cand`` [BT, BE] to the experts of the best ``TOPK_GROUPS`` groups."""
    gids = tl.arange(0, BLOCK_G)
    # [BG, BE]: expert e is in group g
    ingrp = ((cols[None, :] // e_per_group) == gids[:, None]) & (gids[:, None] < N_GROUPS)
    avail = cand
    gscore = tl.zeros([key.shape[0], BLOCK_G], dtype=tl.float32)  # [BT, BG]
    # Group score = sum of the group's top-GROUP_M keys, taken largest first.
    for _m in tl.static_range(GROUP_M):
        c3 = ingrp[None, :, :] & avail[:, None, :]  # [BT, BG, BE]
        v3 = tl.where(c3, key[:, None, :], float("-inf"))
        gmax = tl.max(v3, 2)  # [BT, BG]
        gscore += gmax
        first = tl.min(tl.where(c3 & (v3 == gmax[:, :, None]), cols[None, None, :], 1 << 30), 2)
        hit = tl.max(tl.where(first[:, :, None] == cols[None, None, :], 1, 0), 1)  # [BT, BE]
        avail = avail & (hit == 0)
    gvalid = gids < N_GROUPS
    gsel = tl.zeros([key.shape[0], BLOCK_G], dtype=tl.int32)
    for _g in tl.static_range(TOPK_GROUPS):
        gc = gvalid[None, :] & (gsel == 0)
        mx = tl.max(tl.where(gc, gscore, float("-inf")), 1)
        first = tl.min(tl.where(gc & (gscore == mx[:, None]), gids[None, :], 1 << 30), 1)
        gsel = tl.where(gids[None, :] == first[:, None], 1, gsel)
    keep = tl.max(tl.where(ingrp[None, :, :] & (gsel[:, :, None] != 0), 1, 0), 1)  # [BT, BE]
    return cand & (keep != 0)


@triton.jit
def _route_fwd_kernel(
    logits_ptr, bias_ptr, replay_ptr, w_ptr, idx_ptr, counts_ptr,
    T, E, stride_t, scaling, e_per_group,
    K: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, REPLAY: tl.constexpr,
    N_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, GROUP_M: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    rmask = rows < T
    cmask = cols < E
    kmask = kcols < K
    rows64 = rows.to(tl.int64)
    # Rows past T load zeros (finite) so no NaN appears; padding columns are -inf.
    l = tl.load(logits_ptr + rows64[:, None] * stride_t + cols[None, :],
                mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)  # [BT, BE]
    l = tl.where(cmask[None, :], l, float("-inf"))
    s = _scores(l, cmask, SCORE)  # [BT, BE]
    cand = rmask[:, None] & cmask[None, :]  # [BT, BE]
    key = s
    if not REPLAY:
        if HAS_BIAS:
            key = s + tl.load(bias_ptr + cols, mask=cmask, other=0.0)[None, :]
        key = _nan_as_largest(key)
        if N_GROUPS > 1:
            cand = _group_candidates(key, cand, cols, e_per_group, N_GROUPS, TOPK_GROUPS,
                                     GROUP_M, BLOCK_G)
    taken = (rows[:, None] < 0) & (cols[None, :] < 0)  # [BT, BE] all False
    u = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)  # selected scores
    sel = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int64)  # selected experts
    for j in tl.static_range(K):
        if REPLAY:
            ij = tl.load(replay_ptr + rows64 * K + j, mask=rmask, other=0).to(tl.int32)
        else:
            ij = _argmax_first(key, cand & (taken == 0), cols)
        hit = cols[None, :] == ij[:, None]  # [BT, BE]
        taken = taken | hit
        uj = tl.sum(tl.where(hit, s, 0.0), 1)  # [BT]
        u = tl.where(kcols[None, :] == j, uj[:, None], u)
        sel = tl.where(kcols[None, :] == j, ij[:, None].to(tl.int64), sel)
    if SCORE == 0:  # softmax over the k selected logits
        mx = tl.max(tl.where(kmask[None, :], u, float("-inf")), 1)
        ex = tl.where(kmask[None, :], tl.exp(u - mx[:, None]), 0.0)
        u = ex / tl.sum(ex, 1)[:, None]
    if NORMALIZE:
        u = u / (tl.sum(tl.where(kmask[None, :], u, 0.0), 1)[:, None] + 1e-20)
    u = u * scaling
    out_mask = rmask[:, None] & kmask[None, :]
    tl.store(w_ptr + rows64[:, None] * K + kcols[None, :], u, mask=out_mask)
    tl.store(idx_ptr + rows64[:, None] * K + kcols[None, :], sel, mask=out_mask)
    hist = tl.sum(tl.where(taken & rmask[:, None], 1, 0), 0).to(tl.int64)  # [BE]
    tl.atomic_add(counts_ptr + cols, hist, mask=cmask & (hist > 0))


@triton.jit
def _route_bwd_kernel(
    gw_ptr, logits_ptr, idx_ptr, dl_ptr,
    T, E, stride_t, stride_dt, scaling,
    K: tl.constexpr, SCORE: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    rmask = rows < T
    cmask = cols < E
    kmask = kcols < K
    rows64 = rows.to(tl.int64)
    l = tl.load(logits_ptr + rows64[:, None] * stride_t + cols[None, :],
                mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    l = tl.where(cmask[None, :], l, float("-inf"))
    s = _scores(l, cmask, SCORE)  # [BT, BE]
    u = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    g = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for j in tl.static_range(K):
        ij = tl.load(idx_ptr + rows64 * K + j, mask=rmask, other=0)
        gj = tl.load(gw_ptr + rows64 * K + j, mask=rmask, other=0.0).to(tl.float32)
        uj = tl.sum(tl.where(cols[None, :] == ij[:, None], s, 0.0), 1)
        u = tl.where(kcols[None, :] == j, uj[:, None], u)
        g = tl.where(kcols[None, :] == j, gj[:, None], g)
    raw = u
    if SCORE == 0:
        mx = tl.max(tl.where(kmask[None, :], u, float("-inf")), 1)
        ex = tl.where(kmask[None, :], tl.exp(u - mx[:, None]), 0.0)
        u = ex / tl.sum(ex, 1)[:, None]
    # w = scaling * u / S (S = sum u + 1e-20) or scaling * u  ->  du
    if NORMALIZE:
        ssum = tl.sum(tl.where(kmask[None, :], u, 0.0), 1)[:, None] + 1e-20
        du = scaling * (g / ssum - tl.sum(g * u, 1)[:, None] / (ssum * ssum))
    else:
        du = scaling * g
    du = tl.where(kmask[None, :], du, 0.0)
    if SCORE == 0:  # back through the softmax over the selected logits
        dz = u * (du - tl.sum(du * u, 1)[:, None])
    elif SCORE == 2:
        dz = du * raw * (1.0 - raw)
    else:
        dz = du
    ds = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)  # dz scattered to the expert columns
    for j in tl.static_range(K):
        ij = tl.load(idx_ptr + rows64 * K + j, mask=rmask, other=0)
        dzj = tl.sum(tl.where(kcols[None, :] == j, dz, 0.0), 1)
        ds = tl.where(cols[None, :] == ij[:, None], dzj[:, None], ds)
    if SCORE == 1:  # back through the full softmax: s * (ds - <ds, s>), <ds, s> = <du, u>
        dl = s * (ds - tl.sum(du * u, 1)[:, None])
    else:
        dl = ds
    tl.store(dl_ptr + rows64[:, None] * stride_dt + cols[None, :],
             dl.to(dl_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _aux_scores(l, cmask, SIGMOID: tl.constexpr):
    if SIGMOID:
        sg = tl.where(cmask[None, :], tl.sigmoid(l), 0.0)
        p = sg / (tl.sum(sg, 1)[:, None] + 1e-20)
    else:
        p = _scores(l, cmask, 1)
    return p


@triton.jit
def _aux_fwd_kernel(
    logits_ptr, p_ptr, counts_ptr, T, E, stride_t,
    K: tl.constexpr, SIGMOID: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    cmask = cols < E
    rows64 = rows.to(tl.int64)
    m2 = rmask[:, None] & cmask[None, :]
    l = tl.load(logits_ptr + rows64[:, None] * stride_t + cols[None, :], mask=m2,
                other=0.0).to(tl.float32)
    l = tl.where(cmask[None, :], l, float("-inf"))
    p = _aux_scores(l, cmask, SIGMOID)  # [BT, BE]
    tl.store(p_ptr + rows64[:, None] * E + cols[None, :], p, mask=m2)
    taken = (rows[:, None] < 0) & (cols[None, :] < 0)  # [BT, BE] all False
    key = _nan_as_largest(p)
    for _j in tl.static_range(K):
        ij = _argmax_first(key, m2 & (taken == 0), cols)
        taken = taken | (cols[None, :] == ij[:, None])
    hist = tl.sum(tl.where(taken & rmask[:, None], 1, 0), 0).to(tl.int64)
    tl.atomic_add(counts_ptr + cols, hist, mask=cmask & (hist > 0))


@triton.jit
def _aux_bwd_kernel(
    dp_ptr, logits_ptr, dl_ptr, T, E, stride_t, stride_dt,
    SIGMOID: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    cmask = cols < E
    rows64 = rows.to(tl.int64)
    m2 = rmask[:, None] & cmask[None, :]
    l = tl.load(logits_ptr + rows64[:, None] * stride_t + cols[None, :], mask=m2,
                other=0.0).to(tl.float32)
    l = tl.where(cmask[None, :], l, float("-inf"))
    dp = tl.load(dp_ptr + rows64[:, None] * E + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    if SIGMOID:  # p = sg / (S + eps): dsg = dp / S' - <dp, sg> / S'^2, then sigmoid'
        sg = tl.where(cmask[None, :], tl.sigmoid(l), 0.0)
        ssum = tl.sum(sg, 1)[:, None] + 1e-20
        dsg = dp / ssum - tl.sum(dp * sg, 1)[:, None] / (ssum * ssum)
        dl = dsg * sg * (1.0 - sg)
    else:
        p = _scores(l, cmask, 1)
        dl = p * (dp - tl.sum(dp * p, 1)[:, None])
    tl.store(dl_ptr + rows64[:, None] * stride_dt + cols[None, :],
             dl.to(dl_ptr.dtype.element_ty), mask=m2)


# ----------------------------------------------------------------------------- launchers

def _block_t(T: int, cells_per_row: int) -> int:
    """Tokens per program, a power of two: about 2K fp32 cells of row state per program on a
    GPU (a handful of [BT, E] tensors live in registers), 8K in the interpreter (where fewer,
    larger programs are simply faster)."""
    budget = 8192 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 2048
    bt = max(1, min(64, budget // max(cells_per_row, 1)))
    bt = 1 << (bt.bit_length() - 1)  # largest power of two <= bt
    return min(bt, triton.next_power_of_2(max(T, 1)))


def _rows_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def route_fwd(logits: torch.Tensor, topk: int, score: int, expert_bias: torch.Tensor | None,
              replay: torch.Tensor | None, n_groups: int, topk_groups: int, group_m: int,
              scaling: float, normalize: bool, *, weights: torch.Tensor | None = None,
              indices: torch.Tensor | None = None, counts: torch.Tensor | None = None):
    """Launch the routing forward. Returns ``(weights [T,k] fp32, indices [T,k] int64,
    counts [E] int64)``; ``group_m``: keys summed per group score. ``weights``/``indices`` may
    be preallocated (tests poison them with NaN / -1 to prove every element is written);
    ``counts`` is always zeroed here."""
    logits = _rows_contig(logits)
    T, E = logits.shape
    dev = logits.device
    if weights is None:
        weights = torch.empty((T, topk), device=dev, dtype=torch.float32)
    indices = torch.empty((T, topk), device=dev, dtype=torch.int64) if indices is None else indices
    counts = torch.empty((E,), device=dev, dtype=torch.int64) if counts is None else counts
    counts.zero_()
    if T == 0:
        return weights, indices, counts
    block_e = triton.next_power_of_2(E)
    groups = n_groups > 1 and replay is None
    block_g = triton.next_power_of_2(n_groups) if groups else 1
    block_t = _block_t(T, block_e * block_g)
    if replay is not None:
        replay = replay.to(torch.int64).contiguous()
    with on_device_of(logits):
        _route_fwd_kernel[(triton.cdiv(T, block_t),)](
            logits, expert_bias if expert_bias is not None else logits,
            replay if replay is not None else indices, weights, indices, counts,
            T, E, logits.stride(0), float(scaling), E // max(n_groups, 1),
            K=topk, SCORE=score, HAS_BIAS=expert_bias is not None, REPLAY=replay is not None,
            N_GROUPS=n_groups if groups else 1, TOPK_GROUPS=topk_groups if groups else 1,
            GROUP_M=group_m if groups else 1, NORMALIZE=bool(normalize),
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(topk), BLOCK_G=block_g,
        )
    return weights, indices, counts


def route_bwd(grad_weights: torch.Tensor, logits: torch.Tensor, indices: torch.Tensor,
              score: int, scaling: float, normalize: bool, *,
              grad_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the routing backward: ``dlogits [T, E]`` in the dtype of ``logits``."""
    logits = _rows_contig(logits)
    T, E = logits.shape
    topk = indices.shape[1]
    if grad_logits is None:
        grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if T == 0:
        return grad_logits
    block_e = triton.next_power_of_2(E)
    block_t = _block_t(T, block_e)
    with on_device_of(logits):
        _route_bwd_kernel[(triton.cdiv(T, block_t),)](
            grad_weights.contiguous(), logits, indices.contiguous(), grad_logits,
            T, E, logits.stride(0), grad_logits.stride(0), float(scaling),
            K=topk, SCORE=score, NORMALIZE=bool(normalize),
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(topk),
        )
    return grad_logits


def aux_scores_fwd(logits: torch.Tensor, topk: int, sigmoid: bool, *,
                   scores: torch.Tensor | None = None, counts: torch.Tensor | None = None):
    """Scores of the aux loss ``P [T, E]`` fp32 and the counts of a plain top-k on ``P``."""
    logits = _rows_contig(logits)
    T, E = logits.shape
    dev = logits.device
    scores = torch.empty((T, E), device=dev, dtype=torch.float32) if scores is None else scores
    counts = torch.empty((E,), device=dev, dtype=torch.int64) if counts is None else counts
    counts.zero_()
    if T == 0:
        return scores, counts
    block_e = triton.next_power_of_2(E)
    block_t = _block_t(T, block_e)
    with on_device_of(logits):
        _aux_fwd_kernel[(triton.cdiv(T, block_t),)](
            logits, scores, counts, T, E, logits.stride(0),
            K=topk, SIGMOID=bool(sigmoid), BLOCK_T=block_t, BLOCK_E=block_e)
    return scores, counts


def aux_scores_bwd(grad_scores: torch.Tensor, logits: torch.Tensor, sigmoid: bool, *,
                   grad_logits: torch.Tensor | None = None) -> torch.Tensor:
    logits = _rows_contig(logits)
    T, E = logits.shape
    if grad_logits is None:
        grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if T == 0:
        return grad_logits
    block_e = triton.next_power_of_2(E)
    block_t = _block_t(T, block_e)
    with on_device_of(logits):
        _aux_bwd_kernel[(triton.cdiv(T, block_t),)](
            grad_scores.contiguous(), logits, grad_logits, T, E, logits.stride(0),
            grad_logits.stride(0), SIGMOID=bool(sigmoid), BLOCK_T=block_t, BLOCK_E=block_e)
    return grad_logits
