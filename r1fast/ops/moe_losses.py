"""The router's auxiliary losses, apart from routing (:mod:`r1fast.ops.moe_route`) so that the
caller picks which tokens a loss is over and where their counts come from.

- :func:`moe_aux_loss`: the load-balancing loss of Switch / megatron's ``aux_loss`` over a set
  of tokens (megatron: a micro-batch), ``coef * E / (k T^2) * sum_e n_e * sum_t P_te``, i.e.
  ``coef * sum_e f_e P_e`` with ``f_e = E n_e / (k T)`` (load relative to balance) and
  ``P_e`` the mean score.
- :func:`moe_seq_aux_loss`: DeepSeek-V3's sequence-wise balance loss (V3 report eqs. 17-20,
  DeepSeek-V2's ``seq_aux``): the same sum within each sequence of ``L_n`` tokens, averaged
  over the sequences, ``coef / N * sum_n E / (k L_n^2) * sum_e c_ne * sum_{t in n} P_te``. It
  keeps any one sequence from piling onto a few experts, where the batch-wise loss only asks
  it of the whole batch.
- :func:`moe_z_loss`: ST-MoE's router z-loss ``coef / T * sum_t lse(l_t)^2``.

The scores ``P`` are :func:`r1fast.ops.moe_route.moe_aux_scores` (full softmax, or sigmoid
normalised per token; the only differentiable input) and the counts those of a plain top-k on
them. Counts and token totals are inputs so that they can be summed over ranks that each hold
part of the tokens (sequence parallelism) while ``P`` stays local: each rank's loss is then its
share, and the shares add up to the loss over all the tokens. Everything is computed in fp32
(fp64 for fp64 scores); token totals may be 0-d device tensors, never read on the host.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from r1fast.ops._dispatch import checks_values
from r1fast.ops._validate import INDEX_DTYPES, check_range, check_tensor
from r1fast.ops.moe_route import _LOGIT_DTYPES, _check_logits, _compute_dtype


def moe_aux_loss(scores: Tensor, tokens_per_expert: Tensor, topk: int, coef: float, *,
                 num_tokens: Optional[int | Tensor] = None) -> Tensor:
    """Load-balancing loss ``coef * E / (k * T^2) * sum_e n_e * sum_t P_te`` (fp32 scalar).

    ``scores`` [T, E]: :func:`moe_aux_scores` output (differentiable); ``tokens_per_expert`` [E]:
    the counts n_e (Megatron uses those of :func:`moe_aux_scores`; pass global counts with the
    global T as ``num_tokens``, Megatron's ``total_num_tokens``: an int, or a 0-d tensor kept on
    the device). The gradient w.r.t. ``P_te`` is the constant ``coef*E*n_e/(k*T^2)``."""
    check_tensor("scores", scores, ndim=2, dtypes=_LOGIT_DTYPES)
    T, E = scores.shape
    check_tensor("tokens_per_expert", tokens_per_expert, shape=(E,), device=scores.device)
    check_range("topk", topk, 1, E)
    check_range("coef", float(coef), 0.0, None)
    per_expert = scores.to(_compute_dtype(scores)).sum(0)  # [E]
    scale = _per_tokens(coef * E / topk, T if num_tokens is None else num_tokens, 2, per_expert)
    return (per_expert * tokens_per_expert.to(per_expert.dtype)).sum() * scale


def moe_seq_aux_loss(scores: Tensor, sequence: Tensor, tokens_per_expert: Tensor,
                     tokens: Tensor, topk: int, coef: float, *,
                     validate: Optional[bool] = None) -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss (fp32 scalar):
    ``coef / N' * sum_n E / (k * L_n^2) * sum_e c_ne * sum_{t in n} P_te``, over the ``N'``
    sequences with ``L_n > 0`` (a sequence of pads only does not count).

    ``scores`` [T, E]: :func:`moe_aux_scores` output (differentiable), zero in rows that must
    not count (pads); ``sequence`` [T] int: the sequence of each token, in ``[0, N)``;
    ``tokens_per_expert`` [N, E]: ``c_ne``, the tokens of sequence n whose plain top-k holds
    expert e; ``tokens`` [N]: ``L_n``, the tokens of sequence n that count (pass both summed
    over the ranks that share the sequences). The gradient w.r.t. ``P_te`` is the constant
    ``coef * E * c_ne / (k * L_n^2 * N')`` for t in sequence n. ``validate``: check that the
    ids are in range (a host sync; default: on the CPU, or under ``R1FAST_DEBUG_CHECKS``)."""
    T, E = _check_logits(scores)
    check_tensor("sequence", sequence, shape=(T,), dtypes=INDEX_DTYPES, device=scores.device)
    check_tensor("tokens_per_expert", tokens_per_expert, shape=(None, E), device=scores.device)
    N = tokens_per_expert.shape[0]
    check_tensor("tokens", tokens, shape=(N,), device=scores.device)
    check_range("topk", topk, 1, E)
    check_range("coef", float(coef), 0.0, None)
    if checks_values(validate, scores.device) and T and not (0 <= int(sequence.min())
                                                             and int(sequence.max()) < N):
        raise ValueError(f"sequence holds ids in [{int(sequence.min())}, "
                         f"{int(sequence.max())}], outside [0, N={N}) of tokens_per_expert")
    dtype = _compute_dtype(scores)
    per_sequence = torch.zeros(N, E, dtype=dtype, device=scores.device).index_add_(
        0, sequence.long(), scores.to(dtype))  # [N, E]: sum_{t in n} P_te
    length = tokens.to(dtype)  # [N]
    counted = (length > 0).to(dtype)  # [N]
    weight = counted / length.clamp_min(1.0).square() / counted.sum().clamp_min(1.0)  # [N]
    load = tokens_per_expert.to(dtype) * weight[:, None]  # [N, E]
    return (per_sequence * load).sum() * (coef * E / topk)


def _per_tokens(constant: float, n: int | Tensor, power: int, like: Tensor) -> float | Tensor:
    """``constant / n ** power``; a 0-d tensor ``n`` stays on the device, clamped to >= 1."""
    if isinstance(n, Tensor):
        check_tensor("num_tokens", n, ndim=0, device=like.device)
        return constant / n.to(like.dtype).clamp_min(1.0) ** power
    check_range("num_tokens", n, 1, None)
    return constant / float(n) ** power


def moe_z_loss(logits: Tensor, coef: float, *, num_tokens: Optional[int | Tensor] = None,
               valid: Optional[Tensor] = None) -> Tensor:
    """Router z-loss ``coef/T * sum_t lse(l_t)^2`` in fp32; ``valid`` [T] bool: only those rows
    enter the sum, but ``T`` is ``num_tokens`` (the router passes the valid count) else all."""
    T, _ = _check_logits(logits)
    check_range("coef", float(coef), 0.0, None)
    x = logits.to(_compute_dtype(logits))
    if valid is not None:  # pads' logits go too: a NaN there would reach the gradient (0 * NaN)
        check_tensor("valid", valid, shape=(T,), dtypes=(torch.bool,), device=logits.device)
        x = torch.where(valid[:, None], x, 0.0)
    lse = torch.logsumexp(x, dim=-1)  # [T]
    lse = lse if valid is None else torch.where(valid, lse, 0.0)
    return lse.square().sum() * _per_tokens(coef, T if num_tokens is None else num_tokens, 1, lse)
