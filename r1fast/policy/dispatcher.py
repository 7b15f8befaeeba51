"""The MoE layer's last step without float atomics: expert outputs summed back per token in a
fixed order.

megatron's alltoall dispatcher ends a MoE layer by un-permuting the expert outputs (already
scaled by their routing weights) back to token order. Without Transformer Engine's fused
permutation, which a GPU image without TE lacks, it does that with ``scatter_add_``: on a GPU,
float atomics, so the k outputs of a token add up in whatever order the threads arrive and two
forwards of the same batch differ in their last bits. For RL that matters: the old log-probs
(a no-grad forward) and the update's first forward disagree, and the on-policy ratio is not 1
(NeMo-RL #2255 / #2258, fixed there by TE's fused permutation). megatron switches to a
deterministic ``index_add_`` only under ``torch.use_deterministic_algorithms(True)``, which
changes every other op too.

:class:`DeterministicCombineDispatcher` keeps megatron's dispatcher (metadata, all-to-alls,
the sort by local expert, shared-expert overlap) and replaces that one scatter by
:func:`r1fast.ops.moe_unpermute`: each token's k rows are found by a stable sort of the
permutation (``row_map [T, k]``, no host sync) and summed in fp32 in slot order, with no
atomics (Triton or CUDA kernel on a GPU, the torch reference on a CPU). Layers megatron
configures another way (capacity factor with dropping or padding, routing maps padded for
quantisation, TE's fused permutation) keep megatron's path, since a token then has another
number of rows than k. :func:`use_fixed_order_combine` gives it to a built model's MoE layers
(r1fast.policy.model.build_policy calls it).
"""
from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

__all__ = ["DeterministicCombineDispatcher", "combine_row_map", "use_fixed_order_combine"]


def combine_row_map(sorted_indices: torch.Tensor, num_tokens: int, topk: int) -> torch.Tensor:
    """``row_map [T, k]``: the permuted rows of each token, in increasing row order, from
    megatron's ``sorted_indices [T*k]`` (the token of each permuted row). A stable sort keeps
    the order fixed for equal tokens; nothing is read on the host."""
    order = torch.argsort(sorted_indices, stable=True)  # [T*k] rows grouped by token
    return order.view(num_tokens, topk)


class DeterministicCombineDispatcher(MoEAlltoAllTokenDispatcher):
    """megatron's alltoall dispatcher with a fixed-order, atomics-free un-permutation (module
    doc)."""

    def combine_postprocess(self, permutated_local_input_tokens: torch.Tensor) -> torch.Tensor:
        from r1fast.ops.moe_permute import moe_unpermute

        if self.shared_experts is not None:  # as megatron: the overlapped shared expert's end
            self.shared_experts.linear_fc2_forward(permutated_local_input_tokens)
            self.shared_experts.post_forward_comm()
        rows = permutated_local_input_tokens  # [T*k, H], already scaled by the routing weights
        num_tokens, k = self.hidden_shape_before_permute[0], self.config.moe_router_topk
        if rows.shape[0] != num_tokens * k:
            raise ValueError(f"DeterministicCombineDispatcher: {rows.shape[0]} permuted rows for "
                             f"{num_tokens} tokens x top-{k}; every token must have k rows")
        row_map = combine_row_map(self.reversed_local_input_permutation_mapping, num_tokens, k)
        ones = torch.ones(row_map.shape, dtype=torch.float32, device=rows.device)
        output = moe_unpermute(rows, row_map, ones).view(self.hidden_shape)  # [S, B, H]
        if self.shared_experts is not None:
            output = output + self.shared_experts.get_output()
        return output


def use_fixed_order_combine(model: torch.nn.Module) -> int:
    """Give every MoE layer of ``model`` built with megatron's alltoall dispatcher, in a layout
    with k rows per token, the fixed-order combine; returns how many. The dispatcher keeps its
    object and state (process groups, shared-expert overlap):
    :class:`DeterministicCombineDispatcher` adds no state, only the one method, so the object
    takes the subclass. (Replacing megatron's ``MoELayer`` in the layer spec instead would lose
    the process groups megatron passes only to its own class.)"""
    count = 0
    for module in model.modules():
        if isinstance(module, MoELayer) and _k_rows_per_token(module.token_dispatcher):
            module.token_dispatcher.__class__ = DeterministicCombineDispatcher
            count += 1
    return count


def _k_rows_per_token(dispatcher) -> bool:
    """megatron's plain alltoall dispatcher in a layout where every token has exactly k
    permuted rows: no capacity dropping or padding, no routing map padded for quantisation,
    no TE fused permutation (module doc)."""
    c = dispatcher.config
    return type(dispatcher) is MoEAlltoAllTokenDispatcher and not (
        c.moe_permute_fusion or dispatcher.drop_and_pad or c.moe_expert_capacity_factor is not None
        or c.moe_router_padding_for_quantization)
