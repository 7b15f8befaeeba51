"""The MoE router of the policy: megatron's ``TopKRouter`` with its routing math replaced by
:func:`r1fast.ops.moe_route.moe_route` (one fused kernel each way on a GPU; the fp32 torch
reference on a CPU) and its auxiliary losses by :mod:`r1fast.ops.moe_losses`: megatron's
``aux_loss`` (batch-wise) or ``seq_aux_loss`` (DeepSeek-V3's sequence-wise, a row of the
micro-batch as the sequence), and the z-loss.

What stays megatron's: the gate weight and its initialisation, the ``expert_bias`` and
``local_tokens_per_expert`` buffers (so megatron's ``finalize_model_grads`` performs the
aux-loss-free bias update after each step), the way auxiliary losses ride the backward pass
(``MoEAuxLossAutoScaler``: the loss value is attached to a tensor of the forward and its
gradient, scaled like the main loss, is injected in the backward) and the aux-loss tracker for
logging. What the router returns is megatron's dispatcher format: ``probs`` [T, E] holding the
k routing weights of each token at its experts' columns, and a boolean ``routing_map`` [T, E].

Distributed semantics are megatron's: with sequence parallelism each TP rank routes its slice
of the tokens; the load-balancing loss uses expert counts and the token total summed over the
TP(xCP) group, and the z-loss coefficient is divided by that group's size, so that the
contributions of the ranks add up to the one-rank loss.

Router replay (rollout/training agreement): every router has ``layer_index`` (0-based over the
whole model) and consults its ``routing_hook`` (set for all routers of a policy by
``Policy.set_routing_hook``); a hook can hand back indices to replay (weights are recomputed
from the current logits, so gradients flow) and receives the chosen indices to record.
:class:`r1fast.policy.router_replay.RouterReplay` is such a hook. The token order a router sees
is megatron's: sequence-major ``t = s * b + j`` over this rank's (sequence-parallel) slice;
``Policy`` converts from and to the natural [B, L, k] layout.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    get_moe_layer_wise_logging_tracker,
    save_to_aux_losses_tracker,
)
from megatron.core.transformer.moe.router import TopKRouter

from r1fast.policy.transfer import to_device_async


class RoutingHook(Protocol):
    """What a router asks of the replay machinery, once per MoE layer per forward."""

    def replay_indices(self, layer_index: int, num_tokens: int,
                       device: torch.device) -> Optional[torch.Tensor]:
        """The [num_tokens, k] int64 expert indices to use for this layer, or None to route."""

    def record(self, layer_index: int, indices: torch.Tensor) -> None:
        """Receive the [num_tokens, k] indices this layer used."""


@dataclass(frozen=True)
class TokenLayout:
    """How the tokens of a [b, L] microbatch reach a router of this rank: L padded to a
    multiple of tp under sequence parallelism, sequence-major (megatron's [S, B] flattened),
    and this TP rank's slice of the sequence under sequence parallelism."""

    tp: int
    """Tensor parallel size."""
    tp_rank: int
    """This rank's place in its TP group."""
    sequence_parallel: bool
    """Whether the sequence is split over the TP ranks."""
    tp_group: Any = None
    """The TP process group (for from_router_order under sequence parallelism)."""

    def padded_len(self, length: int) -> int:
        m = self.tp if self.sequence_parallel else 1
        return -(-length // m) * m

    def padding_mask(self, b: int, length: int, device: torch.device,
                     real: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """megatron's ``padding_mask`` for a [b, L] microbatch: [b, L'] bool, True at the pads
        the routers must not count (this rank's slice under sequence parallelism): the
        sequence-parallel tail past ``length`` and, given ``real`` [b] (real tokens per row),
        each row's positions from ``real[row]`` on (right padding, a packed row's tail). None
        when nothing is padded (for a host ``real`` decided on the host, where it is free)."""
        if real is not None and real.device.type == "cpu" and bool((real >= length).all()):
            real = None  # every row is full
        lp = self.padded_len(length)
        if real is None:
            if lp == length:
                return None
            real = torch.full((b,), length, device=device)
        real = to_device_async(real.to(torch.int64), device)  # no wait for the GPU
        mask = torch.arange(lp, device=device)[None, :] >= real[:, None]  # [b, L']
        if self.sequence_parallel:
            n = lp // self.tp
            mask = mask[:, self.tp_rank * n:(self.tp_rank + 1) * n]
        return mask

    def to_router_order(self, indices: torch.Tensor) -> torch.Tensor:
        """[b, L, k] expert indices (batch-first, real positions) -> the [T, k] rows a router
        sees (pad rows get experts 0..k-1)."""
        b, length, k = indices.shape
        lp = self.padded_len(length)
        if lp > length:
            pad = torch.arange(k, device=indices.device).expand(b, lp - length, k)
            indices = torch.cat([indices, pad.to(indices.dtype)], dim=1)
        rows = indices.transpose(0, 1)  # [Lp, b, k]
        if self.sequence_parallel:
            n = lp // self.tp
            rows = rows[self.tp_rank * n:(self.tp_rank + 1) * n]
        return rows.reshape(-1, k).contiguous()

    def from_router_order(self, rows: torch.Tensor, b: int, length: int) -> torch.Tensor:
        """Inverse of :meth:`to_router_order` ([T, k] -> [b, L, k]); all-gathers the TP slices
        under sequence parallelism (collective over the TP group)."""
        k = rows.shape[-1]
        rows = rows.reshape(-1, b, k)  # [L', b, k]
        if self.sequence_parallel:
            parts = [torch.empty_like(rows) for _ in range(self.tp)]
            torch.distributed.all_gather(parts, rows.contiguous(), group=self.tp_group)
            rows = torch.cat(parts, dim=0)
        return rows[:length].transpose(0, 1).contiguous()


class R1fastRouter(TopKRouter):
    """TopKRouter whose scores, top-k, weights and aux/z losses come from r1fast.ops."""

    def __init__(self, config, pg_collection=None) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        self.normalize: Optional[bool] = getattr(config, "r1fast_router_normalize", None)
        self.group_score_topk: Optional[int] = getattr(config, "r1fast_router_group_score_topk",
                                                       None)
        self.impl: str = getattr(config, "r1fast_impl", "auto")
        self.layer_index: Optional[int] = None
        self.routing_hook: Optional[RoutingHook] = None
        self.replays_to_recompute: Optional[collections.deque] = None
        """While a training schedule with full activation recompute replays routing (set by
        the policy), what each checkpointed forward replayed (None where its micro-batch had
        no routing for this layer), oldest first: the backward re-runs that forward after its
        replay hook is gone and takes it back in the same order (micro-batches are recomputed
        in the order they ran), as megatron's REPLAY_BACKWARD does. None otherwise."""
        # tokens routed to each expert by the training forwards since expert_load() last read
        # it (valid tokens only; not saved in checkpoints)
        self.register_buffer("load_counts", torch.zeros(config.num_moe_experts,
                                                        dtype=torch.float64), persistent=False)

    def set_layer_number(self, layer_number: int) -> None:
        """megatron numbers layers from 1 over the whole model (PP offset included)."""
        super().set_layer_number(layer_number)
        self.layer_index = layer_number - 1

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Router logits in fp32 whatever the activation dtype (a plain matmul: the TE GEMM
        megatron would use is optional). [S, B, H] -> [S, B, E]."""
        bias = None if self.bias is None else self.bias.float()
        return F.linear(input.float(), self.weight.float(), bias)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        from r1fast.ops.moe_losses import moe_z_loss
        from r1fast.ops.moe_route import moe_route, routing_to_dense

        cfg = self.config
        num_experts = cfg.num_moe_experts
        rows = logits.shape[1] if logits.dim() == 3 else 1  # B of megatron's [S, B, E]
        logits = logits.view(-1, num_experts)  # [T, E] fp32, token t = s * B + b
        num_tokens = logits.shape[0]
        valid = None if padding_mask is None else ~padding_mask.reshape(-1).bool()  # [T]
        training = self.training and torch.is_grad_enabled()
        # the token total is the z-loss's and the batch-wise loss's (the sequence-wise one
        # counts per row); without them it is never formed (a collective under SP)
        losses = training and (cfg.moe_z_loss_coeff or (self.is_aux_loss_enabled()
                                                        and self.routing_type == "aux_loss"))
        # the tokens that count, over the TP(xCP) group: pads masked, never indexed away (a
        # boolean index waits for the GPU in every MoE layer of every micro-batch)
        counted = self._token_count(valid, num_tokens) if losses else None

        if training and cfg.moe_z_loss_coeff:
            # Under sequence parallelism each TP(xCP) rank holds a slice of the tokens: with the
            # global (valid) token count as the denominator the ranks' losses add up to the
            # one-rank mean (megatron divides by the group size, which is the same without
            # padding and wrong with it).
            coeff = cfg.moe_z_loss_coeff
            z_loss = moe_z_loss(logits, coeff, num_tokens=counted, valid=valid)
            logits = MoEAuxLossAutoScaler.apply(logits, z_loss)
            self._track("z_loss", z_loss / coeff)

        hook = self.routing_hook
        replay = None
        if hook is not None and self.layer_index is not None:
            replay = hook.replay_indices(self.layer_index, num_tokens, logits.device)
        queue = self.replays_to_recompute
        if queue is not None and not torch.is_grad_enabled():
            queue.append(replay)  # a checkpointed forward (None: it routed afresh)
        elif queue and hook is None:  # its recompute, in the backward
            replay = queue.popleft()
            if replay is not None and replay.shape[0] != num_tokens:
                raise RuntimeError(f"router replay under full recompute: layer "
                                   f"{self.layer_index} recomputes {num_tokens} tokens, the "
                                   f"oldest checkpointed forward replayed {replay.shape[0]}")
        routing = moe_route(
            logits, self.topk, score=cfg.moe_router_score_function,
            pre_softmax=cfg.moe_router_pre_softmax, n_groups=cfg.moe_router_num_groups,
            topk_groups=cfg.moe_router_group_topk, group_score_topk=self.group_score_topk,
            expert_bias=self.expert_bias,
            scaling_factor=cfg.moe_router_topk_scaling_factor or 1.0,
            normalize=self.normalize, replay_indices=replay, impl=self.impl)
        weights, indices = routing.weights, routing.indices  # [T, k] fp32, [T, k] int64
        if hook is not None and self.layer_index is not None:
            hook.record(self.layer_index, indices.detach())

        if training and self.is_aux_loss_enabled():
            weights = self._attach_aux_loss(logits, weights, valid, counted, rows)

        if torch.is_grad_enabled():
            # Load of this microbatch, accumulated over the microbatches of a step; megatron's
            # finalize_model_grads all-reduces it over TPxDP, moves the bias and zeroes it.
            # Padding tokens pass through the experts but do not count as load. No host sync
            # (bincount and boolean indexing would wait for the GPU in every MoE layer).
            with torch.no_grad():
                counts = routing.tokens_per_expert  # [E], counted by the routing op
                if valid is not None:
                    counts = torch.zeros_like(counts).index_add_(
                        0, indices.reshape(-1), valid[:, None].expand_as(indices).reshape(-1)
                        .to(counts.dtype))
                if self.training:
                    self.load_counts += counts.to(self.load_counts)
                if self.enable_expert_bias:
                    self.local_tokens_per_expert += counts.to(self.local_tokens_per_expert)

        return routing_to_dense(weights, indices, num_experts)  # probs [T, E], map [T, E]

    def _attach_aux_loss(self, logits: torch.Tensor, weights: torch.Tensor,
                         valid: Optional[torch.Tensor], counted, rows: int) -> torch.Tensor:
        """Megatron's load-balancing loss (scores = full softmax or normalised sigmoid, counts
        of a plain top-k on them) over the ``valid`` tokens (``counted`` of them in the TP(xCP)
        group), attached to the routing weights: batch-wise (``aux_loss``) or per row of the
        micro-batch (``seq_aux_loss``, ``rows`` of them)."""
        from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region
        from r1fast.ops.moe_losses import moe_aux_loss
        from r1fast.ops.moe_route import moe_aux_scores

        kind = self.routing_type
        if kind not in ("aux_loss", "seq_aux_loss"):
            raise ValueError("R1fastRouter supports moe_router_load_balancing_type 'aux_loss' "
                             f"and 'seq_aux_loss', got {kind!r}")
        coeff = self.get_aux_loss_coeff(kind)
        aux_logits = logits  # [T, E]
        if valid is not None:  # pads get strictly decreasing logits: their top-k is 0..k-1
            fill = -torch.arange(logits.shape[1], device=logits.device, dtype=logits.dtype)
            aux_logits = torch.where(valid[:, None], logits, fill)
        scores, counts = moe_aux_scores(aux_logits, self.topk,
                                        score=self.config.moe_router_score_function,
                                        impl=self.impl)
        if valid is not None:  # take the pads' scores out
            scores = scores * valid[:, None].to(scores.dtype)
        group = self.tp_cp_group
        if kind == "seq_aux_loss":  # counts of its own, per row
            aux = self._sequence_aux_loss(scores, valid, rows, coeff)
            self._track("seq_load_balancing_loss", aux / coeff, reduce_group=group)
            return MoEAuxLossAutoScaler.apply(weights, aux)
        if valid is not None:  # and the pads' known top-k from the counts
            first_k = torch.arange(counts.shape[0], device=counts.device) < self.topk
            counts = counts - first_k.to(counts.dtype) * (~valid).sum().to(counts.dtype)
        # Counts and token total of the whole TP(xCP) group: under sequence parallelism each
        # rank holds a slice of the tokens, and the balance loss is defined on all of them.
        global_counts = reduce_from_tensor_model_parallel_region(counts.float(), group)
        aux = moe_aux_loss(scores, global_counts, self.topk, coeff, num_tokens=counted)
        self._track("load_balancing_loss", aux / coeff, reduce_group=group)
        return MoEAuxLossAutoScaler.apply(weights, aux)

    def _sequence_aux_loss(self, scores: torch.Tensor, valid: Optional[torch.Tensor],
                           rows: int, coeff: float) -> torch.Tensor:
        """DeepSeek-V3's sequence-wise balance loss with a row of the micro-batch as the
        sequence (megatron's ``seq_aux_loss``; a packed row is one sequence, as in V3's
        pretraining on packed documents), each row over its own valid tokens. Under sequence
        parallelism a rank holds a slice of every row: the counts and lengths are summed over
        the TP(xCP) group, the scores stay local, so the ranks' shares add up."""
        from r1fast.ops.moe_losses import moe_seq_aux_loss
        from r1fast.ops.moe_route import _topk_lowest_first

        T, E = scores.shape
        # the plain top-k of each token (ties to the lowest expert, as moe_aux_scores counts)
        top = torch.zeros_like(scores).scatter_(1, _topk_lowest_first(scores.detach(),
                                                                      self.topk), 1.0)
        ones = torch.ones(T, 1, dtype=scores.dtype, device=scores.device)
        per_token = torch.cat([top, ones], dim=1)  # [T, E + 1]: top-k, and one token
        if valid is not None:
            per_token = per_token * valid[:, None].to(per_token.dtype)
        per_row = per_token.view(-1, rows, E + 1).sum(0)  # [B, E + 1]
        group = self.tp_cp_group
        if group.size() > 1:
            torch.distributed.all_reduce(per_row, group=group)
        row = torch.arange(T, device=scores.device) % rows  # token s * B + b is in row b
        return moe_seq_aux_loss(scores, row, per_row[:, :E], per_row[:, E], self.topk, coeff,
                                validate=False)  # row ids in range by construction

    def _token_count(self, valid: Optional[torch.Tensor], rows: int):
        """Tokens of the whole TP(xCP) group that count: ``rows`` (>= 1) on one rank without
        pads, else a 0-d device tensor (summed over the group, not read on the host)."""
        group = self.tp_cp_group
        if valid is None and group.size() == 1:
            return max(rows, 1)
        n = valid.sum().to(torch.float64) if valid is not None else torch.full(
            (), float(rows), dtype=torch.float64, device=self.weight.device)  # no host copy
        if group.size() > 1:
            torch.distributed.all_reduce(n, group=group)
        return n

    def _num_layers_total(self) -> int:
        return self.config.num_layers + (self.config.mtp_num_layers or 0)

    def _track(self, name: str, loss: torch.Tensor, **groups) -> None:
        """Megatron's per-layer log of ``loss``. Its process-wide table is sized by the first
        model that writes it: one of another depth starts the row again (a deeper one failed
        with IndexError in the router)."""
        total = self._num_layers_total()
        tracker = get_moe_layer_wise_logging_tracker()
        if name in tracker and tracker[name]["values"].numel() != total:
            del tracker[name]
        save_to_aux_losses_tracker(name, loss, self.layer_number, total, **groups)


def expert_load(policy, reset: bool = True) -> dict[int, torch.Tensor]:
    """Tokens routed to each expert ``{layer: [E] float64}`` for the MoE layers of this rank's
    pipeline stage, counted by the training forwards since the last call (``reset``) and summed
    over the tensor x data parallel group (collective there), e.g. to log the per-expert load
    and its imbalance (max / mean) next to the aux-loss-free bias. Under ``recompute = "full"``
    a token counts once: the checkpointed forward runs without gradients and does not count,
    its recomputation in the backward does."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    out = {}
    for router in sorted(policy._routers(), key=lambda r: r.layer_index):
        load = router.load_counts.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(load, group=ps.get_tensor_and_data_parallel_group())
        if reset:
            router.load_counts.zero_()
        out[router.layer_index] = load
    return out
