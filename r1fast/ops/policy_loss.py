"""The GRPO policy loss: clipped importance-ratio objective + KL penalty, aggregated
(docs/DESIGN.md §3).

Per token t of completion i (``m`` the mask, ``A`` the advantage), all in fp32:

* ``ppo``: ``ratio = exp(clamp(logp - old, -20, 20))``,
  ``l = max(-A ratio, -A clip(ratio, 1-clip_low, 1+clip_high))``; with ``dual_clip=c`` tokens
  with A < 0 are capped at ``-c A``. d l/d logp is ``-A ratio`` where unclipped, 0 where clipped.
* ``gspo``: the sequence ratio ``s_i = exp(clamp(mean_t(m (logp - old)), -20, 20))`` (mean over
  the sequence's valid tokens) replaces the token ratio, in the token form
  ``s_it = exp(sg(log s_i) + logp - sg(logp))`` (value ``s_i``, gradient ``s_i`` per token),
  then the ppo clip (and dual clip) on ``s_it``.
* ``cispo``: ``l = -sg(clip(ratio, 1-clip_low, 1+clip_high)) A logp``.
* truncated IS (``tis_cap=C`` with ``rollout_logp``): the policy term is multiplied by
  ``min(exp(old - rollout_logp), C)``; the KL term is not (it does not depend on the sampler).
* KL to the reference policy, ``d = clamp(ref - logp, -20, 20)``: ``k1 = -d``, ``k2 = d^2/2``,
  ``k3 = clamp(expm1(d) - d, -10, 10)``, ``k3+`` = value of k3 with the gradient of k2; added to
  the per-token loss as ``kl_coef * kl``.

Aggregation (B sequences, N the sum of mask weights):
``token-mean`` ``sum m l / N``; ``seq-mean-token-sum`` ``sum_i sum_t m l / B``;
``seq-mean-token-mean`` ``sum_i (sum_t m l / sum_t m) / B`` (an empty sequence adds 0);
``seq-mean-token-sum-norm`` (Dr.GRPO) ``sum m l / (B * L_max)``.

Against the peers' names: ``token-mean`` is verl's ``token-mean`` and TRL's ``bnpo`` (TRL's
``dapo`` is it with the global token count as ``global_normalizer``); ``seq-mean-token-mean`` is
TRL's ``grpo``, where an empty sequence counts in B, as here (verl divides by the non-empty
sequences only); ``seq-mean-token-sum-norm`` is TRL's and Liger's ``dr_grpo`` with
``L_max = max_completion_length``: verl's mode of the same name divides by ``L_max`` alone, so
its loss is B times this one. verl's KL names: ``kl`` is k1, ``mse`` is k2, ``low_var_kl`` is
k3, ``low_var_kl+`` is k3+; its vanilla loss always applies ``clip_ratio_c = 3`` (here
``dual_clip=3.0``). TRL's and Liger's ``cispo`` cap the ratio at ``epsilon_high`` with no lower
bound: ``clip_low=1.0, clip_high=epsilon_high - 1``.

Data parallelism: each rank passes ``global_normalizer`` = the denominator above computed over
the GLOBAL batch (all ranks): N_global for token-mean, B_global for the seq-mean-* modes, and
B_global * L_max_global for seq-mean-token-sum-norm. Each rank's loss is then its share of the
numerator over that denominator, so the SUM of the local losses (and of their gradients) over
ranks equals the loss of the whole batch on one process. (When gradients are averaged over
ranks, as DDP does, scale the loss by the world size.)

Implementations: :func:`policy_loss_reference` (pure PyTorch, autograd; any device) and the
Triton kernels of ``r1fast.kernels.grpo_loss`` behind ``torch.ops.r1fast.grpo_loss`` (one
launch over the tokens that also saves d loss/d logp, one tiny reduce; the backward is a single
multiply).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from r1fast.ops._dispatch import resolve_impl, value_checks
from r1fast.ops._validate import FLOAT_DTYPES, INDEX_DTYPES, check_choice, check_range, check_tensor

LOSSES = ("ppo", "gspo", "cispo")
KL_ESTIMATORS = (None, "k1", "k2", "k3", "k3+")
VERL_KL_NAMES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3", "low_var_kl+": "k3+"}
AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                "seq-mean-token-sum-norm")
METRICS = ("pg_loss", "kl_loss", "clip_frac", "dual_clip_frac", "kl_mean", "ratio_min",
           "ratio_mean", "ratio_max", "tis_mean", "num_tokens")

__all__ = ["PolicyLossConfig", "policy_loss", "policy_loss_reference", "loss_denominator",
           "LOSSES", "KL_ESTIMATORS", "AGGREGATIONS", "METRICS"]


def _check_number(name: str, value: object, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float{' or None' if allow_none else ''}, "
                         f"got {value!r}")


@dataclass(frozen=True, kw_only=True)
class PolicyLossConfig:
    """How the per-token policy loss is formed and aggregated (see the module docstring).

    The one declaration of the loss options: the ops take it as an object, and the trainer's
    ``[algo]`` table holds one (its fields appear directly in ``[algo]``: ``--algo.kl_coef``).
    Frozen: it is safe as a default argument and can be shared between calls."""

    loss: Literal["ppo", "gspo", "cispo"] = "ppo"
    """Objective: ``"ppo"`` (token ratio), ``"gspo"`` (sequence ratio), ``"cispo"`` (clipped
    IS-weighted REINFORCE)."""
    clip_low: float = 0.2
    """eps_low: the ratio is clipped below at ``1 - clip_low``; in [0, 1] (1: no lower bound)."""
    clip_high: float = 0.2
    """eps_high: clipped above at ``1 + clip_high``; >= 0 (e.g. 0.28 for DAPO's clip-higher)."""
    dual_clip: Optional[float] = None
    """c of dual-clip PPO (e.g. 3.0, verl's ``clip_ratio_c``, which verl always applies): for
    A < 0 the loss is capped at ``-c A``; > 1; ppo/gspo only. None disables it."""
    kl: Optional[Literal["k1", "k2", "k3", "k3+"]] = dataclasses.field(default=None, metadata={
        "names_elsewhere": {k: f"verl's name for {v!r}" for k, v in VERL_KL_NAMES.items()}})
    """KL estimator to the reference policy: ``"k1"``, ``"k2"``, ``"k3"``, ``"k3+"`` or None.
    Needs ``ref_logp``; with ``kl_coef = 0`` it is only reported (``kl_mean``)."""
    kl_coef: float = 0.0
    """beta: weight of the KL term in the per-token loss; >= 0 (> 0 needs ``kl``)."""
    agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                 "seq-mean-token-sum-norm"] = "token-mean"
    """Aggregation: ``"token-mean"``, ``"seq-mean-token-sum"``, ``"seq-mean-token-mean"``,
    ``"seq-mean-token-sum-norm"``."""
    tis_cap: Optional[float] = None
    """C of truncated importance sampling against the rollout engine's log-probs (e.g. 2.0):
    the policy term is weighted by ``min(exp(old - rollout), C)``; > 0. Needs ``rollout_logp``;
    None disables it."""

    def __post_init__(self) -> None:
        check_choice("loss", self.loss, LOSSES)
        _check_number("clip_low", self.clip_low)
        check_range("clip_low", self.clip_low, 0.0, 1.0)
        _check_number("clip_high", self.clip_high)
        check_range("clip_high", self.clip_high, 0.0)
        _check_number("dual_clip", self.dual_clip, allow_none=True)
        if self.dual_clip is not None:
            check_range("dual_clip", self.dual_clip, 1.0, lo_open=True)
            if self.loss == "cispo":
                raise ValueError("dual_clip applies to loss='ppo' or 'gspo', got loss='cispo' "
                                 "(set dual_clip=None)")
        if self.kl in VERL_KL_NAMES:
            raise ValueError(f"kl={self.kl!r} is verl's name: here it is "
                             f"kl={VERL_KL_NAMES[self.kl]!r}")
        check_choice("kl", self.kl, KL_ESTIMATORS)
        _check_number("kl_coef", self.kl_coef)
        check_range("kl_coef", self.kl_coef, 0.0)
        if self.kl_coef > 0 and self.kl is None:
            raise ValueError(f"kl_coef={self.kl_coef} > 0 needs a KL estimator: set kl to one "
                             f"of {KL_ESTIMATORS[1:]}")
        check_choice("agg", self.agg, AGGREGATIONS)
        if self.loss == "gspo" and self.agg != "seq-mean-token-mean":
            # GSPO's objective averages its sequence ratios per sequence; verl forces that
            # aggregation and TRL warns about the others. Attributed to this line, so that it
            # is shown once per process however many configs (replace(), the op's key) follow
            warnings.warn(f"loss='gspo' with agg={self.agg!r}: GSPO is defined with "
                          f"agg='seq-mean-token-mean'; this weighs each sequence by its length",
                          stacklevel=1)
        _check_number("tis_cap", self.tis_cap, allow_none=True)
        if self.tis_cap is not None:
            check_range("tis_cap", self.tis_cap, 0.0, lo_open=True)
        # the custom op's string form, made once here: json.dumps at every call is a graph
        # break under torch.compile (not a field: equality and replace() ignore it)
        object.__setattr__(self, "_key", json.dumps(dataclasses.asdict(self), sort_keys=True))


