"""Public ops of r1fast: each has a pure-PyTorch reference (fp32 accumulation, any device) and,
where written, Triton and CUDA fast paths chosen with ``impl="auto"|"torch"|"triton"|"cuda"``.

- :func:`linear_logprob`: log-prob (and entropy) of target tokens from hidden states and the
  output weight, never materialising ``[tokens, vocab]`` logits; vocab-parallel with ``tp_group``.
- :func:`group_advantages`: GRPO / Dr.GRPO / RLOO advantages per group of completions.
- :func:`policy_loss`: clipped surrogate (ppo / gspo / cispo) + KL estimators + aggregation.
- :func:`fused_linear_policy_loss`: hidden states -> GRPO loss in one call (the trainer's path).
- :func:`moe_route`: MoE routing; :func:`moe_aux_scores` (the scores and counts the
  load-balancing losses take), :func:`moe_aux_loss` (batch-wise), :func:`moe_seq_aux_loss`
  (DeepSeek-V3's sequence-wise) balance losses and :func:`moe_z_loss`, the router's losses.
- :func:`moe_permute`, :func:`moe_unpermute`: expert-contiguous token order and its inverse
  (:func:`moe_permute_rows` when the caller already holds the row map).
- :func:`moe_grouped_swiglu`: every routed expert's SwiGLU MLP in two grouped launches, with
  the row counts read on the device (forward only: decoding).

Importing this package needs neither Triton nor a GPU.
"""
from r1fast.ops._dispatch import ImplUnavailableError
from r1fast.ops.advantages import group_advantages
from r1fast.ops.fused_linear_policy_loss import fused_linear_policy_loss
from r1fast.ops.linear_logprob import linear_logprob
from r1fast.ops.moe_experts import ExpertTable, moe_grouped_swiglu
from r1fast.ops.moe_permute import moe_permute, moe_permute_rows, moe_unpermute
from r1fast.ops.moe_losses import moe_aux_loss, moe_seq_aux_loss, moe_z_loss
from r1fast.ops.moe_route import MoERouting, moe_aux_scores, moe_route
from r1fast.ops.policy_loss import PolicyLossConfig, loss_denominator, policy_loss

__all__ = [
    "ImplUnavailableError",
    "linear_logprob",
    "group_advantages",
    "policy_loss",
    "PolicyLossConfig",
    "loss_denominator",
    "fused_linear_policy_loss",
    "moe_route",
    "MoERouting",
    "moe_aux_scores",
    "moe_aux_loss",
    "moe_seq_aux_loss",
    "moe_z_loss",
    "moe_permute",
    "moe_permute_rows",
    "moe_unpermute",
    "moe_grouped_swiglu",
    "ExpertTable",
]
