"""Hidden states -> GRPO loss in one call, without ever materialising the logits.

The trainer's last step per micro-batch is: LM head, log-prob of each sampled token, policy
loss. Done naively that is a ``[T, V]`` logits tensor (5 GB in bf16 at T=16k, V=152k) plus
autograd's copies of it. This op composes the two fused pieces instead:

1. :func:`r1fast.ops.linear_logprob.linear_logprob` streams the logits in tiles and returns
   ``logp [T]`` (and the entropy), with a backward that recomputes the tiles;
2. :func:`r1fast.ops.policy_loss.policy_loss` turns ``logp`` into the scalar loss and metrics;
   its Triton path saves ``d loss / d logp`` in the forward, so its backward is one multiply.

Autograd chains them: ``d loss / d logp [T]`` (fp32) flows into the log-prob backward, which
produces the gradients of ``hidden`` and ``weight``. The only per-token tensors kept are a few
``[T]`` fp32 vectors. Positions whose mask is 0 get ``ignore_index`` as target, so padding may
hold any token id and costs no gradient.

Skipping masked rows: prompt tokens and padding have mask 0, yet their logits would still be
computed (forward and backward GEMMs are ``T x V x H`` each). ``active_rows`` (the flat indices
where the mask is nonzero, built on the host with the batch, as the GRPO trainer does) makes
the LM head run on those rows only. The op does not find them itself: on an accelerator that
is a ``nonzero`` (a host sync) per call.

Vocabulary parallelism (``tp_group``, Megatron layout): each rank passes its shard of the LM
head; ``linear_logprob`` merges the softmax statistics across the group, so every rank computes
the same ``logp`` and the same loss; ``weight`` receives this rank's shard of the gradient and
``hidden`` the full gradient.
"""
from __future__ import annotations

import torch

from r1fast.ops._dispatch import resolve_impl, value_checks
from r1fast.ops._validate import FLOAT_DTYPES, INDEX_DTYPES, check_tensor
from r1fast.ops.fused_linear_policy_grad import check_grad_in_forward, forward_with_grads
from r1fast.ops.linear_logprob import linear_logprob
from r1fast.ops.policy_loss import PolicyLossConfig, policy_loss

__all__ = ["fused_linear_policy_loss"]

