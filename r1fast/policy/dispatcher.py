"""The MoE layer's permutation and combine through r1fast's kernels: no host sync to permute,
no float atomics forward or backward, no identity copies on one rank.

megatron's alltoall dispatcher, without Transformer Engine's fused permutation (which a GPU
image without TE lacks), moves tokens with plain PyTorch ops, and three of them cost on a GPU:

- the permutation finds each expert's tokens with ``masked_select``, whose output size the
  host must read: a wait for the GPU in every MoE layer, forward and backward, besides the
  one megatron plans for the expert counts;
- its gradient (``index_select``'s backward, ``index_add_``) and the final un-permutation
  (``scatter_add_``) sum a token's k rows with float atomics, in whatever order the threads
  arrive. Two forwards of the same batch then differ in their last bits, so the old
  log-probs (a no-grad forward) and the update's first forward disagree and the on-policy
  ratio is not 1 (NeMo-RL #2255 / #2258, fixed there by TE's fused permutation); megatron
  switches to deterministic ops only under ``torch.use_deterministic_algorithms(True)``,
  which changes every other op too;
- on one rank (no expert or expert-tensor parallelism) it still "sorts the chunks by local
  expert", an identity order, by splitting the tokens per expert and concatenating them
  again: a copy of the [T*k, H] rows each way, and two Python calls per expert.

:class:`FixedOrderDispatcher` keeps megatron's dispatcher (metadata, all-to-alls, the sort by
local expert across ranks, shared-expert overlap, its one planned device-to-host copy of the
counts) and replaces those steps: each token's experts and their rows in megatron's
expert-major, token-minor order are read off the routing map with a running count
(:func:`routing_rows`, no sync; the same order, so the all-to-all splits and counts still
hold), :func:`r1fast.ops.moe_permute_rows` copies the rows (its gradient sums a token's k rows
in a fixed order) and
:func:`r1fast.ops.moe_unpermute` sums the expert outputs back per token in fp32 in slot order.
On a GPU these run in the Triton or CUDA kernels, on a CPU in the torch reference. Layers
megatron configures another way (capacity factor with dropping or padding, routing maps padded
for quantisation, TE's fused permutation) keep megatron's path, since a token then has another
number of rows than k. :func:`use_fixed_order_dispatch` gives it to a built model's MoE layers
(r1fast.policy.model.build_policy calls it).
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from r1fast.ops._dispatch import debug_checks

__all__ = ["FixedOrderDispatcher", "routing_rows", "use_fixed_order_dispatch"]


def routing_rows(routing_map: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, row_map)``, both ``[T, k]`` int64, of a ``routing_map [T, E]`` with exactly
    ``k`` chosen experts per token: each token's expert ids ascending, and the row each
    (token, expert) takes in megatron's permuted order (expert-major, tokens ascending within
    an expert). No host sync (``nonzero``/``masked_select`` would read the count): a chosen
    entry's row is the running count of chosen entries in expert-major order, and a top-k of
    the smallest rows per token picks them out. Under ``R1FAST_DEBUG_CHECKS=1`` the per-token
    counts are checked (a host sync)."""
    T, E = routing_map.shape
    if debug_checks() and T and not bool((routing_map.sum(1) == topk).all()):
        raise ValueError(f"routing_map must choose exactly topk={topk} experts per token, got "
                         f"counts {sorted(set(routing_map.sum(1).tolist()))}")
    row = routing_map.t().reshape(-1).cumsum(0).view(E, T).t()  # [T, E] chosen: row + 1
    key = torch.where(routing_map, row, T * E + 1)  # unchosen after every chosen one
    rows_plus_one, indices = key.topk(topk, dim=1, largest=False, sorted=True)  # [T, k] each
    return indices, rows_plus_one - 1