# ----------------------------------------------------------------------------- layout

@dataclass
class _Layout:
    padded: bool  # [B, L] inputs (else packed [N] with cu_seqlens)
    num_seqs: int  # B
    max_len: int  # L_max used by seq-mean-token-sum-norm
    adv_per_token: bool  # advantages indexed like logp (else one per sequence)
    cu_seqlens: Optional[torch.Tensor]  # packed only: [B+1] as given


def _check_cu_seqlens(cu_seqlens, n: int, dev) -> tuple[int, int | None]:
    """(B, L_max or None) of a packed layout's ``cu_seqlens``; its values are checked (one
    sync) where :func:`r1fast.ops._dispatch.value_checks` allows, and L_max is known only then."""
    if cu_seqlens is None:
        raise ValueError(f"cu_seqlens [B+1] is required for packed 1-D inputs (logp of shape "
                         f"[{n}]); pass padded [B, L] tensors otherwise")
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=INDEX_DTYPES, device=dev)
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must have B+1 >= 1 entries, got 0")
    num_seqs = cu_seqlens.numel() - 1
    if not value_checks(dev):
        return num_seqs, None
    lens = cu_seqlens.diff().long()  # [B]
    first, last, decreasing, length = torch.stack([
        cu_seqlens[0].long(), cu_seqlens[-1].long(), (lens < 0).sum(),
        lens.max() if num_seqs > 0 else lens.new_zeros(())]).tolist()
    if first != 0 or last != n or decreasing:
        raise ValueError(f"cu_seqlens must be non-decreasing from 0 to N={n} (the length of "
                         f"logp), got first={first}, last={last}")
    return num_seqs, length