_IGNORE = -100  # target id that linear_logprob skips (logp 0, no gradient)


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    config: PolicyLossConfig = PolicyLossConfig(),
    *,
    cu_seqlens: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    tp_group=None,
    global_normalizer: float | torch.Tensor | None = None,
    max_len: int | None = None,
    return_entropy: bool = False,
    active_rows: torch.Tensor | None = None,
    tiles: str | None = None,
    grad_in_forward: bool = False,
    impl: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO policy loss from the last hidden states and the LM head.

    Args:
        hidden: ``[B, L, H]`` (padded, one sequence per row; ``cu_seqlens`` must be None) or
            ``[T, H]`` (packed; ``cu_seqlens [B+1]`` required).
        weight: ``[V, H]`` LM head (this rank's vocabulary shard under ``tp_group``), same dtype
            as ``hidden``.
        targets: sampled token ids, ``[B, L]`` or ``[T]``; ignored where ``mask`` is 0.
        old_logp, mask, ref_logp, rollout_logp: per token, shaped like ``targets``;
            ``advantages`` ``[B]`` or per token. See :func:`r1fast.ops.policy_loss.policy_loss`.
        config: the loss variant, clipping, KL and aggregation (:class:`PolicyLossConfig`).
        cu_seqlens: ``[B+1]`` offsets of the packed layout.
        temperature: sampling temperature; logits are divided by it. One float, or a tensor
            shaped like ``targets`` (per-sample temperatures, repeated over each sample's
            tokens; no gradient); its value on masked positions does not matter.
        tp_group: vocabulary-parallel process group of the LM head, or None.
        global_normalizer: the aggregation's GLOBAL denominator under data parallelism (see
            ``policy_loss``).
        max_len: L_max of ``agg="seq-mean-token-sum-norm"`` (Dr.GRPO's constant normaliser,
            e.g. the max completion length); default the padded L or the longest packed row.
        return_entropy: also compute the policy entropy; reported as ``metrics["entropy_mean"]``
            (mask-weighted mean over valid tokens; no gradient, it is not part of the loss).
        active_rows: ``[N]`` int64, the increasing flat indices (into ``targets.reshape(-1)``)
            where ``mask`` is nonzero, or None. When given, the LM head runs on these rows only;
            the result is the same. Checked against ``mask`` where value checks run (CPU tensors,
            or ``R1FAST_DEBUG_CHECKS=1``).
        tiles: how the Triton path forms the logits (``linear_logprob``'s ``tiles``):
            ``"fused"`` (Triton GEMM tiles, the default) or ``"gemm"`` (cuBLAS fp32 tiles).
            ``grad_in_forward`` always uses cuBLAS tiles: None or ``"gemm"`` with it.
        grad_in_forward: compute the gradients of hidden and weight in the forward, chunk by
            chunk, instead of recomputing the logits in the backward: 6THV FLOPs instead of
            8THV, for an fp32 ``[V, H]`` accumulator and both gradients kept until the
            backward (``r1fast.ops.fused_linear_policy_grad``). Token-level losses (ppo,
            cispo) and ``impl="triton"`` only; the same loss, metrics and gradients.
        impl: ``"auto"`` | ``"torch"`` | ``"triton"``, used for both the log-prob and the loss.

    Returns:
        ``(loss, metrics)`` as ``policy_loss``; backward gives gradients of ``hidden`` and
        ``weight``.
    """
    if not isinstance(config, PolicyLossConfig):
        raise ValueError(f"config must be a PolicyLossConfig, got {type(config).__name__}")
    check_tensor("hidden", hidden, ndim=(2, 3))
    padded = hidden.dim() == 3
    if padded and cu_seqlens is not None:
        raise ValueError("cu_seqlens must be None when hidden is padded [B, L, H] (one sequence "
                         f"per row), got hidden of shape {list(hidden.shape)}")
    if not padded and cu_seqlens is None:
        raise ValueError("cu_seqlens [B+1] is required when hidden is packed [T, H]; pass hidden "
                         "as [B, L, H] for one sequence per row")
    tok_shape = tuple(hidden.shape[:-1])  # [B, L] or [T]
    check_tensor("targets", targets, dtypes=INDEX_DTYPES, shape=tok_shape, device=hidden.device)
    check_tensor("mask", mask, shape=tok_shape, device=hidden.device)
    # an HF label of -100 means "no loss here" whatever the mask says (a mask taken from the
    # attention mask would otherwise count those tokens with logp 0 in the loss and metrics)
    mask = torch.where(targets == _IGNORE, torch.zeros_like(mask), mask)
    if isinstance(temperature, torch.Tensor):
        check_tensor("temperature", temperature, dtypes=FLOAT_DTYPES, shape=tok_shape,
                     device=hidden.device)
        temperature = temperature.reshape(-1)  # [T]

    flat_targets = torch.where(mask.reshape(-1) != 0, targets.reshape(-1),
                               torch.full_like(targets.reshape(-1), _IGNORE))  # [T]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
    if active_rows is not None:
        _check_active_rows(active_rows, mask)
        flat_hidden = flat_hidden.index_select(0, active_rows)  # [N, H]
        flat_targets = flat_targets.index_select(0, active_rows)
        if isinstance(temperature, torch.Tensor):
            temperature = temperature.index_select(0, active_rows)  # [N]

    def at_positions(rows_value: torch.Tensor) -> torch.Tensor:
        """[N] per active row -> [T] per position, 0 where masked (no gradient there)."""
        if active_rows is None:
            return rows_value
        return rows_value.new_zeros(mask.numel()).index_copy(0, active_rows, rows_value)

    def loss_of(logp_rows: torch.Tensor):
        return policy_loss(
            at_positions(logp_rows).reshape(tok_shape), old_logp, advantages, mask, config,
            ref_logp=ref_logp, global_normalizer=global_normalizer, rollout_logp=rollout_logp,
            cu_seqlens=cu_seqlens, max_len=max_len, impl=impl)

    if grad_in_forward:
        if tiles not in (None, "gemm"):
            raise ValueError(f"tiles={tiles!r} with grad_in_forward=True: the in-forward "
                             "gradient forms its logits with cuBLAS tiles; pass tiles=None or "
                             "'gemm'")
        check_grad_in_forward(config, resolve_impl("linear_logprob", impl, hidden.device,
                                                   supported=("torch", "triton")))
        old_rows = old_logp.reshape(-1)
        old_rows = old_rows if active_rows is None else old_rows.index_select(0, active_rows)
        loss, metrics, entropy = forward_with_grads(
            flat_hidden, weight, flat_targets, old_rows, loss_of, temperature=temperature,
            ignore_index=_IGNORE, tp_group=tp_group)
        entropy = at_positions(entropy) if return_entropy else None
    else:
        out = linear_logprob(flat_hidden, weight, flat_targets, temperature, return_entropy,
                             _IGNORE, tp_group=tp_group, impl=impl, tiles=tiles or "fused")
        logp, entropy = out if return_entropy else (out, None)  # [N] fp32
        loss, metrics = loss_of(logp)
        entropy = None if entropy is None else at_positions(entropy)
    if entropy is not None:
        with torch.no_grad():
            m = mask.reshape(-1).to(entropy.dtype)
            n = m.sum()
            metrics["entropy_mean"] = torch.where(
                n > 0, (m * entropy).sum() / torch.where(n > 0, n, torch.ones_like(n)),
                torch.zeros_like(n)).to(torch.float32)
    return loss, metrics


def _check_active_rows(active_rows: torch.Tensor, mask: torch.Tensor) -> None:
    """Shape, dtype and device always; the values (exactly the nonzero positions of ``mask``,
    increasing) where value checks run, since reading them waits for the device."""
    check_tensor("active_rows", active_rows, ndim=1, dtypes=INDEX_DTYPES, device=mask.device)
    if not value_checks(mask.device):
        return
    want = mask.reshape(-1).nonzero().squeeze(1)
    if not torch.equal(active_rows.long(), want):
        raise ValueError(f"active_rows must be the {want.numel()} increasing flat indices where "
                         f"mask is nonzero, got {active_rows.numel()} indices that differ")
