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

The grouped kernels: the same experts as two grouped launches forward and four backward,
:func:`r1fast.ops.moe_experts.moe_grouped_swiglu`, reading the per-expert row counts on the
device. On one rank (no EP, no expert TP) the dispatcher then leaves the counts there
(:class:`r1fast.policy.dispatcher.FixedOrderDispatcher`'s ``device_counts``), so the MoE layers
neither wait for the GPU nor launch per expert. The trainer chooses them for its forwards and
backwards with ``parallel.experts`` (:func:`use_grouped_experts`, at build time), the rollout
decoder with ``rollout.experts`` (:func:`grouped_experts`, while it decodes). Both default to
"auto": grouped on a GPU with Triton, the loop on a CPU. The two differ at the rounding of 16-bit
runs (r1fast.ops.moe_experts), so old and new log-probs share their arithmetic only when the
trainer's forwards all run one of them, which a built policy does.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from r1fast.policy.config_checks import EXPERT_MODES

log = logging.getLogger("r1fast.policy")


def check_expert_mode(mode: str) -> str:
    """``mode`` when it is one of :data:`EXPERT_MODES`, else the error naming them."""
    if mode not in EXPERT_MODES:
        raise ValueError(f"experts must be one of {EXPERT_MODES}, got {mode!r}")
    return mode


class LeanSequentialMLP(SequentialMLP):
    """``SequentialMLP`` with a direct forward for non-TP gated-SiLU experts (module doc)."""

    grouped_impl: Optional[str] = None
    """The impl of the grouped kernels while :func:`grouped_experts` is active, else None."""

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
        if self.grouped_impl is not None:
            return self._grouped_forward(x, tokens_per_expert, probs), None
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

    def _grouped_forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor,
                         probs: torch.Tensor) -> torch.Tensor:
        """[n, H] rows sorted by local expert -> [n, H] through the grouped kernels."""
        from r1fast.ops.moe_experts import ExpertTable, moe_grouped_swiglu

        table = getattr(self, "_r1fast_table", None)
        if table is None:  # the addresses are re-read (and the table rebuilt) at every call
            table = self._r1fast_table = ExpertTable(
                [e.linear_fc1.weight for e in self.local_experts],
                [e.linear_fc2.weight for e in self.local_experts])
        return moe_grouped_swiglu(x, tokens_per_expert, table, probs.float(),
                                  glu_offset=self.config.glu_linear_offset,
                                  impl=self.grouped_impl)


def _moe_layers(model: torch.nn.Module) -> tuple[list, list]:
    """(every MoE layer of ``model``, those whose experts are r1fast's lean ones)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    moe = [m for m in model.modules() if isinstance(m, MoELayer)]
    return moe, [m for m in moe if isinstance(m.experts, LeanSequentialMLP)
                 and m.experts._lean()]


def _resolve(model: torch.nn.Module, moe: list, lean: list, mode: str,
             key: str) -> Optional[str]:
    """The grouped kernels' impl ``mode`` gives ``model`` (its ``moe`` layers, the ``lean``
    ones among them): "triton", or None for the loop. "grouped" is an error naming what is
    missing, "auto" on a GPU warns when it keeps megatron's per-expert loop (not when the
    experts are Transformer Engine's grouped GEMM)."""
    from r1fast.ops._dispatch import ImplUnavailableError, triton_missing

    check_expert_mode(mode)
    device = next(model.parameters()).device
    if mode == "sequential" or (mode == "auto" and (device.type != "cuda" or not moe)):
        return None
    why = triton_missing(device) or (None if lean else "no MoE layer has r1fast's lean "
                                     "experts (expert TP, fp8, biases or another activation)")
    if why is None:
        return "triton"
    if mode == "grouped":
        raise ImplUnavailableError(f"{key}='grouped' is unavailable: {why}")
    if any(isinstance(m.experts, SequentialMLP) for m in moe):
        log.warning("%s='auto' runs the experts through megatron's per-expert loop on this "
                    "GPU (a launch per expert, a wait per MoE layer): %s", key, why)
    return None


def _switch(layers: list, impls: list) -> None:
    """Each layer's experts to its impl (None: the loop) and its dispatcher's counts to where
    the experts read them (the device for the grouped kernels)."""
    from r1fast.policy.dispatcher import FixedOrderDispatcher

    for layer, impl in zip(layers, impls):
        layer.experts.grouped_impl = impl
        if isinstance(layer.token_dispatcher, FixedOrderDispatcher):
            layer.token_dispatcher.device_counts = impl is not None


def use_grouped_experts(model: torch.nn.Module, mode: str = "auto",
                        key: str = "parallel.experts") -> Optional[str]:
    """From now on, the lean experts of ``model`` compute (forward and backward) through the
    grouped kernels, or through the loop; returns the impl used ("triton") or None. ``mode``
    as :func:`grouped_experts`; ``key`` names the setting in errors and warnings."""
    moe, layers = _moe_layers(model)
    impl = _resolve(model, moe, layers, mode, key)
    _switch(layers, [impl] * len(layers))
    if impl is not None:
        log.info("%s: %d MoE layers compute through the grouped expert kernels", key,
                 len(layers))
    return impl


@contextlib.contextmanager
def grouped_experts(model: torch.nn.Module, mode: str = "auto",
                    key: str = "rollout.experts") -> Iterator[Optional[str]]:
    """While active, the lean experts of ``model`` compute through the grouped kernels (module
    doc), or through the loop; yields the impl used, or None for the loop; leaving restores
    what was set before (the trainer's :func:`use_grouped_experts`). ``mode``: "grouped" (an
    error names what is missing: Triton on this device, or a layer that can use it),
    "sequential" (the loop), "auto" (grouped on a GPU with Triton, the loop elsewhere)."""
    moe, layers = _moe_layers(model)
    impl = _resolve(model, moe, layers, mode, key)
    before = [layer.experts.grouped_impl for layer in layers]
    _switch(layers, [impl] * len(layers))
    try:
        yield impl
    finally:
        _switch(layers, before)


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