def _validate(logp, old_logp, advantages, mask, ref_logp, rollout_logp, cu_seqlens, max_len,
              global_normalizer, cfg: PolicyLossConfig) -> _Layout:
    check_tensor("logp", logp, ndim=(1, 2), dtypes=FLOAT_DTYPES)
    dev, shape = logp.device, tuple(logp.shape)
    check_tensor("old_logp", old_logp, dtypes=FLOAT_DTYPES, shape=shape, device=dev)
    check_tensor("mask", mask, dtypes=(torch.bool, *FLOAT_DTYPES), shape=shape, device=dev)
    padded = logp.dim() == 2
    if padded:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens must be None for padded [B, L] inputs (it describes a "
                             f"packed [N] layout), got logp of shape {list(shape)}")
        num_seqs, length = shape
    else:
        num_seqs, length = _check_cu_seqlens(cu_seqlens, shape[0], dev)
    check_tensor("advantages", advantages, dtypes=FLOAT_DTYPES, device=dev)
    if tuple(advantages.shape) == shape:
        adv_per_token = True  # packed with N == B reads per token (documented)
    elif tuple(advantages.shape) == (num_seqs,):
        adv_per_token = False
    else:
        raise ValueError(f"advantages must have shape [{num_seqs}] (one per sequence) or "
                         f"{list(shape)} (one per token), got {list(advantages.shape)}")
    if cfg.kl is not None:
        if ref_logp is None:
            raise ValueError(f"ref_logp is required when kl={cfg.kl!r}")
        check_tensor("ref_logp", ref_logp, dtypes=FLOAT_DTYPES, shape=shape, device=dev)
    if (rollout_logp is None) != (cfg.tis_cap is None):
        given = "a tensor" if rollout_logp is not None else None
        raise ValueError("rollout_logp and tis_cap go together (truncated importance "
                         f"sampling): got rollout_logp={given} and tis_cap={cfg.tis_cap}")
    if rollout_logp is not None:
        check_tensor("rollout_logp", rollout_logp, dtypes=FLOAT_DTYPES, shape=shape, device=dev)
    if max_len is not None:
        if isinstance(max_len, bool) or not isinstance(max_len, int):
            raise ValueError(f"max_len must be an int, got {type(max_len).__name__}")
        check_range("max_len", max_len, 1)
    tensor_norm = isinstance(global_normalizer, torch.Tensor)
    if global_normalizer is not None:
        if tensor_norm:
            if global_normalizer.numel() != 1:
                raise ValueError("global_normalizer must be a number or a 1-element tensor, got "
                                 f"shape {list(global_normalizer.shape)}")
        else:
            _check_number("global_normalizer", global_normalizer)
            check_range("global_normalizer", global_normalizer, 0.0, lo_open=True)
    if value_checks(dev) and (mask.is_floating_point() or tensor_norm):
        # value checks that need the data, in one host sync: a float mask is a weight (>= 0,
        # finite); a tensor normaliser must be finite and > 0 like a number one
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        bad_mask = (~(torch.isfinite(mask) & (mask >= 0))).sum().double() \
            if mask.is_floating_point() else zero
        norm = global_normalizer.detach().reshape(()).double().to(dev) if tensor_norm else zero
        n_bad, norm = torch.stack([bad_mask, norm]).tolist()
        if n_bad:
            raise ValueError(f"mask is a per-token weight and must be finite and >= 0, got "
                             f"{int(n_bad)} negative or NaN/Inf value(s)")
        if tensor_norm and not (math.isfinite(norm) and norm > 0):
            raise ValueError(f"global_normalizer must be a finite number > 0, got the tensor "
                             f"value {norm}")
    if max_len is None and length is None and not padded and global_normalizer is None \
            and cfg.agg == "seq-mean-token-sum-norm":
        if torch.compiler.is_compiling():  # reading L_max is a host sync a graph cannot hold
            raise ValueError("agg='seq-mean-token-sum-norm' on packed rows under torch.compile "
                             "needs max_len (Dr.GRPO's L_max, e.g. the max completion length) "
                             "or global_normalizer")
        length = int(cu_seqlens.diff().max()) if num_seqs > 0 else 0  # needed: L_max (a sync)
    if max_len is None:
        max_len = length if length is not None else 0
    return _Layout(padded, num_seqs, max_len, adv_per_token, cu_seqlens)


