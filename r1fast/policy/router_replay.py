"""Router replay: record which experts each MoE layer chose while generating a rollout, and
replay those choices when the trainer recomputes log-probs and gradients, so rollout and
training run the same experts (routing drift between the two is a known cause of RL collapse
on MoE models: ANCHORS, Megatron-LM #4168, "R3" in verl/slime/NeMo-RL).

One object serves a whole model; layers are keyed by their layer number::

    replay = RouterReplay()
    with replay.record():                      # rollout: prefill, then each decode step
        model.generate(...)                    # routers call replay.route(layer, logits, ...)
    recorded = replay.recorded()               # {layer: [T_total, k] int64}, steps concatenated
    ...
    with replay.replay(indices_by_layer):      # training forward (and its recomputation)
        loss = model(batch)                    # routers call replay.route(...) again

A router either calls :meth:`RouterReplay.route` instead of
:func:`r1fast.ops.moe_route.moe_route` (with no mode active it is exactly ``moe_route``), or
installs the object as the routing hook of ``r1fast.policy.router``
(``set_routing_hook(replay)``): it implements that protocol's ``replay_indices(layer_index,
num_tokens, device)`` and ``record(layer_index, indices)``. In record mode a layer routes
normally and the chosen indices of that call (a prefill or one decode step) are appended to the
layer's list; in replay mode it routes with ``replay_indices`` = the layer's given indices: the
weights are recomputed from the current logits (gradients flow), the experts are the recorded
ones.

Token order is the caller's business: recorded indices are concatenated in call order
(prefill rows, then decode step 1 rows, ...); :meth:`steps` gives the per-call tensors so the
rollout code can reorder them into the trainer's [sequence, position] layout before replay.
In replay mode every call of a layer uses its full tensor, so a recomputation inside the replay
block sees the same indices; a call whose token count differs raises. Full activation recompute
re-runs a layer in the backward, after the block: :func:`kept_for_recompute` carries the indices
there.
"""
from __future__ import annotations

import collections
import contextlib
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from r1fast.ops.moe_route import MoERouting, moe_route

_IDLE, _RECORD, _REPLAY = "idle", "record", "replay"


class RouterReplay:
    """Records and replays the top-k expert indices of every MoE layer (see module doc)."""

    def __init__(self) -> None:
        self._mode = _IDLE
        self._steps: dict[int, list[Tensor]] = {}  # record: layer -> per-call [T_i, k]
        self._targets: dict[int, Tensor] = {}  # replay: layer -> [T, k]
        self._to_cpu = False

    # ------------------------------------------------------------------ state

    @property
    def mode(self) -> str:
        """"idle", "record" or "replay"."""
        return self._mode

    def _enter(self, mode: str) -> None:
        if self._mode != _IDLE:
            raise RuntimeError(f"RouterReplay is already in {self._mode!r} mode; "
                               f"leave it before entering {mode!r}")
        self._mode = mode

    def record(self, layer_index: Optional[int] = None, indices: Optional[Tensor] = None, *,
               to_cpu: bool = False):
        """Two uses.

        ``with replay.record(to_cpu=False): ...`` records the indices of every routing call in
        the block (earlier recordings are dropped). ``to_cpu=True`` moves each call's indices to
        host memory as it is recorded (frees GPU memory during long rollouts; costs a
        device-to-host copy per call).

        ``replay.record(layer_index, indices)`` is the routing-hook call of
        ``r1fast.policy.router`` (after each routing): it appends ``indices`` [T, k] to the
        layer's list in record mode and does nothing otherwise.
        """
        if layer_index is None and indices is None:
            return self._recording(to_cpu)
        if layer_index is None or indices is None:
            raise ValueError("record(layer_index, indices) needs both arguments "
                             "(or none, as a context manager)")
        if self._mode == _RECORD:
            self._append(layer_index, indices)
        return None

    @contextlib.contextmanager
    def _recording(self, to_cpu: bool) -> Iterator["RouterReplay"]:
        self._enter(_RECORD)
        self._steps = {}
        self._to_cpu = to_cpu
        try:
            yield self
        finally:
            self._mode = _IDLE

    def _append(self, layer: int, indices: Tensor) -> None:
        idx = indices.detach()
        idx = idx.to("cpu") if self._to_cpu else idx.clone()
        self._steps.setdefault(layer, []).append(idx)

    @contextlib.contextmanager
    def replay(self, indices_by_layer: Mapping[int, Union[Tensor, Sequence[Tensor]]]
               ) -> Iterator["RouterReplay"]:
        """Route every layer in ``indices_by_layer`` with the given indices ([T, k] integer
        tensor, or a list of per-call tensors concatenated along tokens). A layer without
        entry routes normally."""
        targets: dict[int, Tensor] = {}
        for layer, value in indices_by_layer.items():
            if not isinstance(layer, int) or isinstance(layer, bool):
                raise ValueError(f"indices_by_layer keys must be int layer numbers, got {layer!r}")
            idx = torch.cat(list(value), dim=0) if isinstance(value, (list, tuple)) else value
            if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.is_floating_point():
                raise ValueError(f"indices_by_layer[{layer}] must be an integer tensor [T, k], "
                                 f"got {type(idx).__name__} "
                                 f"{list(idx.shape) if isinstance(idx, Tensor) else ''}")
            targets[layer] = idx
        self._enter(_REPLAY)
        self._targets = targets
        try:
            yield self
        finally:
            self._mode = _IDLE
            self._targets = {}

    # ------------------------------------------------------------------ the router's call

    def replay_indices(self, layer_index: int, num_tokens: int,
                       device: torch.device) -> Optional[Tensor]:
        """Routing-hook call of ``r1fast.policy.router``: the [num_tokens, k] indices to replay
        for this layer (on ``device``), or None to route normally (no replay active, or the
        layer has no entry)."""
        if self._mode != _REPLAY or layer_index not in self._targets:
            return None
        idx = self._targets[layer_index]
        if idx.shape[0] != num_tokens:
            raise ValueError(f"layer {layer_index}: replay indices cover {idx.shape[0]} tokens "
                             f"but the router got {num_tokens}")
        if idx.device != torch.device(device):
            idx = idx.to(device, non_blocking=True)
            self._targets[layer_index] = idx  # move once; recomputation reuses it
        return idx

    def route(self, layer: int, logits: Tensor, **route_kwargs) -> MoERouting:
        """Route ``logits`` [T, E] of MoE layer ``layer`` with :func:`moe_route`
        (``route_kwargs``: ``topk``, ``score``, ``pre_softmax``, groups, bias, ...), recording
        or replaying according to the active mode."""
        if "replay_indices" in route_kwargs:
            raise ValueError("route() takes its replay_indices from the RouterReplay; "
                             "do not pass replay_indices")
        replay = self.replay_indices(layer, logits.shape[0], logits.device)
        routing = moe_route(logits, replay_indices=replay, **route_kwargs)
        self.record(layer, routing.indices)
        return routing

    # ------------------------------------------------------------------ recorded data

    def layers(self) -> list[int]:
        """Layer numbers recorded, ascending."""
        return sorted(self._steps)

    def steps(self, layer: int) -> list[Tensor]:
        """The indices of each recorded call of ``layer``, in call order."""
        if layer not in self._steps:
            raise KeyError(f"layer {layer} was not recorded (recorded: {self.layers()})")
        return list(self._steps[layer])

    def indices(self, layer: int) -> Tensor:
        """All recorded indices of ``layer``, calls concatenated along tokens: [T_total, k]."""
        return torch.cat(self.steps(layer), dim=0)

    def recorded(self, layers: Optional[Sequence[int]] = None) -> dict[int, Tensor]:
        """``{layer: indices(layer)}`` for every recorded layer (or the given ones): the
        argument :meth:`replay` takes."""
        return {layer: self.indices(layer) for layer in (self.layers() if layers is None
                                                          else layers)}

    def clear(self) -> None:
        """Drop recorded indices (not allowed while recording or replaying)."""
        if self._mode != _IDLE:
            raise RuntimeError(f"cannot clear while in {self._mode!r} mode")
        self._steps = {}


