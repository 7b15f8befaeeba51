"""The fused policy loss with its gradients computed in the forward: three GEMMs, not four.

``fused_linear_policy_loss`` normally runs ``linear_logprob`` (one GEMM pass over the logits in
the forward) and, in the backward, recomputes the logits (a second pass) to form
``dz = dL/dz`` and the two gradient GEMMs: ``8 T H V`` FLOPs. But the loss is known in the
forward, and for a token-level objective (PPO or CISPO clipping, any KL estimator, TIS, any
aggregation) the gradient of a token's log-prob depends on that token alone:
``g_t = dL/dlogp_t = c_t * dl_t/dlogp_t``, where ``c_t`` comes from the mask and lengths only.
So a token chunk's logits, once reduced to its log-probs, can be turned into ``dz`` at once:

    for each chunk of tokens (its fp32 logits over this shard's whole vocabulary fit the
    workspace):
        z = x_c W^T                               GEMM 1 (cuBLAS, fp32 out)
        (m, s, S, z_y) -> lse, logp_c, entropy_c  Triton row kernel (+ merge over TP ranks)
        g_c = d loss / d logp_c                   the policy loss's own autograd, evaluated at
                                                  the log-probs known so far (token-local:
                                                  the not-yet-known rows cannot matter)
        dz = g_c (1[j = y] - p) / tau             Triton row kernel, in the input dtype
        dx_c = dz W                               GEMM 2 (+ all-reduce over TP ranks)
        dW  += dz^T x_c                           GEMM 3 (fp32 accumulator)

``6 T H V`` FLOPs, a quarter fewer. The price is memory: dW of every chunk is accumulated in an
fp32 ``[V, H]`` buffer (2.5 GB for V=151936, H=4096 on one rank; a TP shard's rows
otherwise), and ``dx``, ``dW`` are kept, rounded to the parameters' dtypes, from the forward to
the backward. The loss value and metrics are the policy loss's, on the final log-probs; the
backward multiplies the stored gradients by the loss's upstream gradient.

Not for GSPO: its ratio is a sequence mean, so a token's gradient depends on the rest of its
sequence (``ValueError``). The row kernels are those of ``r1fast.kernels.linear_logprob_gemm``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from r1fast.ops.linear_logprob import DEFAULT_CHUNKS, _finish
from r1fast.ops.policy_loss import PolicyLossConfig

__all__ = ["forward_with_grads", "check_grad_in_forward", "chunk_rows", "TOKEN_LEVEL_LOSSES"]

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


def forward_with_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       placeholder_logp: torch.Tensor, loss_of: LossOf, *, temperature: float,
                       ignore_index: int, tp_group=None
                       ) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """``(loss, metrics, entropy [N])`` of ``loss_of`` applied to the log-probs of ``targets``
    under ``hidden [N, H] @ weight^T / tau``; the loss backpropagates into ``hidden`` and
    ``weight`` through gradients computed here.

    ``loss_of(logp [N] fp32)`` returns the policy loss and its metrics. ``placeholder_logp
    [N]`` fills the rows whose log-probs are not computed yet when a chunk's gradient is taken
    (the old log-probs: finite, ratio 1). A chunk has as many rows as keep its fp32 logits
    within the bytes of ``DEFAULT_CHUNKS.triton_workspace`` 16-bit elements.
    """
    from r1fast.kernels import linear_logprob_gemm as G  # lazy: importing needs triton

    N, H = hidden.shape
    V = weight.shape[0]
    vocab_start = (dist.get_rank(tp_group) if tp_group is not None else 0) * V
    inv_tau = 1.0 / float(temperature)
    with torch.no_grad():
        x, w, y = hidden.detach().contiguous(), weight.detach().contiguous(), targets.contiguous()
        ignored = y == ignore_index  # [N]
        logp = placeholder_logp.detach().float().clone()  # [N], overwritten chunk by chunk
        entropy = torch.zeros(N, device=x.device, dtype=torch.float32)
        dx = torch.empty(N, H, device=x.device, dtype=torch.float32)
        dw = torch.zeros(V, H, device=x.device, dtype=torch.float32) \
            if weight.requires_grad else None
        ct = chunk_rows(N, V)
        stats = torch.empty(4, ct, device=x.device, dtype=torch.float32)
        ws = torch.empty(ct, V, device=x.device, dtype=x.dtype)  # dz / tau of a chunk
        for t0 in range(0, N, ct):
            t1 = min(N, t0 + ct)
            rows, n = slice(t0, t1), t1 - t0
            z = G.mm_fp32(x[rows], w.t())  # [n, V] fp32 logits * tau (GEMM 1)
            G.tile_stats(z, y[rows], inv_tau, vocab_start, stats[:, :n])
            lp, ent, lse = _finish(stats[:, :n], ignored[rows], tp_group)
            logp[rows], entropy[rows] = lp, ent
            g = _loss_grad(loss_of, logp)[rows].masked_fill(ignored[rows], 0.0)
            dz = G.tile_dz(z, y[rows], lse, ent, g, torch.zeros_like(g), inv_tau, vocab_start,
                           ws[:n])
            del z
            dx[rows] = G.mm_fp32(dz, w)  # GEMM 2
            if tp_group is not None:
                dist.all_reduce(dx[rows], group=tp_group)  # every shard's vocabulary
            if dw is not None:
                dw += G.mm_fp32(dz.t(), x[rows])  # GEMM 3
        loss, metrics = loss_of(logp)
        grad_w = None if dw is None else dw.to(weight.dtype)
        grad_x = dx.to(hidden.dtype)
        del dw, dx
    # outside no_grad: the loss joins the autograd graph of hidden and weight here
    return _PrecomputedGrads.apply(loss, hidden, weight, grad_x, grad_w), metrics, entropy


def _loss_grad(loss_of: LossOf, logp: torch.Tensor) -> torch.Tensor:
    """``d loss / d logp`` at ``logp [N]`` by the policy loss's own autograd."""
    with torch.enable_grad():
        lp = logp.detach().clone().requires_grad_()
        loss, _ = loss_of(lp)
        (grad,) = torch.autograd.grad(loss, lp)
    return grad
