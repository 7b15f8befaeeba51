"""The fused policy loss with its gradients computed in the forward: three GEMMs, not four.

``fused_linear_policy_loss`` normally runs ``linear_logprob`` (one GEMM pass over the logits in
the forward) and, in the backward, recomputes the logits (a second pass) to form
``dz = dL/dz`` and the two gradient GEMMs: ``8 T H V`` FLOPs. But the loss is known in the
forward, and for a token-level objective (PPO or CISPO clipping, any KL estimator, TIS, any
aggregation) the gradient of a token's log-prob depends on that token alone:
``g_t = dL/dlogp_t = c_t * dl_t/dlogp_t``, where ``c_t`` comes from the mask and lengths only.
So a token chunk's logits, once reduced to its log-probs, can be turned into ``dz`` at once:

    for each group of token chunks (its dz rows, 16-bit, fit DEFAULT_CHUNKS.grad_in_forward_dz):
        for each chunk of the group (its fp32 logits over this shard's vocabulary fit the
        workspace):
            z = x_c W^T                               GEMM 1 (cuBLAS, fp32 out)
            (m, s, S, z_y) -> lse, logp_c, entropy_c  Triton row kernel (+ merge over TP)
            g_c = d loss / d logp_c                   the policy loss's own autograd, at the
                                                      log-probs known so far (token-local:
                                                      the not-yet-known rows cannot matter)
            dz_c = g_c (1[j = y] - p) / tau           Triton row kernel, in the input dtype,
                                                      into the group's rows
        dx_g = dz_g W                                 GEMM 2 (+ all-reduce over TP ranks)
        dW  += dz_g^T x_g                             GEMM 3 (fp32 accumulator)

``6 T H V`` FLOPs, a quarter fewer. Why groups: every dW GEMM writes an fp32 ``[V, H]`` result
that the accumulator then adds (read both, write one: 10 GB at V=151936, H=4096). Per chunk of
the ~880 rows whose fp32 logits fit the 512 MiB workspace, T=16384 would take 19 of those,
~190 GB or ~55 ms at H100 bandwidth, more than the skipped GEMM saves (2THV, ~30 ms). One
GEMM per group of ~3500 rows (1 GiB of dz) takes 5: the first writes the accumulator
directly, four add, ~43 GB. The other price is memory: the fp32 ``[V, H]`` accumulator (2.5
GB on one rank; a TP shard's rows otherwise) and the GEMM result added to it, the group's dz,
and ``dx``, ``dW`` kept, rounded to the parameters' dtypes, from the forward to the backward.
The loss value and metrics are the policy loss's, on the final log-probs; the backward
multiplies the stored gradients by the loss's upstream gradient.

Not for GSPO: its ratio is a sequence mean, so a token's gradient depends on the rest of its
sequence (``ValueError``). The row kernels are those of ``r1fast.kernels.linear_logprob_gemm``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from r1fast.ops._dispatch import value_checks
from r1fast.ops.linear_logprob import (DEFAULT_CHUNKS, _check_even_shards, _check_temperature,
                                       _finish, check_temperature_values, inverse_temperature)
from r1fast.ops.policy_loss import PolicyLossConfig

__all__ = ["forward_with_grads", "check_grad_in_forward", "chunk_rows", "group_rows",
           "TOKEN_LEVEL_LOSSES"]

#: losses whose gradient of a token's log-prob depends on that token alone
TOKEN_LEVEL_LOSSES = ("ppo", "cispo")

LossOf = Callable[[torch.Tensor], tuple[torch.Tensor, dict]]


def check_grad_in_forward(config: PolicyLossConfig, chosen_impl: str) -> None:
    """Refuse what the in-forward gradient cannot do, naming why."""
    if config.loss not in TOKEN_LEVEL_LOSSES:
        raise ValueError(f"grad_in_forward needs a token-level loss {TOKEN_LEVEL_LOSSES}; "
                         f"loss={config.loss!r} couples the tokens of a sequence")
    if chosen_impl != "triton":
        raise ValueError("grad_in_forward runs on Triton row kernels (impl='triton'); impl "
                         f"resolved to {chosen_impl!r} here")


class _PrecomputedGrads(torch.autograd.Function):
    """``loss`` as a function of ``hidden`` and ``weight`` whose gradients are already known."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, grad_hidden, grad_weight):
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss.detach().clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss.to(torch.float32)
        gx = (grad_hidden.float() * scale).to(grad_hidden.dtype)
        gw = None if grad_weight is None else (grad_weight.float() * scale).to(grad_weight.dtype)
        return None, gx, gw, None, None


