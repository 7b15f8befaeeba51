"""The routed experts of the local (non-TE) MoE layer with less per-call overhead.

megatron's ``SequentialMLP`` runs each local expert as a full megatron ``MLP``: a
``ColumnParallelLinear`` and a ``RowParallelLinear`` (each a custom autograd function with its
tensor-parallel bookkeeping), the activation dispatch, per-token scaling. On CPU-sized models
that bookkeeping, not the matmuls, is most of the time (measured: ~0.4 ms per expert call on
the tiny recipe, x 8 experts x 2 layers per micro-batch), and packed micro-batches, being
smaller and more numerous than padded ones, pay it more often.

:class:`LeanSequentialMLP` is ``SequentialMLP`` (same parameters, names, checkpoints, sharded
state dict) whose forward, when the experts are not tensor-parallel (``etp == 1``) and the
layer is the plain bf16/fp32 gated-SiLU kind r1fast builds, computes per expert

    y = ((silu(x W1a^T) * (x W1b^T + offset)) * p) W2^T,     W1 = [W1a; W1b],

with ``torch.nn.functional.linear`` on the experts' own weights: the same math as megatron's
``MLP`` (whose linears reduce to ``x W^T`` without expert TP). Anything else (expert TP, fp8,
biases, other activations, probabilities on the input, clamped GLU) runs megatron's forward.
Gradients reach the weights through autograd as before (megatron DDP hooks ``param.grad``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP


class LeanSequentialMLP(SequentialMLP):
    """``SequentialMLP`` with a direct forward for non-TP gated-SiLU experts (module doc)."""

    def _lean(self) -> bool:
        c = self.config
        recompute_act = c.recompute_granularity == "selective" and "moe_act" in (
            c.recompute_modules or ())  # megatron's MLP recomputes the activation: keep it
        return (self.tp_group is None or self.tp_group.size() == 1) and not (
            c.fp8 or c.fp4 or c.add_bias_linear or c.moe_apply_probs_on_input or recompute_act
            or getattr(c, "activation_func_clamp_value", None) is not None
            or getattr(c, "use_te_activation_func", False)
        ) and c.gated_linear_unit and c.activation_func is F.silu

    def forward(self, permuted_local_hidden_states: torch.Tensor,
                tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor):
        """[n, H] tokens sorted by local expert, ``tokens_per_expert`` [E_local], probs [n]
        -> ([n, H] outputs, None)."""
        if not self._lean():
            return super().forward(permuted_local_hidden_states, tokens_per_expert,
                                   permuted_probs)
        x, probs = permuted_local_hidden_states, permuted_probs
        counts = tokens_per_expert.tolist()
        outs = []
        for expert, xs, ps in zip(self.local_experts, torch.split(x, counts),
                                  torch.split(probs, counts)):
            gate, up = F.linear(xs, expert.linear_fc1.weight).chunk(2, dim=-1)  # [n_e, F] each
            # megatron's GLU term to the letter, offset included: the same tensors are saved
            # for the backward, so r1fast.plan's activation model (fit to MLP) still holds
            h = F.silu(gate) * (up + self.config.glu_linear_offset)
            h = (h * ps.unsqueeze(-1)).to(xs.dtype)  # as MLP: scale by the probs, then cast
            outs.append(F.linear(h, expert.linear_fc2.weight))  # [n_e, H]
        return (outs[0] if len(outs) == 1 else torch.cat(outs)), None


def use_r1fast_moe(spec) -> None:
    """In every MoE layer of ``spec`` (a block spec): :class:`~r1fast.policy.router.R1fastRouter`
    as the router, and :class:`LeanSequentialMLP` for megatron's ``SequentialMLP`` experts
    (grouped-GEMM experts, TE's, are kept)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from r1fast.policy.router import R1fastRouter

    for layer in spec.layer_specs:
        mlp = layer.submodules.mlp
        if mlp.module is not MoELayer:
            continue
        mlp.submodules.router = R1fastRouter
        if getattr(mlp.submodules.experts, "module", None) is SequentialMLP:
            mlp.submodules.experts.module = LeanSequentialMLP