def loss_denominator(agg: str, *, num_tokens, num_seqs: int, max_len: int):
    """The denominator of aggregation ``agg``: the one place it is defined.

    ``num_tokens`` is the (mask-weighted) count of valid tokens N, ``num_seqs`` the count of
    sequences B, ``max_len`` L_max: N for token-mean, B * L_max for seq-mean-token-sum-norm
    (Dr.GRPO), B for the seq-mean-* modes. Callers pass local counts for a one-process loss, or
    counts summed over data-parallel ranks for the ``global_normalizer`` of a sharded batch.
    Not clamped: an empty batch gives 0, and each caller decides what 0 means."""
    check_choice("agg", agg, AGGREGATIONS)
    if agg == "token-mean":
        return num_tokens
    if agg == "seq-mean-token-sum-norm":
        return num_seqs * max_len
    return num_seqs


def _denominator(cfg: PolicyLossConfig, layout: _Layout, num_tokens: torch.Tensor,
                 global_normalizer) -> torch.Tensor | float:
    """The given global normaliser, else the local one (an empty batch divides by 1)."""
    if global_normalizer is not None:
        if isinstance(global_normalizer, torch.Tensor):
            return global_normalizer.reshape(()).to(device=num_tokens.device,
                                                    dtype=num_tokens.dtype)
        return float(global_normalizer)
    local = loss_denominator(cfg.agg, num_tokens=num_tokens, num_seqs=layout.num_seqs,
                             max_len=layout.max_len)
    if isinstance(local, torch.Tensor):
        return torch.where(local > 0, local, torch.ones_like(local))
    return float(max(local, 1))


