"""The GRPO trainer's last step, the LM head and the policy loss: which way it runs.

With ``algo.use_fused_kernels`` (the default) the trainer calls
:func:`r1fast.ops.fused_linear_policy_loss`, arranged as ``algo.logprob_head`` says ("fused"
Triton tiles, "gemm" cuBLAS tiles, or "grad-in-forward") on ``algo.kernel_impl``;
:func:`check_kernel_choice` refuses, before any model is built, a choice this machine cannot
run. Without it, :func:`unfused_policy_loss` is the plain baseline: full ``[T, V]`` logits
and the torch loss, the same objective (a test holds the two to 1e-5), which the step
benchmark measures the kernels against.
"""
from __future__ import annotations

import torch

from r1fast import ops

__all__ = ["check_kernel_choice", "unfused_policy_loss"]


def check_kernel_choice(algo) -> None:
    """``algo.kernel_impl`` can run on this machine's device, and ``algo.logprob_head`` other
    than "fused" gets the Triton path it needs: checked before the model is built."""
    from r1fast.ops._dispatch import ImplUnavailableError, resolve_impl

    if not algo.use_fused_kernels:
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = resolve_impl("linear_logprob", algo.kernel_impl, device,
                              supported=("torch", "triton"))
    except ImplUnavailableError as e:
        raise ValueError(f"algo.kernel_impl={algo.kernel_impl!r} cannot run here: {e}") from None
    if algo.logprob_head != "fused" and chosen != "triton":
        raise ValueError(f"algo.logprob_head={algo.logprob_head!r} runs on Triton, but "
                         f"algo.kernel_impl={algo.kernel_impl!r} resolves to {chosen!r} on "
                         f"{device.type}: use logprob_head=\"fused\", or kernel_impl=\"triton\" "
                         "(a GPU, or TRITON_INTERPRET=1 on a CPU)")


def unfused_policy_loss(hidden, weight, targets, old, adv, mask, ref, cfg, *, temperature,
                        global_normalizer, rollout_logp, return_entropy, cu_seqlens, **_):
    """The same loss through full logits (the baseline ``use_fused_kernels=false`` measures);
    the arguments of :func:`r1fast.ops.fused_linear_policy_loss`."""
    from megatron.core.tensor_parallel import (copy_to_tensor_model_parallel_region,
                                               gather_from_tensor_model_parallel_region)

    # the policy's head contract: every TP rank returns the FULL input gradient (the copy's
    # backward all-reduces the vocab shards' partial gradients), as linear_logprob does
    hidden = copy_to_tensor_model_parallel_region(hidden.float())
    logits = gather_from_tensor_model_parallel_region(hidden @ weight.float().t())
    logp_all = torch.log_softmax(logits / temperature, -1)  # [b, L, V] or [T, V]
    logp = logp_all.gather(-1, targets[..., None])[..., 0]
    loss, metrics = ops.policy_loss(
        logp, old, adv, mask, cfg, ref_logp=ref, global_normalizer=global_normalizer,
        rollout_logp=rollout_logp, cu_seqlens=cu_seqlens,
        max_len=None if cu_seqlens is not None else targets.shape[1], impl="torch")
    if return_entropy:
        ent = -(logp_all.exp() * logp_all).sum(-1)
        metrics["entropy_mean"] = (ent.detach() * mask).sum() / mask.sum().clamp_min(1)
    return loss, metrics