def chunk_rows(N: int, V: int) -> int:
    """Token rows per chunk of :func:`forward_with_grads` for ``N`` rows and ``V`` vocabulary
    rows: as many as keep the chunk's fp32 logits within the bytes of
    ``DEFAULT_CHUNKS.triton_workspace`` 16-bit elements."""
    return max(1, min(N, DEFAULT_CHUNKS.triton_workspace // (2 * V)))


def group_rows(N: int, V: int) -> int:
    """Token rows whose dz :func:`forward_with_grads` gathers before one dW GEMM: whole chunks
    of :func:`chunk_rows`, as many as fit ``DEFAULT_CHUNKS.grad_in_forward_dz`` elements
    (at least one chunk, at most all ``N`` rows)."""
    ct = chunk_rows(N, V)
    return min(max(1, N), max(ct, DEFAULT_CHUNKS.grad_in_forward_dz // V // ct * ct))


def forward_with_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       placeholder_logp: torch.Tensor, loss_of: LossOf, *,
                       temperature: float | torch.Tensor, ignore_index: int, tp_group=None
                       ) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """``(loss, metrics, entropy [N])`` of ``loss_of`` applied to the log-probs of ``targets``
    under ``hidden [N, H] @ weight^T / tau``; the loss backpropagates into ``hidden`` and
    ``weight`` through gradients computed here.

    ``loss_of(logp [N] fp32)`` returns the policy loss and its metrics. ``placeholder_logp
    [N]`` fills the rows whose log-probs are not computed yet when a chunk's gradient is taken
    (the old log-probs: finite, ratio 1). ``temperature`` is one float or ``[N]``, one per row
    (as ``linear_logprob``'s). A chunk has as many rows as keep its fp32 logits
    within the bytes of ``DEFAULT_CHUNKS.triton_workspace`` 16-bit elements; a group (one dx
    and one dW GEMM) has :func:`group_rows` rows.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    _check_temperature(temperature, N, hidden.device)
    if value_checks(hidden.device):  # host syncs on a GPU: debug mode, as linear_logprob's
        check_temperature_values(temperature, targets, ignore_index)
        if tp_group is not None:
            _check_even_shards(weight, tp_group, dist.get_world_size(tp_group))
    inv_tau = inverse_temperature(temperature, targets, ignore_index)  # float or [N] fp32
    with torch.no_grad():
        x, w, y = hidden.detach().contiguous(), weight.detach().contiguous(), targets.contiguous()
        logp = placeholder_logp.detach().float().clone()  # [N], overwritten chunk by chunk
        entropy = torch.zeros(N, device=x.device, dtype=torch.float32)
        dx = torch.empty(N, H, device=x.device, dtype=torch.float32)
        dw = None  # fp32 [V, H], written by the first group's GEMM
        gr = group_rows(N, V)
        dz = torch.empty(gr, V, device=x.device, dtype=x.dtype)  # dz / tau of a group's rows
        for g0 in range(0, N, gr):
            g1 = min(N, g0 + gr)
            _group_dz(x, w, y, logp, entropy, loss_of, g0, g1, dz[: g1 - g0],
                      inv_tau=inv_tau, ignore_index=ignore_index, tp_group=tp_group)
            dx[g0:g1] = _mm_fp32(dz[: g1 - g0], w)  # GEMM 2
            if tp_group is not None:
                dist.all_reduce(dx[g0:g1], group=tp_group)  # every shard's vocabulary
            if weight.requires_grad:
                part = _mm_fp32(dz[: g1 - g0].t(), x[g0:g1])  # [V, H] fp32 (GEMM 3)
                dw = part if dw is None else dw.add_(part)
                del part
        del dz
        if weight.requires_grad and dw is None:  # no rows: a zero gradient, not None
            dw = torch.zeros(V, H, device=x.device, dtype=torch.float32)
        loss, metrics = loss_of(logp)
        grad_w = None if dw is None else dw.to(weight.dtype)
        grad_x = dx.to(hidden.dtype)
        del dw, dx
    # outside no_grad: the loss joins the autograd graph of hidden and weight here
    return _PrecomputedGrads.apply(loss, hidden, weight, grad_x, grad_w), metrics, entropy


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in fp32 from 16-bit operands (cuBLAS ``out_dtype`` on CUDA): the module's
    three GEMMs."""
    from r1fast.kernels.linear_logprob_gemm import mm_fp32  # lazy: importing needs triton

    return mm_fp32(a, b)


def _group_dz(x, w, y, logp, entropy, loss_of: LossOf, g0: int, g1: int, out: torch.Tensor, *,
              inv_tau: float | torch.Tensor, ignore_index: int, tp_group) -> None:
    """Rows ``[g0, g1)``, chunk by chunk: logits (GEMM 1), their statistics, the loss's
    gradient at the log-probs known so far, and ``dz / tau`` into ``out [g1 - g0, V]``;
    ``logp`` and ``entropy`` gain the rows."""
    from r1fast.kernels import linear_logprob_gemm as G  # lazy: importing needs triton
    from r1fast.kernels.linear_logprob import rows_of

    V = w.shape[0]
    vocab_start = (dist.get_rank(tp_group) if tp_group is not None else 0) * V
    ct = chunk_rows(x.shape[0], V)
    stats = torch.empty(4, ct, device=x.device, dtype=torch.float32)
    for t0 in range(g0, g1, ct):
        t1 = min(g1, t0 + ct)
        rows, n = slice(t0, t1), t1 - t0
        ignored = y[rows] == ignore_index  # [n]
        z = _mm_fp32(x[rows], w.t())  # [n, V] fp32 logits * tau (GEMM 1)
        G.tile_stats(z, y[rows], rows_of(inv_tau, t0, t1), vocab_start, stats[:, :n])
        lp, ent, lse = _finish(stats[:, :n], ignored, tp_group)
        logp[rows], entropy[rows] = lp, ent
        g = _loss_grad(loss_of, logp)[rows].masked_fill(ignored, 0.0)
        G.tile_dz(z, y[rows], lse, ent, g, torch.zeros_like(g), rows_of(inv_tau, t0, t1),
                  vocab_start, out[t0 - g0:t1 - g0])
        del z


def _loss_grad(loss_of: LossOf, logp: torch.Tensor) -> torch.Tensor:
    """``d loss / d logp`` at ``logp [N]`` by the policy loss's own autograd."""
    with torch.enable_grad():
        lp = logp.detach().clone().requires_grad_()
        loss, _ = loss_of(lp)
        (grad,) = torch.autograd.grad(loss, lp)
    return grad