def _finish_metrics(num: dict[str, torch.Tensor], denom, n: torch.Tensor) -> dict:
    """Turn masked sums into the reported metrics (no grad). Averages over zero valid tokens are
    0, except the ratios and the TIS weight, whose neutral value 1 is reported."""
    has = n > 0
    safe_n = torch.where(has, n, torch.ones_like(n))
    one = torch.ones_like(n)
    zero = torch.zeros_like(n)
    return {
        "pg_loss": num["pg"] / denom,
        "kl_loss": num["kl"] / denom,
        "clip_frac": torch.where(has, num["clip"] / safe_n, zero),
        "dual_clip_frac": torch.where(has, num["dual"] / safe_n, zero),
        "kl_mean": torch.where(has, num["klraw"] / safe_n, zero),
        "ratio_min": torch.where(has, num["rmin"], one),
        "ratio_mean": torch.where(has, num["ratio"] / safe_n, one),
        "ratio_max": torch.where(has, num["rmax"], one),
        "tis_mean": torch.where(has, num["tis"] / safe_n, one),
        "num_tokens": n,
    }


# ----------------------------------------------------------------------------- reference

def _packed_to_padded(x: torch.Tensor, seq_id: torch.Tensor, pos: torch.Tensor, b: int,
                      length: int, fill=0) -> torch.Tensor:
    out = torch.full((b, length), fill, dtype=x.dtype, device=x.device)
    out = out.index_put((seq_id, pos), x)  # out-of-place keeps autograd to x
    return out


