"""Triton kernels for the GRPO policy loss: one pass over the tokens, a tiny deterministic reduce.

The loss of a GRPO step is a function of five per-token fp32 streams (``logp``, ``old``, the
advantage, the mask and optionally ``ref``/``rollout`` log-probs). Everything it needs fits in
ONE launch of two phases:

1. ``_grpo_loss_seq_kernel``: one program per sequence (its tokens are ``cu_seqlens[i] ..
   cu_seqlens[i+1]`` of the flat arrays, or ``i*L .. (i+1)*L`` for the padded ``[B, L]``
   layout, which needs no offsets tensor). When the sequence-level statistic is needed first
   (GSPO's mean log-ratio, or the ``1/len_i`` weight of seq-mean-token-mean) the program makes a
   short pre-pass over its own tokens, so no extra launch is needed. The main pass computes per
   token the policy term, the KL term and ``d loss_t / d logp_t``, writes that derivative
   (already weighted by the mask and the per-sequence aggregation weight), and writes per
   sequence partial sums into ``stats[K, B]`` (columns below).
2. the program that finishes last (an integer ticket counter tells it) folds ``stats`` over the
   sequences in a fixed order and writes the final normalised loss and every metric into
   ``totals[NUM_TOTALS]`` - no float atomics anywhere, so the loss and its gradient are bitwise
   reproducible run to run, and the caller needs no further launch (the loss is launch-bound
   work: ~0.3 MB at T=16k). ``_grpo_loss_reduce_kernel`` only runs for an empty batch.

The backward is not a kernel of its own: ``grad_logp = dlogp * (grad_loss / D)``, one
elementwise multiply done by the caller (``r1fast.ops.policy_loss``).

Math (docs/DESIGN.md §3), all in fp32, ``r`` the importance ratio:

* ppo / gspo: ``l = max(-A r, -A clip(r, 1-el, 1+eh))`` equals ``-A min(r, 1+eh)`` for A > 0 and
  ``-A max(r, 1-el)`` for A < 0; dual clip (A < 0): ``l = -c A`` once ``r > c``. The gradient is
  ``-A dr/dlogp`` where the unclipped branch is active and 0 elsewhere. For ppo
  ``r = exp(clamp(logp - old, -20, 20))`` (``dr/dlogp = r`` inside the clamp, 0 outside, as
  torch's clamp); for gspo ``r = exp(clamp(log s_i, -20, 20))`` with ``log s_i`` the masked mean
  of ``logp - old`` over the sequence and ``dr/dlogp_t = r`` (the stop-gradient token form).
* cispo: ``l = -sg(clip(r)) A logp``, gradient ``-clip(r) A``.
* truncated IS: the policy term (value and gradient) times ``min(exp(old - rollout), C)``.
* KL, ``d = clamp(ref - logp, -20, 20)``: k1 ``-d``; k2 ``d^2/2``; k3 ``clamp(expm1(d)-d, -10, 10)``
  with gradient ``-expm1(d)``; k3+ the k3 value with the k2 gradient ``-d``. Gradients vanish
  where a clamp is active (torch semantics, boundaries inclusive).

Outputs are written in full by the kernels (``dlogp`` for every position of every sequence,
``stats`` for every sequence): the launchers accept preallocated buffers so tests can fill them
with NaN beforehand and see any element a kernel failed to write.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1fast.kernels._launch import on_device_of

LOSSES = {"ppo": 0, "gspo": 1, "cispo": 2}
KLS = {None: 0, "k1": 1, "k2": 2, "k3": 3, "k3+": 4}

# Rows of the per-sequence ``stats[NUM_STATS, B]`` buffer (each a masked sum over the sequence).
S_PG, S_KL, S_CNT, S_CLIP, S_DUAL, S_RATIO, S_RMIN, S_RMAX, S_TIS = range(9)
NUM_STATS = 9
# Entries of ``totals[NUM_TOTALS]``: the final, normalised loss and metrics, so the caller
# only takes views (no further launches). With w_i = 1/len_i for seq-mean-token-mean, else 1,
# and D the aggregation's denominator:
#   T_LOSS = sum_i w_i (pg_i + kl_coef kl_i) / D = T_PG + T_KL; T_CNT = N (sum of mask weights)
#   T_CLIP, T_DUAL, T_KL_MEAN, T_RMEAN, T_TIS: mask-weighted token means (0, or 1 for the ratio
#   and TIS weight, when N = 0); T_RMIN / T_RMAX: extremes over valid tokens (1 when N = 0);
#   T_DENOM = D, which the backward divides by.
(T_LOSS, T_PG, T_KL, T_CNT, T_CLIP, T_DUAL, T_KL_MEAN, T_RMIN, T_RMEAN, T_RMAX, T_TIS,
 T_DENOM) = range(12)
NUM_TOTALS = 12
# The same indices as constexpr globals: the only globals a compiled Triton kernel may read.
(_S_PG, _S_KL, _S_CNT, _S_CLIP, _S_DUAL, _S_RATIO, _S_RMIN, _S_RMAX,
 _S_TIS) = (tl.constexpr(i) for i in range(NUM_STATS))
(_T_LOSS, _T_PG, _T_KL, _T_CNT, _T_CLIP, _T_DUAL, _T_KL_MEAN, _T_RMIN, _T_RMEAN, _T_RMAX, _T_TIS,
 _T_DENOM) = (tl.constexpr(i) for i in range(NUM_TOTALS))


@triton.jit
def _min_nan(a, b):
    """tl.minimum that keeps a NaN (its default drops it, as fmin does): a NaN log-prob on a
    real token must reach the loss, as it does on the torch path, so the trainer sees it."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max_nan(a, b):
    """tl.maximum that keeps a NaN (see :func:`_min_nan`)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _clamp_nan(x, lo, hi):
    return _min_nan(_max_nan(x, lo), hi)


@triton.jit
def _expm1(x):
    """expm1 in fp32 without cancellation: a degree-9 Taylor polynomial for |x| < 0.5 (the
    first omitted term is < 3e-10 relative), ``exp(x) - 1`` elsewhere (|result| > 0.39)."""
    p = 1.0 / 362880.0
    p = p * x + 1.0 / 40320.0
    p = p * x + 1.0 / 5040.0
    p = p * x + 1.0 / 720.0
    p = p * x + 1.0 / 120.0
    p = p * x + 1.0 / 24.0
    p = p * x + 1.0 / 6.0
    p = p * x + 0.5
    p = p * x + 1.0
    small = p * x
    return tl.where(tl.abs(x) < 0.5, small, tl.exp(x) - 1.0)


# One program per sequence, and one launch for the whole loss: a pre-pass (length, GSPO's
# sequence ratio), the token pass (loss, metrics, saved dlogp), and the fold of the totals by
# the last program to finish. It stays one function (longer than the ~80-line guideline)
# because the three passes share the per-sequence registers and the ticket protocol; helpers
# it can share are separate @triton.jit functions above.
@triton.jit
def _grpo_loss_seq_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, roll_ptr, cu_ptr,  # inputs (flat)
    stats_ptr, dlogp_ptr,  # outputs: stats [NUM_STATS, B], dlogp [N] fp32
    totals_ptr, norm_ptr, ticket_ptr,  # totals [NUM_TOTALS]; ticket: int32 counter, 0 at entry
    B, seq_len, clip_low, clip_high, dual_c, kl_coef, tis_cap, norm_value,
    PADDED: tl.constexpr,  # sequence i is tokens [i*seq_len, (i+1)*seq_len); cu_ptr unread
    LOSS: tl.constexpr,  # 0 ppo, 1 gspo, 2 cispo
    DUAL: tl.constexpr,  # dual clip on (ppo/gspo only)
    KL: tl.constexpr,  # 0 none, 1 k1, 2 k2, 3 k3, 4 k3+
    TIS: tl.constexpr,  # truncated IS against rollout log-probs
    SMTM: tl.constexpr,  # weight the gradient by 1/len_i (seq-mean-token-mean)
    ADV_PER_TOKEN: tl.constexpr,
    NORM_MODE: tl.constexpr,  # see _reduce_totals
    BLOCK: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    if PADDED:
        start = pid.to(tl.int64) * seq_len
        end = start + seq_len
    else:
        start = tl.load(cu_ptr + pid).to(tl.int64)
        end = tl.load(cu_ptr + pid + 1).to(tl.int64)
    offs0 = tl.arange(0, BLOCK)
    lo = 1.0 - clip_low
    hi = 1.0 + clip_high

    # ---- pre-pass: sequence length (and GSPO's mean log-ratio) before any token is scored
    log_s = 0.0
    seq_w = 1.0
    if LOSS == 1 or SMTM:
        acc_d = tl.zeros([BLOCK], dtype=tl.float32)
        acc_m = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(start, end, BLOCK):
            offs = s + offs0
            inb = offs < end
            m = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32)
            valid = m != 0.0
            acc_m += m
            if LOSS == 1:
                lp = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
                od = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
                # where(), not m * x: padding may hold -inf/NaN log-probs
                acc_d += tl.where(valid, m * (lp - od), 0.0)
        cnt = tl.sum(acc_m, axis=0)
        safe_cnt = tl.where(cnt != 0.0, cnt, 1.0)
        if LOSS == 1:
            log_s = tl.where(cnt != 0.0, tl.sum(acc_d, axis=0) / safe_cnt, 0.0)
            log_s = _clamp_nan(log_s, -20.0, 20.0)
        if SMTM:
            seq_w = tl.where(cnt != 0.0, 1.0 / safe_cnt, 0.0)

    if not ADV_PER_TOKEN:
        a_seq = tl.load(adv_ptr + pid).to(tl.float32)

    acc_pg = tl.zeros([BLOCK], dtype=tl.float32)
    acc_kl = tl.zeros([BLOCK], dtype=tl.float32)
    acc_cnt = tl.zeros([BLOCK], dtype=tl.float32)
    acc_clip = tl.zeros([BLOCK], dtype=tl.float32)
    acc_dual = tl.zeros([BLOCK], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK], dtype=tl.float32)
    acc_tis = tl.zeros([BLOCK], dtype=tl.float32)
    r_min = tl.full([BLOCK], float("inf"), dtype=tl.float32)
    r_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)

    # ---- main pass: per-token loss, gradient and partial sums
    for s in range(start, end, BLOCK):
        offs = s + offs0
        inb = offs < end
        m = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32)
        valid = m != 0.0
        lp = tl.where(valid, tl.load(logp_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
        od = tl.where(valid, tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
        if ADV_PER_TOKEN:
            a = tl.load(adv_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        else:
            a = tl.zeros([BLOCK], dtype=tl.float32) + a_seq
        a = tl.where(valid, a, 0.0)

        if LOSS == 1:
            r = tl.zeros([BLOCK], dtype=tl.float32) + tl.exp(log_s)  # [BLOCK], s_i broadcast
            dr = r
        else:
            delta = lp - od
            r = tl.exp(_clamp_nan(delta, -20.0, 20.0))
            dr = tl.where((delta >= -20.0) & (delta <= 20.0), r, 0.0)

        pos = a > 0.0
        neg = a < 0.0
        if LOSS == 2:  # cispo truncates the weight whatever the sign of A
            clipped = (r > hi) | (r < lo)
        else:
            clipped = (pos & (r > hi)) | (neg & (r < lo))
        if LOSS == 2:
            w_clip = _clamp_nan(r, lo, hi)
            pg = -w_clip * a * lp
            dpg = -w_clip * a
        else:
            pg = tl.where(pos, -a * _min_nan(r, hi), tl.where(neg, -a * _max_nan(r, lo), 0.0))
            dpg = tl.where((pos & (r <= hi)) | (neg & (r >= lo)), -a * dr, 0.0)
            if DUAL:
                dual = neg & (r > dual_c)
                pg = tl.where(dual, -dual_c * a, pg)
                dpg = tl.where(dual, 0.0, dpg)
                acc_dual += tl.where(dual & valid, m, 0.0)
        if TIS:
            rl = tl.where(valid, tl.load(roll_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
            w_tis = _min_nan(tl.exp(od - rl), tis_cap)
            pg = pg * w_tis
            dpg = dpg * w_tis
            acc_tis += tl.where(valid, m * w_tis, 0.0)

        dtok = dpg
        if KL != 0:
            rf = tl.where(valid, tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
            d_raw = rf - lp
            d = _clamp_nan(d_raw, -20.0, 20.0)
            in_d = (d_raw >= -20.0) & (d_raw <= 20.0)
            if KL == 1:
                klv = -d
                dkl = tl.where(in_d, 1.0, 0.0)
            elif KL == 2:
                klv = 0.5 * d * d
                dkl = tl.where(in_d, -d, 0.0)
            else:
                em1 = _expm1(d)
                k3 = em1 - d
                klv = _clamp_nan(k3, -10.0, 10.0)
                if KL == 3:
                    dkl = tl.where(in_d & (k3 >= -10.0) & (k3 <= 10.0), -em1, 0.0)
                else:
                    dkl = tl.where(in_d, -d, 0.0)
            acc_kl += tl.where(valid, m * klv, 0.0)
            dtok = dtok + kl_coef * dkl

        acc_pg += tl.where(valid, m * pg, 0.0)
        acc_cnt += m
        acc_clip += tl.where(clipped & valid, m, 0.0)
        acc_r += tl.where(valid, m * r, 0.0)
        r_min = _min_nan(r_min, tl.where(valid, r, float("inf")))
        r_max = _max_nan(r_max, tl.where(valid, r, float("-inf")))
        tl.store(dlogp_ptr + offs, tl.where(valid, m * dtok * seq_w, 0.0), mask=inb)

    tl.store(stats_ptr + _S_PG * B + pid, tl.sum(acc_pg, axis=0))
    tl.store(stats_ptr + _S_KL * B + pid, tl.sum(acc_kl, axis=0))
    tl.store(stats_ptr + _S_CNT * B + pid, tl.sum(acc_cnt, axis=0))
    tl.store(stats_ptr + _S_CLIP * B + pid, tl.sum(acc_clip, axis=0))
    tl.store(stats_ptr + _S_DUAL * B + pid, tl.sum(acc_dual, axis=0))
    tl.store(stats_ptr + _S_RATIO * B + pid, tl.sum(acc_r, axis=0))
    tl.store(stats_ptr + _S_RMIN * B + pid, tl.reduce(r_min, 0, _min_nan))
    tl.store(stats_ptr + _S_RMAX * B + pid, tl.reduce(r_max, 0, _max_nan))
    tl.store(stats_ptr + _S_TIS * B + pid, tl.sum(acc_tis, axis=0))
    # The program that finishes last folds every sequence's sums into the totals, so the whole
    # forward is one launch. The ticket is an integer atomic (exact; acq_rel orders the stats
    # stores of every program before it), the float folding runs in a fixed order in one
    # program: deterministic. The last program also resets the ticket for the next launch.
    tl.debug_barrier()  # every thread's stores happen before the (cumulative) release below
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == B - 1:
        _reduce_totals(stats_ptr, totals_ptr, norm_ptr, B, kl_coef, norm_value, SMTM, TIS,
                       NORM_MODE, BLOCK_B)
        tl.atomic_xchg(ticket_ptr, 0)


@triton.jit
def _grpo_loss_reduce_kernel(stats_ptr, totals_ptr, norm_ptr, B, kl_coef, norm_value,
                             SMTM: tl.constexpr, TIS: tl.constexpr, NORM_MODE: tl.constexpr,
                             BLOCK_B: tl.constexpr):
    """The totals of an empty batch (B == 0: no sequence program runs to fold them)."""
    _reduce_totals(stats_ptr, totals_ptr, norm_ptr, B, kl_coef, norm_value, SMTM, TIS,
                   NORM_MODE, BLOCK_B)


@triton.jit
def _reduce_totals(stats_ptr, totals_ptr, norm_ptr, B, kl_coef, norm_value,
                   SMTM: tl.constexpr, TIS: tl.constexpr, NORM_MODE: tl.constexpr,
                   BLOCK_B: tl.constexpr):
    """One program folds the per-sequence sums in a fixed order (deterministic), normalises.

    NORM_MODE: 0 -> D = N (local token count, 1 if N = 0); 1 -> D = ``norm_value``;
    2 -> D = ``norm_ptr[0]`` (a device tensor, e.g. an all-reduced global count)."""
    offs0 = tl.arange(0, BLOCK_B)
    t_pg = tl.zeros([BLOCK_B], dtype=tl.float32)
    t_kl = tl.zeros([BLOCK_B], dtype=tl.float32)
    t_cnt = tl.zeros([BLOCK_B], dtype=tl.float32)
    t_klraw = tl.zeros([BLOCK_B], dtype=tl.float32)
    t_clip = tl.zeros([BLOCK_B], dtype=tl.float32)
    t_dual = tl.zeros([BLOCK_B], dtype=tl.float32)
    t_r = tl.zeros([BLOCK_B], dtype=tl.float32)
    t_tis = tl.zeros([BLOCK_B], dtype=tl.float32)
    t_min = tl.full([BLOCK_B], float("inf"), dtype=tl.float32)
    t_max = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    for s in range(0, B, BLOCK_B):
        offs = s + offs0
        inb = offs < B
        pg = tl.load(stats_ptr + _S_PG * B + offs, mask=inb, other=0.0)
        kl = tl.load(stats_ptr + _S_KL * B + offs, mask=inb, other=0.0)
        cnt = tl.load(stats_ptr + _S_CNT * B + offs, mask=inb, other=0.0)
        if SMTM:
            w = tl.where(cnt != 0.0, 1.0 / tl.where(cnt != 0.0, cnt, 1.0), 0.0)
        else:
            w = tl.where(inb, 1.0, 0.0)
        t_pg += w * pg
        t_kl += w * (kl_coef * kl)
        t_cnt += cnt
        t_klraw += kl
        t_clip += tl.load(stats_ptr + _S_CLIP * B + offs, mask=inb, other=0.0)
        t_dual += tl.load(stats_ptr + _S_DUAL * B + offs, mask=inb, other=0.0)
        t_r += tl.load(stats_ptr + _S_RATIO * B + offs, mask=inb, other=0.0)
        t_min = _min_nan(t_min, tl.load(stats_ptr + _S_RMIN * B + offs, mask=inb,
                                       other=float("inf")))
        t_max = _max_nan(t_max, tl.load(stats_ptr + _S_RMAX * B + offs, mask=inb,
                                       other=float("-inf")))
        t_tis += tl.load(stats_ptr + _S_TIS * B + offs, mask=inb, other=0.0)
    n = tl.sum(t_cnt, axis=0)
    has = n > 0.0
    safe_n = tl.where(has, n, 1.0)
    if NORM_MODE == 0:
        denom = safe_n
    elif NORM_MODE == 1:
        denom = norm_value
    else:
        denom = tl.load(norm_ptr).to(tl.float32)
    pg_sum = tl.sum(t_pg, axis=0)
    kl_sum = tl.sum(t_kl, axis=0)
    tl.store(totals_ptr + _T_LOSS, (pg_sum + kl_sum) / denom)
    tl.store(totals_ptr + _T_PG, pg_sum / denom)
    tl.store(totals_ptr + _T_KL, kl_sum / denom)
    tl.store(totals_ptr + _T_CNT, n)
    tl.store(totals_ptr + _T_CLIP, tl.where(has, tl.sum(t_clip, axis=0) / safe_n, 0.0))
    tl.store(totals_ptr + _T_DUAL, tl.where(has, tl.sum(t_dual, axis=0) / safe_n, 0.0))
    tl.store(totals_ptr + _T_KL_MEAN, tl.where(has, tl.sum(t_klraw, axis=0) / safe_n, 0.0))
    tl.store(totals_ptr + _T_RMIN, tl.where(has, tl.reduce(t_min, 0, _min_nan), 1.0))
    tl.store(totals_ptr + _T_RMEAN, tl.where(has, tl.sum(t_r, axis=0) / safe_n, 1.0))
    tl.store(totals_ptr + _T_RMAX, tl.where(has, tl.reduce(t_max, 0, _max_nan), 1.0))
    if TIS:
        tl.store(totals_ptr + _T_TIS, tl.where(has, tl.sum(t_tis, axis=0) / safe_n, 1.0))
    else:
        tl.store(totals_ptr + _T_TIS, 1.0)
    tl.store(totals_ptr + _T_DENOM, denom)


def _block_for(avg_len: int) -> int:
    # A block covers a typical sequence in one or two iterations; 2048 keeps registers modest.
    return max(16, min(2048, triton.next_power_of_2(max(1, avg_len))))


def grpo_loss_fwd(
    logp: torch.Tensor,  # [N] flat, any float dtype
    old_logp: torch.Tensor,  # [N]
    advantages: torch.Tensor,  # [B] (per sequence) or [N] (per token)
    mask: torch.Tensor,  # [N] bool or float weights
    cu_seqlens: torch.Tensor | None,  # [B+1] int32/int64 (cu[0] = 0, cu[B] = N), or None:
    #                                   padded, sequence i is [i*seq_len, (i+1)*seq_len)
    ref_logp: torch.Tensor | None = None,  # [N], needed when kl is set
    rollout_logp: torch.Tensor | None = None,  # [N], needed when tis_cap is set
    *,
    num_seqs: int,
    seq_len: int = 0,
    loss: str = "ppo",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    kl: str | None = None,
    kl_coef: float = 0.0,
    tis_cap: float | None = None,
    agg: str = "token-mean",
    norm_value: float = 0.0,
    normalizer: torch.Tensor | None = None,
    adv_per_token: bool = False,
    stats: torch.Tensor | None = None,  # optional preallocated [NUM_STATS, B] fp32
    dlogp: torch.Tensor | None = None,  # optional preallocated [N] fp32
    totals: torch.Tensor | None = None,  # optional preallocated [NUM_TOTALS] fp32
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch; return ``(totals [NUM_TOTALS], dlogp [N], stats [NUM_STATS, B])``.

    Inputs must already be validated, flat and contiguous (``r1fast.ops.policy_loss`` does that).
    The denominator D is ``normalizer[0]`` when that 1-element fp32 tensor is given, else
    ``norm_value`` when > 0, else the token count N. ``dlogp`` is
    ``mask * d(loss_t)/d(logp_t) * w_i`` (``w_i = 1/len_i`` for seq-mean-token-mean), not yet
    divided by D. ``adv_per_token`` says whether ``advantages`` is indexed by token or sequence.
    """
    n = logp.numel()
    b = num_seqs
    dev = logp.device
    if stats is None:
        stats = torch.empty((NUM_STATS, b), dtype=torch.float32, device=dev)
    if dlogp is None:
        dlogp = torch.empty(n, dtype=torch.float32, device=dev)
    if totals is None:
        totals = torch.empty(NUM_TOTALS, dtype=torch.float32, device=dev)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # Triton loads bytes; zero-copy reinterpretation
    kl_id = KLS[kl]
    use_tis = tis_cap is not None
    smtm = agg == "seq-mean-token-mean"
    # unused pointer slots get a valid tensor; the constexpr flags keep them unread
    ref = ref_logp if kl_id != 0 else logp
    roll = rollout_logp if use_tis else logp
    cu = cu_seqlens if cu_seqlens is not None else logp
    if block is None:
        block = _block_for(n // max(b, 1))
    norm_mode = 2 if normalizer is not None else (1 if norm_value > 0 else 0)
    norm = normalizer if normalizer is not None else totals
    block_b = max(16, min(1024, triton.next_power_of_2(max(b, 1))))
    if b > 0:  # one launch: the last sequence program also folds the totals
        with on_device_of(logp):
            _grpo_loss_seq_kernel[(b,)](
                logp, old_logp, advantages, mask, ref, roll, cu, stats, dlogp,
                totals, norm, _armed_ticket(dev),
                b, int(seq_len), float(clip_low), float(clip_high), float(dual_clip or 0.0),
                float(kl_coef), float(tis_cap or 0.0), float(norm_value),
                PADDED=cu_seqlens is None, LOSS=LOSSES[loss], DUAL=dual_clip is not None, KL=kl_id,
                TIS=use_tis, SMTM=smtm, ADV_PER_TOKEN=adv_per_token, NORM_MODE=norm_mode,
                BLOCK=block, BLOCK_B=block_b, num_warps=4 if block <= 1024 else 8)
    else:
        with on_device_of(stats):
            _grpo_loss_reduce_kernel[(1,)](
                stats, totals, norm, b, float(kl_coef), float(norm_value), SMTM=smtm, TIS=use_tis,
                NORM_MODE=norm_mode, BLOCK_B=block_b, num_warps=4)
    return totals, dlogp, stats


_TICKETS: dict[torch.device, torch.Tensor] = {}


def prepare(device: torch.device | str | None = None) -> torch.Tensor:
    """Allocate the completion ticket of ``device`` (default: the current CUDA device, else the
    CPU for the interpreter) now, and return it. The first launch on a device calls it; call it
    before capturing a CUDA graph that contains the loss (an allocation inside a capture would
    come from the graph's private pool, which later replays reuse), or run the loss once outside
    the capture (the usual warm-up). Only that device is touched: no CUDA context is created on
    the other GPUs a rank can see."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    key = _key(torch.device(device))
    t = _TICKETS.get(key)
    if t is None:
        t = _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=key)
    return t


def _key(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _ticket(device: torch.device) -> torch.Tensor:
    """The per-device int32 completion counter of the loss kernel, allocated by :func:`prepare`
    at the first launch on the device, never inside a CUDA-graph capture (that raises: call
    :func:`prepare` or run the loss once before capturing)."""
    key = _key(device)
    t = _TICKETS.get(key)
    if t is None:
        if key.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("grpo_loss: the completion ticket of device "
                               f"{key} must be allocated before CUDA-graph capture: call "
                               "r1fast.kernels.grpo_loss.prepare() or run the loss once first")
        t = prepare(key)
    return t


def _armed_ticket(device: torch.device) -> torch.Tensor:
    """The ticket, reset to 0 in stream order before the launch (``zero_()``: on CUDA a
    one-element fill kernel, no host sync, captured by CUDA graphs like any kernel; so a
    forward is two launches). The kernel's last program also sets it
    back to 0, but a launch that never finished (an abort, an interrupted graph replay, a
    launch on another stream sharing the counter) would leave it non-zero, and then no
    program would see ``ticket == B - 1``: ``totals`` would stay uninitialised with no error.
    The reset makes every launch start from 0 whatever happened before. Launches of this kernel
    on two streams of one device at the same time still share the counter: r1fast issues them
    on one stream."""
    return _ticket(device).zero_()