class FixedOrderDispatcher(MoEAlltoAllTokenDispatcher):
    """megatron's alltoall dispatcher permuting and combining through r1fast's kernels (module
    doc). ``reversed_local_input_permutation_mapping`` holds r1fast's ``row_map [T, k]`` (the
    permuted row of each token's slots) instead of megatron's token of each row, under megatron's
    name so that its CUDA-graph capture of the preprocessing still carries it."""

    device_counts: bool = False
    """Hand the experts the per-local-expert counts as a device tensor, for experts that read
    them there (``r1fast.policy.local_experts.grouped_experts``); on one rank they then never
    go to the host (no copy, no wait; across ranks megatron still reads its all-to-all
    splits)."""

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor,
                            probs: torch.Tensor):
        """megatron's preprocessing (metadata, its planned count copy) with the permutation
        done by :func:`r1fast.ops.moe_permute_rows`: [S, B, H] tokens -> ([T*k, H] rows, [T*k] probs),
        rows of expert e contiguous, experts ascending, tokens ascending within one."""
        from r1fast.ops.moe_permute import moe_permute_rows

        self.hidden_shape = hidden_states.shape
        self.probs, self.routing_map = probs, routing_map
        hidden_states = hidden_states.view(-1, self.hidden_shape[-1])  # [T, H]
        self.tokens_per_expert = self.preprocess(routing_map)
        self._counts_on_device = self.tokens_per_expert  # [E_local], before any host copy
        if self.shared_experts is not None:
            self.shared_experts.pre_forward_comm(hidden_states.view(self.hidden_shape))
        self.tokens_per_expert = self._maybe_dtoh_and_synchronize(
            "before_permutation_1", self.tokens_per_expert)
        self.hidden_shape_before_permute = hidden_states.shape
        T, k = routing_map.shape[0], self.config.moe_router_topk
        indices, row_map = routing_rows(routing_map, k)  # [T, k] each
        self.reversed_local_input_permutation_mapping = row_map
        permuted = moe_permute_rows(hidden_states, row_map)  # [T*k, H]
        # each row's routing weight: gathered per slot (its gradient adds into distinct [T, E]
        # entries: no collisions, so atomics there are exact), then placed at the slot's row
        weights = probs.gather(1, indices)  # [T, k]
        permuted_probs = weights.new_empty(T * k).scatter(0, row_map.reshape(-1),
                                                          weights.reshape(-1))  # [T*k]
        return permuted, permuted_probs

    def dispatch_postprocess(self, global_input_tokens: torch.Tensor,
                             global_probs: torch.Tensor):
        """On one rank the rows already are in local-expert order: megatron's sort by local
        expert would copy them unchanged, so only its sync points run. Across ranks, megatron's
        step, handing on the device counts when asked (``device_counts``)."""
        if not self._one_rank():
            tokens, counts, probs = super().dispatch_postprocess(global_input_tokens, global_probs)
            return tokens, self._counts_on_device if self.device_counts else counts, probs
        if self.shared_experts is not None:
            self.shared_experts.linear_fc1_forward_and_act(global_input_tokens)
        for point in ("before_permutation_2", "before_finish"):
            self.tokens_per_expert = self._maybe_dtoh_and_synchronize(point,
                                                                      self.tokens_per_expert)
        tokens_per_expert, self.tokens_per_expert = self.tokens_per_expert, None
        return global_input_tokens, tokens_per_expert, global_probs

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """On one rank the expert outputs already are in permuted order (module doc)."""
        return hidden_states if self._one_rank() else super().combine_preprocess(hidden_states)

    def combine_postprocess(self, permutated_local_input_tokens: torch.Tensor) -> torch.Tensor:
        """[T*k, H] expert outputs (already scaled by the routing weights) -> [S, B, H]."""
        from r1fast.ops.moe_permute import moe_unpermute

        if self.shared_experts is not None:  # as megatron: the overlapped shared expert's end
            self.shared_experts.linear_fc2_forward(permutated_local_input_tokens)
            self.shared_experts.post_forward_comm()
        rows = permutated_local_input_tokens
        row_map = self.reversed_local_input_permutation_mapping  # [T, k]
        if rows.shape[0] != row_map.numel():
            raise ValueError(f"FixedOrderDispatcher: {rows.shape[0]} expert output rows for "
                             f"{row_map.shape[0]} tokens x top-{row_map.shape[1]}; every token "
                             "must have k rows")
        ones = torch.ones(row_map.shape, dtype=torch.float32, device=rows.device)
        output = moe_unpermute(rows, row_map, ones).view(self.hidden_shape)  # [S, B, H]
        if self.shared_experts is not None:
            output = output + self.shared_experts.get_output()
        return output

    def _maybe_dtoh_and_synchronize(self, point: str,
                                    tokens_per_expert: Optional[torch.Tensor] = None):
        """megatron's planned copy of the counts to the host and its wait, skipped when the
        experts read the counts on the device and no all-to-all needs them on the host."""
        if self.device_counts and self._one_rank():
            return tokens_per_expert
        return super()._maybe_dtoh_and_synchronize(point, tokens_per_expert)

    def _one_rank(self) -> bool:
        """No expert or expert-tensor parallelism: megatron's chunk sort is the identity."""
        return self.ep_size == 1 and self.tp_size == 1


def use_fixed_order_dispatch(model: torch.nn.Module) -> int:
    """Give every MoE layer of ``model`` built with megatron's alltoall dispatcher, in a layout
    with k rows per token, :class:`FixedOrderDispatcher`; returns how many. The dispatcher keeps
    its object and state (process groups, shared-expert overlap): the subclass needs no
    initialisation (methods, a class-level ``device_counts`` default, and attributes each
    forward sets), so the object takes the subclass. (Replacing megatron's ``MoELayer`` in the
    layer spec instead would lose the process groups megatron passes only to its own class.)"""
    count = 0
    for module in model.modules():
        if isinstance(module, MoELayer) and _k_rows_per_token(module.token_dispatcher):
            module.token_dispatcher.__class__ = FixedOrderDispatcher
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
