"""The routed experts of a MoE layer as grouped launches: every expert's SwiGLU MLP over its
rows, forward and backward, with the row counts left on the device.

    y[r] = (silu(g_r) * (u_r + offset) * p[r]) W2_e^T,     [g_r | u_r] = x[r] W1_e^T,

with e the expert of row r, for rows ``x [n, H]`` sorted by expert (``counts [E]`` rows each,
megatron's permuted order), ``fc1_e = [W1a_e; W1b_e]`` of shape ``[2F, H]`` and ``fc2_e [H, F]``
-- megatron's gated-SiLU ``MLP`` of each local expert, the probabilities applied after the
activation as megatron does without ``moe_apply_probs_on_input``.

megatron's sequential experts, on a GPU without Transformer Engine, run this as ~7 launches per
expert (more in the backward) after the host has read the counts (``tokens_per_expert.tolist()``,
a wait for the GPU in every MoE layer). With a few rows per expert (decoding) that is
launch-bound: ~900 launches per layer at E=128. :func:`moe_grouped_swiglu` is two Triton
launches forward and four backward (``r1fast.kernels.moe_experts``) that find each tile's
expert from the counts on the device; the weights stay in megatron's per-expert parameters and
are reached through a table of their addresses (:class:`ExpertTable`, built once and rebuilt
when a weight moves). Under autograd the forward also keeps the pre-activations ``[g | u]``
``[n, 2F]`` and ``h [n, F]`` for the backward (megatron's MLP keeps as much), and the weight
gradients arrive as views of one ``[E, ...]`` tensor per projection.

Users: the rollout decoder (``r1fast.policy.local_experts.grouped_experts``, forward only) and
the trainer (``parallel.experts``: ``r1fast.policy.local_experts.use_grouped_experts``). The
pre-activations are rounded to the rows' dtype before the activation, as megatron's linear
returns them; the activation and the probability are applied in fp32 and rounded once
(megatron rounds after each op), so in bf16 the two agree to bf16 rounding, not bitwise. The
torch path (``impl="torch"``, any device) loops over the experts with host counts (autograd
through torch ops); ``naive_moe_grouped_swiglu`` is the fp64 ground truth.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import Tensor

from r1fast.ops._dispatch import resolve_impl
from r1fast.ops._validate import FLOAT_DTYPES, INDEX_DTYPES, check_tensor

__all__ = ["ExpertTable", "moe_grouped_swiglu", "naive_moe_grouped_swiglu"]

_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
log = logging.getLogger(__name__)


class ExpertTable:
    """The experts' weights of one MoE layer, with device tables of their addresses.

    ``fc1``: E tensors ``[2F, H]``; ``fc2``: E tensors ``[H, F]``; all contiguous, one dtype,
    one device (checked once, and again whenever a weight's address changes: the kernels read
    through raw addresses, so a stale table would read freed memory). :attr:`aligned` says
    whether every address is a multiple of 16 bytes, which lets the kernels load weight tiles
    16 bytes at a time and pipeline them; an unaligned table runs slower and says so."""

    def __init__(self, fc1: Sequence[Tensor], fc2: Sequence[Tensor]) -> None:
        if len(fc1) != len(fc2) or not fc1:
            raise ValueError(f"ExpertTable: fc1 and fc2 must list the same number (>= 1) of "
                             f"experts, got {len(fc1)} and {len(fc2)}")
        self.fc1, self.fc2 = list(fc1), list(fc2)
        self._addresses: tuple[int, ...] = ()
        self._tables: tuple[Tensor, Tensor] | None = None
        self.aligned = False
        """Every address of the last :meth:`tables` a multiple of 16 bytes."""
        self._check()

    @property
    def num_experts(self) -> int:
        return len(self.fc1)

    @property
    def ffn(self) -> int:
        return self.fc2[0].shape[1]

    @property
    def hidden(self) -> int:
        return self.fc2[0].shape[0]

    def _check(self) -> None:
        F2, H = self.fc1[0].shape
        first = self.fc1[0]
        for name, weights, shape in (("fc1", self.fc1, (F2, H)), ("fc2", self.fc2, (H, F2 // 2))):
            for e, w in enumerate(weights):
                if tuple(w.shape) != shape or F2 % 2:
                    raise ValueError(f"ExpertTable: {name}[{e}] must have shape {list(shape)} "
                                     f"(fc1 [2F, H], fc2 [H, F]), got {list(w.shape)}")
                if w.dtype != first.dtype or w.device != first.device or not w.is_contiguous():
                    raise ValueError(f"ExpertTable: {name}[{e}] must be contiguous "
                                     f"{first.dtype} on {first.device}, got "
                                     f"{w.dtype} on {w.device} (contiguous={w.is_contiguous()})")

    def tables(self) -> tuple[Tensor, Tensor]:
        """``(fc1 addresses [E], fc2 addresses [E])`` int64 on the weights' device."""
        addresses = tuple(w.data_ptr() for w in self.fc1 + self.fc2)
        if addresses != self._addresses:
            self._check()
            device = self.fc1[0].device
            both = torch.tensor(addresses, dtype=torch.int64).to(device)  # once per move
            self._tables = (both[: self.num_experts], both[self.num_experts:])
            self._addresses = addresses
            self.aligned = all(a % 16 == 0 for a in addresses)
            if not self.aligned and device.type == "cuda":
                log.warning("ExpertTable: an expert weight's address is not a multiple of 16 "
                            "bytes; the grouped expert kernels load these weights element by "
                            "element, unpipelined (slower). Allocate each expert's weights "
                            "16-byte aligned to restore the fast loads")
        return self._tables