def _kl_value(kl: str, lp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    d = torch.clamp(ref - lp, -20.0, 20.0)
    if kl == "k1":
        return -d
    k2 = 0.5 * d * d
    if kl == "k2":
        return k2
    k3 = torch.clamp(torch.expm1(d) - d, -10.0, 10.0)
    if kl == "k3":
        return k3
    return k3.detach() + (k2 - k2.detach())  # k3+: value of k3, gradient of k2


def policy_loss_reference(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    config: PolicyLossConfig, ref_logp=None, rollout_logp=None, cu_seqlens=None, max_len=None,
    global_normalizer=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pure-PyTorch loss; the contract of :func:`policy_loss` with the options in ``config``.

    Computes in fp32 (fp64 for fp64 ``logp``, so ``gradcheck`` applies) and differentiates by
    autograd; the packed layout is scattered into a padded ``[B, L_max]`` one first.
    """
    layout = _validate(logp, old_logp, advantages, mask, ref_logp, rollout_logp, cu_seqlens,
                       max_len, global_normalizer, config)
    return _reference(logp, old_logp, advantages, mask, ref_logp, rollout_logp, cu_seqlens,
                      layout, config, global_normalizer)


def _reference(logp, old_logp, advantages, mask, ref_logp, rollout_logp, cu_seqlens,
               layout: _Layout, cfg: PolicyLossConfig, global_normalizer):
    cdt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    b = layout.num_seqs
    lp, old, m, ref, roll, adv = (logp.to(cdt), old_logp.detach().to(cdt), mask.to(cdt),
                                  None, None, advantages.detach().to(cdt))
    if ref_logp is not None and cfg.kl is not None:
        ref = ref_logp.detach().to(cdt)
    if rollout_logp is not None:
        roll = rollout_logp.detach().to(cdt)
    if not layout.padded:  # scatter every per-token stream into [B, L_max]
        lens = cu_seqlens.diff().long()
        length = int(lens.max()) if b > 0 else 0
        seq_id = torch.repeat_interleave(torch.arange(b, device=lp.device), lens)  # [N]
        pos = torch.arange(lp.numel(), device=lp.device) - cu_seqlens.long()[seq_id]  # [N]

        def pad(x):
            return None if x is None else _packed_to_padded(x, seq_id, pos, b, length)

        lp, old, m, ref, roll = pad(lp), pad(old), pad(m), pad(ref), pad(roll)
        if layout.adv_per_token:
            adv = pad(adv)
    if not layout.adv_per_token:
        adv = adv[:, None]  # [B, 1], broadcast over the tokens
    valid = m != 0  # [B, L]
    zero = torch.zeros((), dtype=cdt, device=lp.device)
    # Padding may hold junk (-inf, NaN): replace it before any arithmetic so neither the value
    # nor the gradient can pick it up.
    lp = torch.where(valid, lp, zero)
    old = torch.where(valid, old, zero)
    adv = torch.where(valid, adv, zero)
    cnt = m.sum(-1)  # [B]

    if cfg.loss == "gspo":
        log_s = torch.where(cnt != 0, (m * (lp - old)).sum(-1) / torch.where(cnt != 0, cnt, 1.0),
                            zero)
        s = torch.exp(torch.clamp(log_s, -20.0, 20.0)).detach()[:, None]  # [B, 1]
        # exp(sg(log s) + logp - sg(logp)) has value s and gradient s; written as
        # s * (1 + logp - sg(logp)) the value is exactly s (no exp/log round trip).
        ratio = s * (1.0 + lp - lp.detach())
    else:
        ratio = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
    lo, hi = 1.0 - cfg.clip_low, 1.0 + cfg.clip_high
    if cfg.loss == "cispo":
        pg = -torch.clamp(ratio, lo, hi).detach() * adv * lp
    else:
        pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, lo, hi))
        if cfg.dual_clip is not None:
            pg = torch.where(adv < 0, torch.minimum(pg, -cfg.dual_clip * adv), pg)
    tis_w = None
    if cfg.tis_cap is not None:
        roll = torch.where(valid, roll, zero)
        tis_w = torch.clamp(torch.exp(old - roll), max=cfg.tis_cap)
        pg = pg * tis_w
    klv = None
    if cfg.kl is not None:
        klv = _kl_value(cfg.kl, lp, torch.where(valid, ref, zero))

    pg_seq = torch.where(valid, m * pg, zero).sum(-1)  # [B]
    kl_seq = torch.where(valid, m * klv, zero).sum(-1) if klv is not None else zero.expand(b)
    if cfg.agg == "seq-mean-token-mean":
        w = torch.where(cnt != 0, 1.0 / torch.where(cnt != 0, cnt, 1.0), zero)  # [B]
    else:
        w = torch.ones_like(cnt)
    pg_num = (w * pg_seq).sum()
    kl_num = (w * (cfg.kl_coef * kl_seq)).sum()
    n = cnt.sum()
    denom = _denominator(cfg, layout, n.detach(), global_normalizer)
    loss = (pg_num + kl_num) / denom

    metrics = _reference_metrics(cfg, ratio, adv, valid, m, tis_w, pg_num, kl_num, kl_seq, n,
                                 denom)
    return loss, metrics


@torch.no_grad()
def _reference_metrics(cfg: PolicyLossConfig, ratio, adv, valid, m, tis_w, pg_num, kl_num,
                       kl_seq, n, denom) -> dict[str, torch.Tensor]:
    """The reference path's masked sums -> :func:`_finish_metrics` (no autograd)."""
    r = ratio.detach()
    lo, hi = 1.0 - cfg.clip_low, 1.0 + cfg.clip_high
    pos, neg = adv > 0, adv < 0
    # cispo truncates the IS weight of every token outside [lo, hi], whatever the sign of A
    clipped = ((r > hi) | (r < lo)) if cfg.loss == "cispo" else (pos & (r > hi)) | (neg & (r < lo))
    dual = (neg & (r > cfg.dual_clip)) if cfg.dual_clip is not None and cfg.loss != "cispo" \
        else torch.zeros_like(valid)
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    inf = torch.full((), float("inf"), dtype=r.dtype, device=r.device)
    sums = {
        "pg": pg_num.detach(), "kl": kl_num.detach(),
        "clip": torch.where(valid & clipped, m, zero).sum(),
        "dual": torch.where(valid & dual, m, zero).sum(),
        "klraw": kl_seq.detach().sum(),
        "ratio": torch.where(valid, m * r, zero).sum(),
        "rmin": torch.where(valid, r, inf).amin() if r.numel() else inf,
        "rmax": torch.where(valid, r, -inf).amax() if r.numel() else -inf,
        "tis": torch.where(valid, m * tis_w, zero).sum() if tis_w is not None else n.detach(),
    }
    return _finish_metrics(sums, denom, n.detach())


# ----------------------------------------------------------------------------- triton op

@functools.lru_cache(maxsize=64)
def _config_from_key(key: str) -> PolicyLossConfig:
    return PolicyLossConfig(**json.loads(key))


def _config_key(cfg: PolicyLossConfig) -> str:
    """The config as the custom op's one string argument (ops take tensors and scalars only);
    decoded once per distinct config by :func:`_config_from_key`; made in ``__post_init__``."""
    return cfg._key


@torch.library.custom_op("r1fast::grpo_loss", mutates_args=())
def _grpo_loss_op(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                  ref_logp: Optional[torch.Tensor], rollout_logp: Optional[torch.Tensor],
                  normalizer: Optional[torch.Tensor], num_seqs: int, seq_len: int,
                  norm_value: float, adv_per_token: bool,
                  config: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat inputs -> (totals [12] fp32: loss and metrics, dlogp [N] fp32: saved gradient).
    ``config`` is :func:`_config_key` of the :class:`PolicyLossConfig`; see
    ``r1fast.kernels.grpo_loss.grpo_loss_fwd`` for the other arguments."""
    from r1fast.kernels.grpo_loss import grpo_loss_fwd  # lazy: needs triton

    totals, dlogp, _ = grpo_loss_fwd(
        logp, old_logp, advantages, mask, cu_seqlens, ref_logp, rollout_logp,
        num_seqs=num_seqs, seq_len=seq_len, norm_value=norm_value, normalizer=normalizer,
        adv_per_token=adv_per_token, **dataclasses.asdict(_config_from_key(config)))
    return totals, dlogp


@_grpo_loss_op.register_fake
def _(logp, old_logp, advantages, mask, cu_seqlens, ref_logp, rollout_logp, normalizer,
      num_seqs, seq_len, norm_value, adv_per_token, config):
    return (logp.new_empty((_NUM_TOTALS,), dtype=torch.float32),
            logp.new_empty(logp.shape, dtype=torch.float32))


def _grpo_loss_setup_context(ctx, inputs, output):
    totals, dlogp = output
    ctx.save_for_backward(dlogp, totals)
    ctx.logp_dtype = inputs[0].dtype


def _grpo_loss_backward(ctx, grad_totals, grad_dlogp):
    # Only totals[T_LOSS] is differentiable: the other totals are metrics the caller reads
    # detached, and dlogp is a saved intermediate. One elementwise multiply over the tokens.
    dlogp, totals = ctx.saved_tensors
    scale = grad_totals[_T_LOSS] / totals[_T_DENOM]
    return ((dlogp * scale).to(ctx.logp_dtype),) + (None,) * 12


_grpo_loss_op.register_autograd(_grpo_loss_backward, setup_context=_grpo_loss_setup_context)

# Slots of the op's ``totals`` output (r1fast.kernels.grpo_loss.T_*), kept here so that this
# module imports without Triton.
(_T_LOSS, _T_PG, _T_KL, _T_CNT, _T_CLIP, _T_DUAL, _T_KL_MEAN, _T_RMIN, _T_RMEAN, _T_RMAX, _T_TIS,
 _T_DENOM) = range(12)
_NUM_TOTALS = 12
_METRIC_SLOTS = {"pg_loss": _T_PG, "kl_loss": _T_KL, "clip_frac": _T_CLIP,
                 "dual_clip_frac": _T_DUAL, "kl_mean": _T_KL_MEAN, "ratio_min": _T_RMIN,
                 "ratio_mean": _T_RMEAN, "ratio_max": _T_RMAX, "tis_mean": _T_TIS,
                 "num_tokens": _T_CNT}


def _policy_loss_triton(logp, old_logp, advantages, mask, ref_logp, rollout_logp, layout,
                        cfg: PolicyLossConfig, global_normalizer):
    def flat(x):
        return None if x is None else x.reshape(-1).contiguous()

    # The aggregation's denominator: a device tensor is read by the kernel (no sync), a number
    # is passed by value, and 0 asks the kernel for the local token count.
    norm_tensor, norm_value = None, 0.0
    if isinstance(global_normalizer, torch.Tensor):
        norm_tensor = global_normalizer.reshape(1).to(device=logp.device, dtype=torch.float32)
    elif global_normalizer is not None:
        norm_value = float(global_normalizer)
    elif cfg.agg != "token-mean":  # token-mean: the kernel counts the tokens itself
        norm_value = float(max(loss_denominator(cfg.agg, num_tokens=0, num_seqs=layout.num_seqs,
                                                max_len=layout.max_len), 1))
    adv = flat(advantages) if layout.adv_per_token else advantages.contiguous()
    totals, _ = _grpo_loss_op(
        flat(logp), flat(old_logp).detach(), adv.detach(), flat(mask),
        None if layout.padded else layout.cu_seqlens.contiguous(),
        flat(ref_logp).detach() if cfg.kl is not None else None,
        flat(rollout_logp).detach() if cfg.tis_cap is not None else None,
        norm_tensor, layout.num_seqs, logp.shape[1] if layout.padded else 0, norm_value,
        layout.adv_per_token, _config_key(cfg))
    t = totals.detach()
    return totals[_T_LOSS], {name: t[slot] for name, slot in _METRIC_SLOTS.items()}


# ----------------------------------------------------------------------------- public op

def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: PolicyLossConfig = PolicyLossConfig(),
    *,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    global_normalizer: float | torch.Tensor | None = None,
    max_len: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO policy loss and metrics. Differentiable w.r.t. ``logp`` only.

    Args:
        logp: current-policy log-probs of the sampled tokens, padded ``[B, L]`` or packed
            ``[N]`` (then ``cu_seqlens [B+1]`` gives the sequence boundaries).
        old_logp: log-probs of the policy that sampled, same shape (a constant).
        advantages: ``[B]`` per sequence, or per token with the shape of ``logp`` (a packed
            batch with N == B is read per token).
        mask: same shape, bool, or float (or integer: verl's) weights ``m`` (0 excludes a
            token; positions with ``m == 0`` may hold any value, NaN included).
        config: the objective, clipping, KL estimator and aggregation
            (:class:`PolicyLossConfig`).
        ref_logp: reference-policy log-probs, needed when ``config.kl`` is set.
        rollout_logp: the rollout engine's log-probs for truncated IS (with ``config.tis_cap``).
        global_normalizer: the denominator of ``config.agg`` over the GLOBAL batch under data
            parallelism (:func:`loss_denominator` of the global counts); a positive number or
            1-element tensor. None: the local value (1 for an empty batch).
        max_len: L_max of seq-mean-token-sum-norm; defaults to L (padded) or the longest
            sequence (packed). Ignored when ``global_normalizer`` is given.
        cu_seqlens: ``[B+1]`` int offsets of the packed layout (non-decreasing, 0 to N).
        impl: ``"auto"`` | ``"torch"`` | ``"triton"``.

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-d fp32 tensor (fp64 for fp64 inputs on the torch
        path); ``metrics`` detached 0-d tensors: ``pg_loss`` and ``kl_loss`` (the two parts of
        the loss, same normaliser, ``kl_loss`` includes ``kl_coef``), ``clip_frac`` (valid
        tokens with A > 0 and ratio > 1+clip_high or A < 0 and ratio < 1-clip_low; for cispo,
        whose weight is truncated for either sign, ratio outside [1-clip_low, 1+clip_high]),
        ``dual_clip_frac`` (A < 0 and ratio > dual_clip), ``kl_mean`` (token mean of the KL
        estimate, 0 without ``kl``), ``ratio_min/mean/max`` (the ratio the loss uses: token
        ratio, or the sequence ratio for gspo), ``tis_mean`` (mean TIS weight, 1 without TIS)
        and ``num_tokens`` (local N). Token averages are mask-weighted over the local batch.
    """
    if not isinstance(config, PolicyLossConfig):
        raise ValueError(f"config must be a PolicyLossConfig, got {type(config).__name__}")
    if isinstance(mask, torch.Tensor) and not (mask.is_floating_point() or mask.is_complex()):
        mask = mask if mask.dtype == torch.bool else mask.float()  # verl's int64 0/1 mask
    layout = _validate(logp, old_logp, advantages, mask, ref_logp, rollout_logp, cu_seqlens,
                       max_len, global_normalizer, config)
    chosen = resolve_impl("policy_loss", impl, logp.device, supported=("torch", "triton"))
    if chosen == "triton":
        return _policy_loss_triton(logp, old_logp, advantages, mask, ref_logp, rollout_logp,
                                   layout, config, global_normalizer)
    return _reference(logp, old_logp, advantages, mask, ref_logp, rollout_logp, cu_seqlens,
                      layout, config, global_normalizer)
