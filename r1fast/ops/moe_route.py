"""MoE routing: choose k experts per token from router logits, with the weights that scale the
experts' outputs, the per-expert token counts, and the auxiliary losses of the router.

Semantics follow megatron-core's ``topk_routing_with_score_function`` (0.16) so that a
Megatron router can call :func:`moe_route` instead, and extend it where DeepSeek-V3 needs it:

- ``score="softmax", pre_softmax=False``: top-k on the logits, weights = softmax over the k
  selected logits (they already sum to 1).
- ``score="softmax", pre_softmax=True``: scores = full softmax; weights = the selected scores
  (not renormalised unless ``normalize=True``).
- ``score="sigmoid"``: scores = sigmoid(logits); weights = selected scores divided by their sum
  + 1e-20 when ``normalize`` (default: when k > 1, as Megatron does; with k = 1 the weight is the
  raw score, otherwise it would be a constant 1 with no gradient).
- ``expert_bias`` [E] fp32 (aux-loss-free balancing) is added to the selection key only: the
  scores above (the logits for softmax after top-k), never to the weights. Megatron allows the
  bias with sigmoid only; here it works with every score function.
- group-limited selection (``n_groups``, ``topk_groups``; DeepSeek-V3 node-limited routing):
  experts form ``n_groups`` contiguous groups; a group's score is the sum of its top-m selection
  keys with ``m = group_score_topk``, by default ``topk // topk_groups`` (Megatron's rule;
  DESIGN's "top-2" is DeepSeek-V3's k=8, 4 groups), 1 for DeepSeek-V2's
  ``group_limited_greedy`` (a group ranks by its best expert); the ``topk_groups`` best groups
  stay, top-k is taken within them.
- ``scaling_factor`` multiplies the weights last. Ties break to the lowest expert index (in
  the group choice too), identically in every implementation.
- replay (``replay_indices`` [T, k]): the routing recorded at rollout time is reused; weights
  are recomputed from the current logits for those experts (so gradients flow), counts are the
  replayed ones; replayed indices are validated (range, distinct per row: one host sync; the
  plain path has none). NaN logits give unspecified weights but k distinct in-range experts.

Returns :class:`MoERouting` ``(weights [T,k] fp32, indices [T,k] int64, tokens_per_expert [E]
int64)``; ``weights`` is differentiable w.r.t. ``logits``. Implementations (``impl``):
``torch`` (the reference below, fp32 math, gradcheck-able in fp64), ``triton``
(``r1fast.kernels.moe_route``) and ``cuda`` (``csrc/moe_route.cu``; E <= 512, k <= 16,
n_groups <= 64). The fast paths are ``torch.library`` custom ops with fake and autograd
registrations, so they trace under ``torch.compile``.

Aux losses (docs/DESIGN.md §3): :func:`moe_aux_scores` gives Megatron's scores (full softmax,
or sigmoid normalised per token) and the counts of a plain top-k on them;
:mod:`r1fast.ops.moe_losses` turns them into the batch-wise and sequence-wise balance losses
(and has the z-loss).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from r1fast.ops._dispatch import debug_checks, resolve_impl
from r1fast.ops._validate import INDEX_DTYPES, check_choice, check_range, check_tensor
from r1fast.ops.moe_permute import expert_counts

SCORES = ("softmax", "sigmoid")
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Score codes shared with kernels/moe_route.py and csrc/moe_route.h.
SOFTMAX_POST, SOFTMAX_PRE, SIGMOID = 0, 1, 2
# What the CUDA kernels handle: warp-per-token rows of <= 16 values per lane, k in lanes.
CUDA_MAX_EXPERTS, CUDA_MAX_TOPK, CUDA_MAX_GROUPS = 512, 16, 64
EPS = 1e-20  # Megatron's epsilon in the weight normalisation


class MoERouting(NamedTuple):
    weights: Tensor  # [T, k] fp32 (fp64 for fp64 logits, torch path), differentiable
    indices: Tensor  # [T, k] int64, by decreasing selection key, ties to the lowest index
    tokens_per_expert: Tensor  # [E] int64


@dataclasses.dataclass(frozen=True)
class MoERouteConfig:
    """The routing rule of one MoE layer (everything but the tensors). ``moe_route(logits,
    **dataclasses.asdict(cfg))`` routes with it."""

    topk: int
    """Experts chosen per token (k)."""
    score: str = "softmax"
    """Score function: "softmax" or "sigmoid"."""
    pre_softmax: bool = False
    """Softmax only: True takes the full softmax before top-k, False the softmax of the k
    selected logits after it (Megatron's ``moe_router_pre_softmax``)."""
    n_groups: Optional[int] = None
    """Group-limited routing: number of contiguous expert groups (None: off)."""
    topk_groups: Optional[int] = None
    """Group-limited routing: groups kept per token (needs ``n_groups``)."""
    group_score_topk: Optional[int] = None
    """Group-limited routing: how many of a group's best selection keys sum to its score.
    None: ``topk // topk_groups`` (Megatron's rule, DeepSeek-V3); 1: the group's best expert
    (DeepSeek-V2's ``group_limited_greedy``)."""
    scaling_factor: float = 1.0
    """Multiplies the final weights (DeepSeek-V3: 2.5)."""
    normalize: Optional[bool] = None
    """Divide the selected scores by their sum + 1e-20. None: Megatron's rule (sigmoid with
    k > 1 yes; softmax no, since after-top-k softmax already sums to 1)."""

    @property
    def normalize_resolved(self) -> bool:
        if self.normalize is not None:
            return bool(self.normalize)
        return self.score == "sigmoid" and self.topk > 1

    @property
    def score_code(self) -> int:
        if self.score == "sigmoid":
            return SIGMOID
        return SOFTMAX_PRE if self.pre_softmax else SOFTMAX_POST

    @property
    def grouped(self) -> bool:
        return self.n_groups is not None

    @property
    def group_m(self) -> int:
        """Keys summed per group score (1 when not grouped: the kernels' neutral value)."""
        if not self.grouped:
            return 1
        return self.group_score_topk or self.topk // self.topk_groups

    def validate(self, num_experts: int) -> None:
        E, k = num_experts, self.topk
        check_choice("score", self.score, SCORES)
        if not isinstance(k, int) or isinstance(k, bool):
            raise ValueError(f"topk must be an int, got {type(k).__name__}")
        check_range("topk", k, 1, E)
        if (self.n_groups is None) != (self.topk_groups is None):
            raise ValueError("n_groups and topk_groups must be given together (both or neither), "
                             f"got n_groups={self.n_groups}, topk_groups={self.topk_groups}")
        if self.grouped:
            G, kg = self.n_groups, self.topk_groups
            check_range("n_groups", G, 1, E)
            if E % G:
                raise ValueError(f"n_groups must divide the number of experts {E}, got {G}")
            check_range("topk_groups", kg, 1, min(G, k))
            if k > kg * (E // G):
                raise ValueError(f"topk={k} must be <= topk_groups*experts_per_group = "
                                 f"{kg}*{E // G}")
            if self.group_score_topk is not None:
                check_range("group_score_topk", self.group_score_topk, 1, E // G)
        elif self.group_score_topk is not None:
            raise ValueError("group_score_topk needs group-limited routing (n_groups and "
                             f"topk_groups), got group_score_topk={self.group_score_topk}")
        check_range("scaling_factor", float(self.scaling_factor), 0.0, None, lo_open=True)
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be None or a bool, got {self.normalize!r}")


# ----------------------------------------------------------------------------- reference

def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _scores(l: Tensor, code: int) -> Tensor:
    if code == SIGMOID:
        return torch.sigmoid(l)
    if code == SOFTMAX_PRE:
        return torch.softmax(l, dim=-1)
    return l  # softmax after top-k selects on the logits


def _topk_lowest_first(key: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries per row; equal keys keep index order (stable sort)."""
    return torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]


def _group_limited_key(key: Tensor, cfg: MoERouteConfig) -> Tensor:
    """``key`` with the experts outside each token's best ``topk_groups`` groups set to -inf."""
    T, E = key.shape
    G, kg = cfg.n_groups, cfg.topk_groups
    m = cfg.group_m
    # Values only: which equal keys are "the top m" does not change their sum.
    group_score = key.view(T, G, E // G).topk(m, dim=-1).values.sum(-1)  # [T, G]
    keep = torch.zeros(T, G, dtype=torch.bool, device=key.device)
    keep.scatter_(1, _topk_lowest_first(group_score, kg), True)
    return key.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))


def _route_reference(logits: Tensor, cfg: MoERouteConfig, expert_bias: Optional[Tensor],
                     replay_indices: Optional[Tensor]) -> MoERouting:
    """Pure-PyTorch routing in fp32 (fp64 for fp64 logits); autograd gives the backward."""
    l = logits.to(_compute_dtype(logits))  # [T, E]
    E = l.shape[1]
    code = cfg.score_code
    s = _scores(l, code)  # [T, E]
    if replay_indices is None:
        key = s.detach()
        if expert_bias is not None:
            key = key + expert_bias.to(key.dtype)
        if cfg.grouped:
            key = _group_limited_key(key, cfg)
        indices = _topk_lowest_first(key, cfg.topk)  # [T, k]
    else:
        indices = replay_indices.to(torch.int64)
    u = s.gather(1, indices)  # [T, k]
    if code == SOFTMAX_POST:
        u = torch.softmax(u, dim=-1)
    if cfg.normalize_resolved:
        u = u / (u.sum(-1, keepdim=True) + EPS)
    weights = u * cfg.scaling_factor
    counts = expert_counts(indices.reshape(-1).sort().values, E)  # no host sync (bincount syncs)
    return MoERouting(weights, indices, counts)


def _aux_scores_reference(logits: Tensor, topk: int, score: str) -> tuple[Tensor, Tensor]:
    l = logits.to(_compute_dtype(logits))
    if score == "softmax":
        p = torch.softmax(l, dim=-1)
    else:
        sg = torch.sigmoid(l)
        p = sg / (sg.sum(-1, keepdim=True) + EPS)
    idx = _topk_lowest_first(p.detach(), topk)
    return p, expert_counts(idx.reshape(-1).sort().values, l.shape[1])


def naive_moe_route(logits: Tensor, topk: int, *, score: str = "softmax",
                    pre_softmax: bool = False, n_groups: Optional[int] = None,
                    topk_groups: Optional[int] = None, group_score_topk: Optional[int] = None,
                    expert_bias: Optional[Tensor] = None,
                    scaling_factor: float = 1.0, normalize: Optional[bool] = None,
                    replay_indices: Optional[Tensor] = None) -> MoERouting:
    """The routing rule written out token by token in fp64 with Python sorting: the independent
    ground truth of the tests (slow; weights differentiable w.r.t. ``logits``)."""
    l = logits.double()
    T, E = l.shape
    norm = normalize if normalize is not None else (score == "sigmoid" and topk > 1)
    bias = [0.0] * E if expert_bias is None else [float(b) for b in expert_bias]
    weights, chosen_all = [], []
    for t in range(T):
        lt = l[t]
        if score == "sigmoid":
            s = 1.0 / (1.0 + torch.exp(-lt))
        elif pre_softmax:
            ex = torch.exp(lt - lt.max())
            s = ex / ex.sum()
        else:
            s = lt
        if replay_indices is not None:
            chosen = [int(e) for e in replay_indices[t]]
        else:
            key = [float(s[e].detach()) + bias[e] for e in range(E)]
            allowed = list(range(E))
            if n_groups is not None:
                eg, m = E // n_groups, group_score_topk or topk // topk_groups
                gscore = [sum(sorted(key[g * eg:(g + 1) * eg], reverse=True)[:m])
                          for g in range(n_groups)]
                best = sorted(range(n_groups), key=lambda g: (-gscore[g], g))[:topk_groups]
                allowed = [e for e in allowed if e // eg in best]
            chosen = sorted(allowed, key=lambda e: (-key[e], e))[:topk]
        u = torch.stack([s[e] for e in chosen])
        if score == "softmax" and not pre_softmax:
            ex = torch.exp(u - u.max())
            u = ex / ex.sum()
        if norm:
            u = u / (u.sum() + EPS)
        weights.append(u * scaling_factor)
        chosen_all.append(chosen)
    idx = torch.tensor(chosen_all, dtype=torch.int64).reshape(T, topk)
    w = torch.stack(weights) if T else l.new_zeros((0, topk))
    counts = torch.tensor([sum(row.count(e) for row in chosen_all) for e in range(E)])
    return MoERouting(w, idx, counts)


def naive_moe_aux_scores(logits: Tensor, topk: int, score: str = "softmax"
                         ) -> tuple[Tensor, Tensor]:
    """fp64 per-token aux-loss scores and top-k counts (test ground truth)."""
    l = logits.double()
    rows, counts = [], [0] * l.shape[1]
    for lt in l:
        if score == "softmax":
            ex = torch.exp(lt - lt.max())
            p = ex / ex.sum()
        else:
            sg = 1.0 / (1.0 + torch.exp(-lt))
            p = sg / (sg.sum() + EPS)
        for e in sorted(range(len(p)), key=lambda e: (-float(p[e].detach()), e))[:topk]:
            counts[e] += 1
        rows.append(p)
    return torch.stack(rows), torch.tensor(counts)


# ----------------------------------------------------------------------------- fast paths

def _backend(impl: str):
    """The launcher module of ``impl``: same function names and signatures for both."""
    if impl == "triton":
        from r1fast.kernels import moe_route as kernels

        return kernels
    if impl == "cuda":
        return _CudaRoute
    raise ValueError(f"no fast backend {impl!r}")


class _CudaRoute:
    """Allocates outputs and calls the ``moe_route`` extension (signatures as the Triton
    launchers in ``r1fast.kernels.moe_route``)."""

    @staticmethod
    def route_fwd(logits, topk, score, expert_bias, replay, n_groups, topk_groups, group_m,
                  scaling, normalize, *, weights=None, indices=None, counts=None):
        from r1fast.ops import _cuda_ext

        logits = logits.contiguous()
        T, E = logits.shape
        weights = logits.new_empty((T, topk), dtype=torch.float32) if weights is None else weights
        indices = logits.new_empty((T, topk), dtype=torch.int64) if indices is None else indices
        counts = logits.new_empty((E,), dtype=torch.int64) if counts is None else counts
        grouped = n_groups > 1
        _cuda_ext.load("moe_route").moe_route_fwd(
            logits, expert_bias, None if replay is None else replay.to(torch.int64).contiguous(),
            weights, indices, counts, topk, score, n_groups if grouped else 1,
            topk_groups if grouped else 1, group_m if grouped else 1, float(scaling),
            bool(normalize))
        return weights, indices, counts

    @staticmethod
    def route_bwd(grad_weights, logits, indices, score, scaling, normalize, *, grad_logits=None):
        from r1fast.ops import _cuda_ext

        logits = logits.contiguous()
        grad_logits = torch.empty_like(logits) if grad_logits is None else grad_logits
        _cuda_ext.load("moe_route").moe_route_bwd(
            grad_weights.float().contiguous(), logits, indices.contiguous(), grad_logits,
            score, float(scaling), bool(normalize))
        return grad_logits

    @staticmethod
    def aux_scores_fwd(logits, topk, sigmoid, *, scores=None, counts=None):
        from r1fast.ops import _cuda_ext

        logits = logits.contiguous()
        T, E = logits.shape
        scores = logits.new_empty((T, E), dtype=torch.float32) if scores is None else scores
        counts = logits.new_empty((E,), dtype=torch.int64) if counts is None else counts
        _cuda_ext.load("moe_aux_scores").moe_aux_scores_fwd(logits, scores, counts, topk,
                                                            bool(sigmoid))
        return scores, counts

    @staticmethod
    def aux_scores_bwd(grad_scores, logits, sigmoid, *, grad_logits=None):
        from r1fast.ops import _cuda_ext

        logits = logits.contiguous()
        grad_logits = torch.empty_like(logits) if grad_logits is None else grad_logits
        _cuda_ext.load("moe_aux_scores").moe_aux_scores_bwd(
            grad_scores.float().contiguous(), logits, grad_logits, bool(sigmoid))
        return grad_logits


@torch.library.custom_op("r1fast::moe_route_fwd", mutates_args=())
def _route_fwd_op(logits: Tensor, expert_bias: Optional[Tensor], replay_indices: Optional[Tensor],
                  topk: int, score: int, n_groups: int, topk_groups: int, group_m: int,
                  scaling: float, normalize: bool, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    return _backend(impl).route_fwd(logits, topk, score, expert_bias, replay_indices, n_groups,
                                    topk_groups, group_m, scaling, normalize)


@_route_fwd_op.register_fake
def _(logits, expert_bias, replay_indices, topk, score, n_groups, topk_groups, group_m, scaling,
      normalize, impl):
    T, E = logits.shape
    return (logits.new_empty((T, topk), dtype=torch.float32),
            logits.new_empty((T, topk), dtype=torch.int64),
            logits.new_empty((E,), dtype=torch.int64))


@torch.library.custom_op("r1fast::moe_route_bwd", mutates_args=())
def _route_bwd_op(grad_weights: Tensor, logits: Tensor, indices: Tensor, score: int,
                  scaling: float, normalize: bool, impl: str) -> Tensor:
    return _backend(impl).route_bwd(grad_weights, logits, indices, score, scaling, normalize)


@_route_bwd_op.register_fake
def _(grad_weights, logits, indices, score, scaling, normalize, impl):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _route_setup(ctx, inputs, output):
    logits, _bias, _replay, _k, score, _g, _kg, _m, scaling, normalize, impl = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.args = (score, scaling, normalize, impl)


def _route_backward(ctx, grad_weights, _grad_indices, _grad_counts):
    logits, indices = ctx.saved_tensors
    if grad_weights is None:
        grad_weights = torch.zeros(indices.shape, dtype=torch.float32, device=indices.device)
    dl = _route_bwd_op(grad_weights, logits, indices, *ctx.args)
    return dl, None, None, None, None, None, None, None, None, None, None


_route_fwd_op.register_autograd(_route_backward, setup_context=_route_setup)


@torch.library.custom_op("r1fast::moe_aux_scores_fwd", mutates_args=())
def _aux_fwd_op(logits: Tensor, topk: int, sigmoid: bool, impl: str) -> tuple[Tensor, Tensor]:
    return _backend(impl).aux_scores_fwd(logits, topk, sigmoid)


@_aux_fwd_op.register_fake
def _(logits, topk, sigmoid, impl):
    return (logits.new_empty(logits.shape, dtype=torch.float32),
            logits.new_empty((logits.shape[1],), dtype=torch.int64))


@torch.library.custom_op("r1fast::moe_aux_scores_bwd", mutates_args=())
def _aux_bwd_op(grad_scores: Tensor, logits: Tensor, sigmoid: bool, impl: str) -> Tensor:
    return _backend(impl).aux_scores_bwd(grad_scores, logits, sigmoid)


@_aux_bwd_op.register_fake
def _(grad_scores, logits, sigmoid, impl):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _aux_setup(ctx, inputs, output):
    logits, _k, sigmoid, impl = inputs
    ctx.save_for_backward(logits)
    ctx.args = (sigmoid, impl)


def _aux_backward(ctx, grad_scores, _grad_counts):
    (logits,) = ctx.saved_tensors
    return _aux_bwd_op(grad_scores, logits, *ctx.args), None, None, None


_aux_fwd_op.register_autograd(_aux_backward, setup_context=_aux_setup)


# ----------------------------------------------------------------------------- public API

def _resolve(op: str, impl: str, logits: Tensor, cuda_limit: Optional[str]) -> str:
    """resolve_impl plus the shape/dtype limits of the fast paths: ``auto`` skips a path that
    cannot take these inputs; naming it explicitly raises a ValueError saying why."""
    supported = ["torch", "triton", "cuda"]
    if logits.dtype not in _FAST_DTYPES:
        if impl in ("triton", "cuda"):
            raise ValueError(f"{op}: impl={impl!r} takes logits of dtype float32, bfloat16 or "
                             f"float16, got {str(logits.dtype).replace('torch.', '')}")
        supported = ["torch"]
    if cuda_limit is not None and "cuda" in supported:
        if impl == "cuda":
            raise ValueError(f"{op}: impl='cuda' {cuda_limit}")
        supported.remove("cuda")
    return resolve_impl(op, impl, logits.device, supported=supported)


def _check_logits(logits: Tensor) -> tuple[int, int]:
    check_tensor("logits", logits, ndim=2, dtypes=_LOGIT_DTYPES)
    T, E = logits.shape
    if E < 1:
        raise ValueError(f"logits must have at least one expert column, got shape {[T, E]}")
    return T, E


def check_replay_indices(replay_indices: Tensor, T: int, k: int, E: int,
                         device: torch.device, *, values: bool = True) -> None:
    """Replayed indices must be [T, k] integers in [0, E), distinct within a row (wrong indices
    would make a kernel read outside the row). Shape/dtype always; the values (one host sync)
    when ``values`` is true."""
    check_tensor("replay_indices", replay_indices, dtypes=INDEX_DTYPES, shape=(T, k),
                 device=device)
    if not values or replay_indices.numel() == 0:
        return
    out_of_range = ((replay_indices < 0) | (replay_indices >= E)).any()
    srt = replay_indices.sort(dim=1).values
    dup = (srt[:, 1:] == srt[:, :-1]).any() if k > 1 else torch.zeros_like(out_of_range)
    bad_range, bad_dup = torch.stack([out_of_range, dup]).tolist()
    if bad_range:
        raise ValueError(f"replay_indices must hold expert ids in [0, {E}), got values "
                         f"in [{int(replay_indices.min())}, {int(replay_indices.max())}]")
    if bad_dup:
        raise ValueError("replay_indices must hold k distinct experts per token (row), "
                         "found a repeated expert in a row")


def _cuda_route_limit(E: int, cfg: MoERouteConfig) -> Optional[str]:
    if E > CUDA_MAX_EXPERTS:
        return f"supports at most {CUDA_MAX_EXPERTS} experts, got {E}"
    if cfg.topk > CUDA_MAX_TOPK:
        return f"supports topk <= {CUDA_MAX_TOPK}, got {cfg.topk}"
    if cfg.grouped and cfg.n_groups > CUDA_MAX_GROUPS:
        return f"supports n_groups <= {CUDA_MAX_GROUPS}, got {cfg.n_groups}"
    return None


def moe_route(
    logits: Tensor,
    topk: int,
    *,
    score: str = "softmax",
    pre_softmax: bool = False,
    n_groups: Optional[int] = None,
    topk_groups: Optional[int] = None,
    group_score_topk: Optional[int] = None,
    expert_bias: Optional[Tensor] = None,
    scaling_factor: Optional[float] = 1.0,
    normalize: Optional[bool] = None,
    replay_indices: Optional[Tensor] = None,
    impl: str = "auto",
    validate: Optional[bool] = None,
) -> MoERouting:
    """Route ``logits`` [T, E] to ``topk`` experts per token (semantics in the module doc).

    ``expert_bias`` [E] fp32 shifts the selection only; ``replay_indices`` [T, k] (int64/int32,
    distinct in-range experts per row) replaces the selection. ``scaling_factor=None`` means 1.
    ``validate``: check the replayed ids' values (a host sync); None follows
    ``R1FAST_DEBUG_CHECKS`` (``r1fast.ops._dispatch.debug_checks``)."""
    T, E = _check_logits(logits)
    cfg = MoERouteConfig(topk=topk, score=score, pre_softmax=bool(pre_softmax),
                         n_groups=n_groups, topk_groups=topk_groups,
                         group_score_topk=group_score_topk,
                         scaling_factor=1.0 if scaling_factor is None else float(scaling_factor),
                         normalize=normalize)
    cfg.validate(E)
    if expert_bias is not None:
        check_tensor("expert_bias", expert_bias, dtypes=(torch.float32,), shape=(E,),
                     device=logits.device)
    if replay_indices is not None:
        check_replay_indices(replay_indices, T, topk, E, logits.device,
                             values=debug_checks(validate))
    chosen = _resolve("moe_route", impl, logits, _cuda_route_limit(E, cfg))
    if chosen == "torch":
        return _route_reference(logits, cfg, expert_bias, replay_indices)
    w, idx, counts = _route_fwd_op(
        logits, None if expert_bias is None else expert_bias.contiguous(), replay_indices,
        cfg.topk, cfg.score_code, cfg.n_groups or 1, cfg.topk_groups or 1, cfg.group_m,
        cfg.scaling_factor, cfg.normalize_resolved, chosen)
    return MoERouting(w, idx, counts)


def moe_aux_scores(logits: Tensor, topk: int, *, score: str = "softmax",
                   impl: str = "auto") -> tuple[Tensor, Tensor]:
    """Megatron's aux-loss scores ``P [T, E]`` fp32 (full softmax, or sigmoid divided by its
    row sum + 1e-20) and the counts ``[E]`` int64 of a plain top-k on ``P`` (no bias, no
    groups, ties to the lowest index). ``P`` is differentiable w.r.t. ``logits``."""
    T, E = _check_logits(logits)
    check_choice("score", score, SCORES)
    check_range("topk", topk, 1, E)
    limit = f"supports at most {CUDA_MAX_EXPERTS} experts, got {E}" \
        if E > CUDA_MAX_EXPERTS else None
    chosen = _resolve("moe_aux_scores", impl, logits, limit)
    if chosen == "torch":
        return _aux_scores_reference(logits, topk, score)
    return _aux_fwd_op(logits, topk, score == "sigmoid", chosen)


def routing_to_dense(weights: Tensor, indices: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Megatron's format: ``probs [T, E]`` (weights scattered, differentiable) and
    ``routing_map [T, E]`` bool."""
    check_tensor("weights", weights, ndim=2, dtypes=_LOGIT_DTYPES)
    check_tensor("indices", indices, dtypes=INDEX_DTYPES, shape=tuple(weights.shape),
                 device=weights.device)
    T = weights.shape[0]
    probs = weights.new_zeros((T, num_experts)).scatter(1, indices.long(), weights)
    rmap = torch.zeros((T, num_experts), dtype=torch.bool, device=weights.device)
    rmap.scatter_(1, indices.long(), True)
    return probs, rmap