def moe_grouped_swiglu(x: Tensor, counts: Tensor, experts: ExpertTable, probs: Tensor, *,
                       glu_offset: float = 0.0, impl: str = "auto") -> Tensor:
    """``y [n, H]`` (dtype of x), the module doc's formula, for ``x [n, H]`` sorted by expert
    with ``counts [E]`` rows each (any integer dtype; on x's device for the Triton path, which
    reads them there) and ``probs [n]``. ``counts`` must sum to ``n``; that is the caller's
    (megatron's dispatcher's) invariant, not checked here (a host sync)."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    n, H = x.shape
    E, F = experts.num_experts, experts.ffn
    check_tensor("counts", counts, ndim=1, dtypes=INDEX_DTYPES, shape=(E,))
    check_tensor("probs", probs, ndim=1, dtypes=FLOAT_DTYPES, shape=(n,), device=x.device)
    if experts.hidden != H or experts.fc1[0].dtype != x.dtype:
        raise ValueError(f"moe_grouped_swiglu: experts take [n, {experts.hidden}] "
                         f"{experts.fc1[0].dtype} rows, got {list(x.shape)} {x.dtype}")
    supported = ["torch", "triton"] if x.dtype in _FAST_DTYPES else ["torch"]
    chosen = resolve_impl("moe_grouped_swiglu", impl, x.device, supported=supported)
    if chosen == "torch":
        return _reference(x, counts, experts, probs, glu_offset)
    counts = counts.to(x.device)
    x = x.contiguous()  # the kernels step along a row's features with stride 1
    if torch.is_grad_enabled():  # decoding runs without: no list of the weights there
        weights = experts.fc1 + experts.fc2
        if any(t.requires_grad for t in [x, probs] + weights):
            return _GroupedSwiGLU.apply(x, probs, counts, experts, float(glu_offset), *weights)
    from r1fast.kernels.moe_experts import grouped_swiglu_mlp  # lazy: needs triton

    fc1, fc2 = experts.tables()
    return grouped_swiglu_mlp(x, counts, fc1, fc2, probs, F, glu_offset,
                              aligned=experts.aligned)


class _GroupedSwiGLU(torch.autograd.Function):
    """The Triton path under autograd: the forward keeps ``[g | u]`` and ``h``, the backward
    is four grouped launches (``r1fast.kernels.moe_experts``)."""

    @staticmethod
    def forward(ctx, x, probs, counts, experts: ExpertTable, glu_offset: float, *weights):
        from r1fast.kernels.moe_experts import grouped_swiglu_mlp  # lazy: needs triton

        n, F = x.shape[0], experts.ffn
        fc1, fc2 = experts.tables()
        pre, h = x.new_empty((n, 2 * F)), x.new_empty((n, F))  # kept for the backward
        y = grouped_swiglu_mlp(x, counts, fc1, fc2, probs, F, glu_offset,
                               aligned=experts.aligned, h=h, pre=pre)
        # the weights too: autograd's version check then refuses a backward after they
        # changed in place (the tables point at them)
        ctx.save_for_backward(x, probs, counts, pre, h, fc1, fc2, *weights)
        ctx.glu_offset, ctx.aligned = glu_offset, experts.aligned
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        from r1fast.kernels.moe_experts import grouped_swiglu_mlp_backward

        x, probs, counts, pre, h, fc1, fc2 = ctx.saved_tensors[:7]
        need_x, need_probs = ctx.needs_input_grad[:2]
        need_w = any(ctx.needs_input_grad[5:])
        E = counts.numel()
        grads = grouped_swiglu_mlp_backward(dy, x, pre, h, counts, fc1, fc2, probs,
                                            ctx.glu_offset, aligned=ctx.aligned,
                                            x_grad=need_x, weights=need_w)
        weight_grads = [None] * (2 * E)
        if need_w:  # [E, 2F, H] and [E, H, F] -> one view per expert parameter
            weight_grads = list(grads["fc1"].unbind(0)) + list(grads["fc2"].unbind(0))
        return (grads["x"] if need_x else None,
                grads["probs"].to(probs.dtype) if need_probs else None,
                None, None, None, *weight_grads)


def _reference(x: Tensor, counts: Tensor, experts: ExpertTable, probs: Tensor,
               glu_offset: float) -> Tensor:
    """Per-expert loop with host counts, fp32 accumulation (fp64 for fp64 rows)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    sizes, out = counts.tolist(), []  # one host read
    for e, (xs, ps) in enumerate(zip(torch.split(x, sizes), torch.split(probs, sizes))):
        # [g | u] rounded to the rows' dtype, as the kernel and megatron's linear
        pre = (xs.to(acc) @ experts.fc1[e].to(acc).t()).to(x.dtype).to(acc)  # [n_e, 2F]
        gate, up = pre.chunk(2, dim=-1)  # [n_e, F] each
        h = torch.nn.functional.silu(gate) * (up + glu_offset) * ps.to(acc).unsqueeze(-1)
        h = h.to(x.dtype).to(acc)  # as the kernel (and megatron): h in the rows' dtype
        out.append((h @ experts.fc2[e].to(acc).t()).to(x.dtype))  # [n_e, H]
    return torch.cat(out) if out else x.new_empty((0, x.shape[1]))


def naive_moe_grouped_swiglu(x: Tensor, counts: Sequence[int], fc1: Sequence[Tensor],
                             fc2: Sequence[Tensor], probs: Tensor,
                             glu_offset: float = 0.0) -> Tensor:
    """The formula row by row in fp64 with Python loops (test ground truth)."""
    rows, r = [], 0
    for e, c in enumerate(counts):
        w1, w2 = fc1[e].double(), fc2[e].double()
        F = w2.shape[1]
        for _ in range(int(c)):
            v = x[r].double()
            gate, up = w1[:F] @ v, w1[F:] @ v
            h = gate / (1.0 + torch.exp(-gate)) * (up + glu_offset) * float(probs[r])
            rows.append(w2 @ h)
            r += 1
    return torch.stack(rows) if rows else x.new_zeros((0, x.shape[1]), dtype=torch.float64)
