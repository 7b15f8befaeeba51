"""Rollout routing replay (R3): the experts every MoE layer chose for every token *while the
rollout was decoded*, stored compactly, handed to the trainer for replay.

Why record during decoding. Training should run the experts that produced the samples. Running
a separate forward over the finished sequences after sampling (``Policy.record_routing``, the
post-hoc capture) sees the same weights but a different computation (one batched pass instead
of a prefill plus one-token steps over a KV cache, other batch-mates, other padding), so a
near-tie in the router can flip. Recording the routers' own decisions during the decode removes
that gap: what the trainer replays is exactly what the sampler ran.

How. :class:`RoutingRecorder` is a routing hook (``r1fast.policy.router.RoutingHook``) that the
KV-cache decoder installs on the policy's routers for each forward. Before the forward the
decoder tells it, for every token row a router of this rank will see (megatron's order:
sequence-major over this rank's sequence-parallel slice), the *destination* of that token in a
flat per-layer table: ``offset[row] + position`` for a real token, ``-1`` for a pad (left pads
of the prefill, the right pad of a sequence-parallel step, finished rows still in the batch).
:meth:`RoutingRecorder.record` then writes the chosen indices there with one ``index_copy_``
(pads go to a dump row), on the device and without a host sync.

Storage. One table per MoE layer ``[T + 1, k]`` (``T`` = the tokens the trainer will feed: each
row's prompt and every generated token but the last), ``uint8`` when the layer has at most 256
experts, ``int16`` otherwise: 8 (or 16) bits per choice instead of the int64 of the post-hoc
capture. Under sequence parallelism each TP rank routes a slice of each step's tokens, so each
rank fills only its rows; the tables start at 0 and are summed over the TP group once at the
end (exact: every entry has exactly one writer), in int32 where NCCL lacks int16.

Result: :class:`RolloutRouting`, host memory, with :meth:`RolloutRouting.padded` giving the
trainer's ``{layer: [B, L, k]}`` layout (positions beyond a row's tokens get experts
``0..k-1``, distinct as replay requires; they are padding and never reach the loss).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch


def routing_dtype(num_experts: int) -> torch.dtype:
    """The compact dtype of a layer's expert indices: uint8 up to 256 experts, else int16."""
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 32768:
        return torch.int16
    raise ValueError(f"num_experts={num_experts}: at most 32768 experts can be recorded")


def table_bounds(prompt_lens: Sequence[int], max_new_tokens: int) -> list[int]:
    """B + 1 ints: where each row starts in the routing tables, then the total. A row has
    ``len(prompt) + max_new_tokens - 1`` entries: its prompt and every generated token but the
    last (the inputs of training; the last token is only ever a target)."""
    out = [0]
    for n in prompt_lens:
        out.append(out[-1] + n + max_new_tokens - 1)
    return out


@dataclasses.dataclass
class RolloutRouting:
    """The experts of every MoE layer of this rank's pipeline stage, per token of the rollout.

    Row ``i``'s token at position ``p`` (0-based in ``prompt + completion``) is entry
    ``offsets[i] + p`` of each table, for ``p < lengths[i]``."""

    tables: dict[int, torch.Tensor]
    """{layer: [T, k] uint8/int16} (host memory), rows of all sequences end to end."""
    offsets: list[int]
    """Start of each row in the tables."""
    lengths: list[int]
    """Tokens recorded per row: its prompt plus every generated token but the last."""
    topk: int
    """Experts per token."""

    def padded(self, length: int) -> dict[int, torch.Tensor]:
        """``{layer: [B, length, k] int64}``, the ``routing`` the policy replays: each row's
        recorded tokens first, cut at ``length``, then experts 0..k-1 (padding positions)."""
        b, k = len(self.offsets), self.topk
        pos = torch.arange(length)
        lengths = torch.tensor(self.lengths)
        valid = pos[None, :] < lengths[:, None]  # [B, length]
        # a row's own entries where valid; any in-range entry elsewhere (replaced below)
        last = (lengths - 1).clamp_min(0)[:, None]
        src = torch.tensor(self.offsets)[:, None] + torch.minimum(pos[None, :], last)
        filler = torch.arange(k).expand(b, length, k)
        out = {}
        for layer, table in self.tables.items():
            if table.shape[0] == 0:
                out[layer] = filler.clone()
                continue
            gathered = table[src.clamp_max(table.shape[0] - 1)].long()  # [B, length, k]
            out[layer] = torch.where(valid[..., None], gathered, filler)
        return out


class RoutingRecorder:
    """Routing hook writing each router call's indices to their tokens' destinations.

    ``layers``: the MoE layer indices of this stage (with their expert counts); ``total``: the
    table rows (tokens to record). Set :attr:`dest` (``[T_call]`` int64 on the device, router
    order, -1 = pad) before each forward; read :meth:`tables` at the end."""

    def __init__(self, layers: dict[int, int], topk: int, total: int,
                 device: torch.device) -> None:
        self.topk = topk
        self.total = total
        self.dest: Optional[torch.Tensor] = None
        """Destination row of every token the routers see in the current forward."""
        self._tables = {layer: torch.zeros(total + 1, topk, dtype=routing_dtype(e),
                                           device=device)
                        for layer, e in layers.items()}
        self._experts = dict(layers)

    # -- the routing-hook protocol of r1fast.policy.router --------------------------------------
    def replay_indices(self, layer_index: int, num_tokens: int,
                       device: torch.device) -> Optional[torch.Tensor]:
        return None  # record only: route normally

    def record(self, layer_index: int, indices: torch.Tensor) -> None:
        if self.dest is None or layer_index not in self._tables:
            return
        if indices.shape[0] != self.dest.shape[0]:
            raise ValueError(f"layer {layer_index}: the router saw {indices.shape[0]} tokens but "
                             f"the decoder announced {self.dest.shape[0]}")
        table = self._tables[layer_index]
        rows = torch.where(self.dest >= 0, self.dest, self.total)  # pads -> the dump row
        table.index_copy_(0, rows, indices.to(table.dtype))

    # -- the result -----------------------------------------------------------------------------
    def tables(self, tp_group=None) -> dict[int, torch.Tensor]:
        """``{layer: [total, k]}`` on the host, summed over ``tp_group`` when given (sequence
        parallelism: each TP rank wrote its own tokens' rows, the others hold 0)."""
        import torch.distributed as dist

        out = {}
        for layer, table in sorted(self._tables.items()):
            table = table[:self.total]
            if tp_group is not None and dist.get_world_size(tp_group) > 1:
                wide = table.to(torch.int32)  # NCCL has no int16; uint8 sums are exact too
                dist.all_reduce(wide, group=tp_group)
                table = wide.to(table.dtype)
            out[layer] = table.cpu()
        return out