# ---------------------------------------------------------------------- the policy's replay

@contextlib.contextmanager
def replaying(policy, routing: Optional[Mapping[int, Tensor]], shape) -> Iterator[None]:
    """``policy``'s routers replay ``routing`` ({layer: [b, L, k]}) in one micro-batch's
    forward (``shape`` = (b, L) of its tokens); nothing without ``routing``."""
    if routing is None:
        yield
        return
    from r1fast.ops._validate import check_tensor
    from r1fast.policy.transfer import to_device_once

    b, length = shape
    k = policy.model_cfg.moe_router_topk
    layers = [i for i in policy.moe_layers() if i in routing]
    for layer in layers:
        idx = routing[layer]
        check_tensor(f"routing[{layer}]", idx, ndim=3, dtypes=(torch.int64, torch.int32))
        if tuple(idx.shape) != (b, length, k):
            raise ValueError(f"routing[{layer}] must have shape [{b}, {length}, {k}], "
                             f"got {list(idx.shape)}")
    # every layer in one copy that does not wait (a plain .to() of a host tensor waits for
    # the previous micro-batch's backward): no idle GPU between micro-batches
    moved = to_device_once(policy.device, [routing[layer] for layer in layers])
    targets = {i: policy.token_layout.to_router_order(t) for i, t in zip(layers, moved)}
    replay = RouterReplay()
    with replay.replay(targets), policy._hooked(replay):
        yield


@contextlib.contextmanager
def kept_for_recompute(routers: Sequence) -> Iterator[None]:
    """While a training schedule runs under full activation recompute: the backward re-runs
    each checkpointed layer after :func:`replaying` has ended for its micro-batch, so
    ``routers`` keep the indices each checkpointed forward replayed and hand them to its
    recompute, oldest first (``R1fastRouter.replays_to_recompute``, megatron's
    REPLAY_BACKWARD); every one must be taken by the end. Without this, the recomputed forward
    routed afresh and the gradients were those of other experts than the loss's."""
    for r in routers:
        r.replays_to_recompute = collections.deque()
    try:
        yield
        left = {r.layer_index: len(r.replays_to_recompute) for r in routers
                if r.replays_to_recompute}
        if left:
            raise RuntimeError(f"router replay under full recompute: checkpointed forwards "
                               f"never recomputed ({{layer: count}} {left})")
    finally:
        for r in routers:
            r.replays_to_recompute = None
