"""Fused linear log-prob + entropy: ``logp[t] = log softmax(x_t W^T / tau)[y_t]`` without [T, V].

RL trainers need, for every sampled token, the log-probability of that token under the policy
(and often the entropy of the policy's distribution), computed from the last hidden states
``hidden [T, H]`` and the LM head ``weight [V, H]``. Materialising the logits costs ``T*V``
floats (10 GB in fp32 at T=16k, V=152k) and plain autograd keeps several such tensors alive.
This op streams the logits in tiles instead, keeping only online per-row statistics
(docs/DESIGN.md §3):

    z = x W^T / tau           m = max z           s = sum exp(z - m)        S = sum exp(z - m) z
    lse = m + log s           logp = z_y - lse    entropy = lse - S / s

and its backward recomputes the logits tile by tile with ``p = exp(z - lse)``:

    dz_j = g (1[j = y] - p_j) - h p_j (z_j - lse + entropy),   dx = dz W / tau,   dW = dz^T x / tau

Two implementations, chosen by ``impl`` (see ``r1fast.ops._dispatch``):
- ``"torch"``: the reference, pure PyTorch, chunked over tokens and vocabulary
  (``chunk_tokens x chunk_vocab`` logit tiles), fp32 accumulation for 16-bit inputs (fp64 for
  fp64 inputs, which makes ``torch.autograd.gradcheck`` possible), any device.
- ``"triton"``: the fused kernels of ``r1fast.kernels.linear_logprob``, registered as
  ``torch.library`` custom ops (with fake and autograd implementations) so the op composes
  with ``torch.compile``. ``tiles="gemm"`` runs the same custom ops on the other arrangement,
  ``r1fast.kernels.linear_logprob_gemm``: cuBLAS writes fp32 logit tiles into a bounded
  workspace and Triton row kernels reduce them (which one is faster is a GPU measurement:
  bench/bench_linear_logprob.py times both).

Vocabulary parallelism (``tp_group``, Megatron layout): each rank holds rows
``[rank*V_local, (rank+1)*V_local)`` of the LM head and the full ``hidden``/``targets``. Each rank
computes the partial (m, s, S, z_y) of its shard; one all-gather and the same merge rule that
combines vocabulary splits inside the kernel give every rank the unsharded result. In the
backward each rank computes its shard's ``dW`` and a partial ``dx`` that is all-reduced.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.distributed as dist

from r1fast.ops._dispatch import checks_values, resolve_impl
from r1fast.ops._validate import FLOAT_DTYPES, INDEX_DTYPES, check_tensor

__all__ = ["linear_logprob", "naive_linear_logprob", "LinearLogprobChunks", "DEFAULT_CHUNKS",
           "merge_partials"]

_OP = "linear_logprob"
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TORCH_DTYPES = _TRITON_DTYPES + (torch.float64,)
_TILES = ("fused", "gemm")


@dataclasses.dataclass(frozen=True)
class LinearLogprobChunks:
    """Chunk sizes used when a call passes ``chunk_tokens`` / ``chunk_vocab = None``."""

    torch_tokens: int = 2048
    """Token rows per tile of the torch reference; its extra memory is a few fp32 tiles of
    ``torch_tokens x torch_vocab`` (64 MiB each at the defaults), independent of T*V."""
    torch_vocab: int = 8192
    """Vocabulary rows per tile of the torch reference."""
    triton_tokens: int = 16384
    """Token rows per backward chunk of the Triton path. With more than one chunk a 16-bit
    weight needs an fp32 ``[V, H]`` dW accumulator that every chunk re-reads, so keep it large."""
    triton_workspace: int = 1 << 28
    """Elements of the Triton backward's dz workspace ``[chunk_tokens, chunk_vocab]`` when
    ``chunk_vocab`` is not given (512 MiB in bf16): chunk_vocab = this / chunk_tokens."""
    grad_in_forward_dz: int = 1 << 29
    """16-bit elements of the dz rows that the in-forward gradient
    (``r1fast.ops.fused_linear_policy_grad``) gathers, chunk by chunk, before one dW GEMM
    (1 GiB): each dW GEMM re-reads and re-writes the fp32 ``[V, H]`` accumulator, so fewer,
    longer GEMMs move less memory."""


DEFAULT_CHUNKS = LinearLogprobChunks()


# ----------------------------------------------------------------------------- shared math

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_partials(stats: torch.Tensor) -> torch.Tensor:
    """Merge partial statistics ``[P, 4, T]`` (rows m, s, S, z_y of P vocabulary pieces) into
    ``[4, T]``: ``M = max m``, ``s = sum s e^{m-M}``, ``S = sum S e^{m-M}``, ``z_y = sum z_y``
    (z_y is 0 in every piece but the one that holds the target)."""
    m, s, sz, zy = stats.unbind(1)  # each [P, T]
    big = m.amax(0)  # [T]; finite: every piece saw at least one column
    scale = torch.exp(m - big)  # [P, T]; a piece with m = -inf (no columns) contributes 0
    return torch.stack([big, (s * scale).sum(0), (sz * scale).sum(0), zy.sum(0)])


def _finish(stats: torch.Tensor, ignored: torch.Tensor, group) -> tuple[torch.Tensor, ...]:
    """(logp, entropy, lse), each [T], from this shard's [4, T] stats (merged over ``group``)."""
    if group is not None:
        parts = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, stats.contiguous(), group=group)
        stats = merge_partials(torch.stack(parts))
    m, s, sz, zy = stats.unbind(0)
    lse = m + torch.log(s)
    ent = lse - sz / s
    logp = zy - lse
    return logp.masked_fill(ignored, 0.0), ent.masked_fill(ignored, 0.0), lse


def _row_grads(g, h, ignored: torch.Tensor, like: torch.Tensor):
    """Upstream gradients of logp and entropy as dense [T] tensors, zero on ignored rows."""
    g = torch.zeros_like(like) if g is None else g.to(like.dtype)
    h = torch.zeros_like(like) if h is None else h.to(like.dtype)
    return g.masked_fill(ignored, 0.0).contiguous(), h.masked_fill(ignored, 0.0).contiguous()


# ----------------------------------------------------------------------------- naive formula

def naive_linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         temperature: float | torch.Tensor = 1.0, return_entropy: bool = False,
                         ignore_index: int = -100):
    """The textbook formula with the full ``[T, V]`` logits in the inputs' dtype (plain
    autograd). Independent of the streamed implementations: tests run it on fp64 copies as
    the ground truth, the benchmark times it as the "naive torch" baseline. No validation.
    ``temperature``: one float or ``[T]``, one per row."""
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(hidden.dtype)[:, None]  # [T, 1]
    logp_all = torch.log_softmax((hidden @ weight.T) / temperature, dim=-1)  # [T, V]
    valid = targets != ignore_index
    picked = logp_all.gather(1, torch.where(valid, targets, 0).long()[:, None])[:, 0]
    logp = torch.where(valid, picked, torch.zeros_like(picked))
    if not return_entropy:
        return logp
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, torch.where(valid, ent, torch.zeros_like(ent))


# ----------------------------------------------------------------------------- torch reference

def fp32_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``hidden [..., H] @ weight [V, H]^T`` as fp32 logits ``[..., V]`` accumulated in fp32,
    for sampling and inference (no gradient). For 16-bit CUDA operands cuBLAS writes fp32
    directly; the upcast GEMM used elsewhere would first copy the weight to fp32 (1.2 GB at
    Qwen3-30B-A3B's vocabulary, every decoded token). The same numbers to summation order."""
    if (hidden.is_cuda and hidden.dtype == weight.dtype
            and weight.dtype in (torch.bfloat16, torch.float16)
            and not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad))):
        flat = torch.mm(hidden.reshape(-1, hidden.shape[-1]), weight.t(), out_dtype=torch.float32)
        return flat.view(*hidden.shape[:-1], weight.shape[0])
    return torch.nn.functional.linear(hidden.float(), weight.float())


def _row_factor(inv_tau: float | torch.Tensor, rows: slice) -> float | torch.Tensor:
    """1/tau of token rows ``rows`` as a factor of their logit tile: the float, or ``[t, 1]``."""
    return inv_tau[rows, None] if isinstance(inv_tau, torch.Tensor) else inv_tau


def _pick(z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """z[t, idx[t]] where 0 <= idx[t] < z.shape[1], else 0.  z: [t, v], idx: [t]."""
    hit = (idx >= 0) & (idx < z.shape[1])
    val = z.gather(1, idx.clamp(0, z.shape[1] - 1)[:, None])[:, 0]
    return torch.where(hit, val, torch.zeros_like(val))


def _autocast_off(fn):
    """``fn`` with autocast off: its fp32 accumulation is the op's contract, and under
    ``torch.autocast(bf16)`` its matmuls would run in bf16 (the backward, outside autocast,
    would then recompute in fp32 against a bf16 log-sum-exp)."""
    @functools.wraps(fn)
    def run(hidden, *args, **kwargs):
        with torch.autocast(hidden.device.type, enabled=False):
            return fn(hidden, *args, **kwargs)
    return run


@_autocast_off
def _torch_partials(hidden, weight, targets, inv_tau, vocab_start, ct, cv) -> torch.Tensor:
    """[4, T] online statistics (m, s, S, z_y) of this weight shard, tile by tile."""
    T = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    stats = torch.zeros(4, T, dtype=acc, device=hidden.device)
    m, s, sz, zy = stats.unbind(0)  # views: updated in place
    m.fill_(-math.inf)
    y = targets.long() - vocab_start  # [T] shard-local ids; other shards' targets fall outside
    for v0 in range(0, weight.shape[0], cv):
        w = weight[v0:v0 + cv].to(acc)  # [cv, H]
        for t0 in range(0, T, ct):
            rows = slice(t0, t0 + ct)
            z = (hidden[rows].to(acc) @ w.T).mul_(_row_factor(inv_tau, rows))  # [ct, cv]
            m_new = torch.maximum(m[rows], z.amax(1))
            alpha = torch.exp(m[rows] - m_new)
            e = (z - m_new[:, None]).exp_()  # [ct, cv]
            s[rows] = s[rows] * alpha + e.sum(1)
            zy[rows] += _pick(z, y[rows] - v0)
            sz[rows] = sz[rows] * alpha + e.mul_(z).sum(1)
            m[rows] = m_new
    return stats


def _dlogits(z, idx, lse, ent, g, h) -> torch.Tensor:
    """dL/dz for a tile, computed in place over z.  z: [t, v]; row vectors: [t]."""
    p = (z - lse[:, None]).exp_()
    dz = z.sub_(lse[:, None]).add_(ent[:, None]).mul_(h[:, None]).add_(g[:, None]).mul_(p).neg_()
    hit = (idx >= 0) & (idx < z.shape[1])
    dz.scatter_add_(1, idx.clamp(0, z.shape[1] - 1)[:, None],
                    torch.where(hit, g, torch.zeros_like(g))[:, None])
    return dz


@_autocast_off
def _torch_grads(hidden, weight, targets, lse, ent, g, h, inv_tau, vocab_start, ct, cv,
                 need_dw):
    """(dx [T, H] in the accumulation dtype, dW [V, H] in weight's dtype or None)."""
    T, H = hidden.shape
    acc = _acc_dtype(hidden.dtype)
    dx = torch.zeros(T, H, dtype=acc, device=hidden.device)
    dw = torch.empty_like(weight) if need_dw else None
    y = targets.long() - vocab_start
    for v0 in range(0, weight.shape[0], cv):
        w = weight[v0:v0 + cv].to(acc)  # [cv, H]
        dw_c = torch.zeros_like(w) if need_dw else None  # fp32 accumulator of this vocab chunk
        for t0 in range(0, T, ct):
            rows = slice(t0, t0 + ct)
            x = hidden[rows].to(acc)  # [ct, H]
            scale = _row_factor(inv_tau, rows)
            z = (x @ w.T).mul_(scale)  # [ct, cv]
            dz = _dlogits(z, y[rows] - v0, lse[rows], ent[rows], g[rows], h[rows]).mul_(scale)
            dx[rows].addmm_(dz, w)
            if need_dw:
                dw_c.addmm_(dz.T, x)
        if need_dw:
            dw[v0:v0 + cv] = dw_c
    return dx, dw


# ----------------------------------------------------------------------------- triton custom ops

def _kernel_tau(inv_temperature: float, inv_temperature_rows: torch.Tensor | None,
                hidden: torch.Tensor):
    """What the kernels take: the ``[T]`` fp32 factors when given (checked: the kernels read
    them as ``ptr + row``, so another dtype, stride or length would be misread), else the one
    float."""
    if inv_temperature_rows is None:
        return inv_temperature
    check_tensor("inv_temperature_rows", inv_temperature_rows, dtypes=(torch.float32,),
                 shape=(hidden.shape[0],), device=hidden.device)
    if not inv_temperature_rows.is_contiguous():
        raise ValueError("inv_temperature_rows must be contiguous (the kernels read row t at "
                         f"offset t), got stride {inv_temperature_rows.stride()}")
    return inv_temperature_rows


@torch.library.custom_op("r1fast::linear_logprob_partials", mutates_args=())
def _triton_partials(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     inv_temperature: float, inv_temperature_rows: torch.Tensor | None,
                     vocab_start: int, tiles: str, chunk_tokens: int,
                     chunk_vocab: int) -> torch.Tensor:
    """[4, T] fp32 statistics (m, s, S, z_y) of this weight shard, vocabulary splits (fused
    tiles) or chunks (GEMM tiles) merged. ``inv_temperature_rows [T]`` fp32, when given,
    replaces ``inv_temperature`` with one factor per row."""
    inv_tau = _kernel_tau(inv_temperature, inv_temperature_rows, hidden)
    if tiles == "gemm":
        from r1fast.kernels import linear_logprob_gemm as G  # lazy: importing needs triton

        parts = G.forward_partials(hidden, weight, targets, inv_tau, vocab_start,
                                   chunk_tokens, chunk_vocab)
        return merge_partials(parts)  # [chunks, 4, T] -> [4, T]
    from r1fast.kernels import linear_logprob as K

    parts = K.forward_partials(hidden, weight, targets, inv_tau, vocab_start)
    return merge_partials(torch.stack(parts, dim=1))  # [splits, 4, T] -> [4, T]


@_triton_partials.register_fake
def _(hidden, weight, targets, inv_temperature, inv_temperature_rows, vocab_start, tiles,
      chunk_tokens, chunk_vocab):
    return hidden.new_empty(4, hidden.shape[0], dtype=torch.float32)


@torch.library.custom_op("r1fast::linear_logprob_grads", mutates_args=())
def _triton_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  lse: torch.Tensor, ent: torch.Tensor, grad_logp: torch.Tensor,
                  grad_ent: torch.Tensor, inv_temperature: float,
                  inv_temperature_rows: torch.Tensor | None, vocab_start: int,
                  chunk_tokens: int, chunk_vocab: int, need_weight_grad: bool,
                  tiles: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [T, H] fp32, dW [V, H] in weight's dtype, or [0, H] when not needed)."""
    if tiles == "gemm":
        from r1fast.kernels import linear_logprob_gemm as K
    else:
        from r1fast.kernels import linear_logprob as K

    dx, dw = K.backward(hidden, weight, targets, lse, ent, grad_logp, grad_ent,
                        _kernel_tau(inv_temperature, inv_temperature_rows, hidden), vocab_start,
                        chunk_tokens, chunk_vocab, need_weight_grad=need_weight_grad)
    return dx, dw if need_weight_grad else weight.new_empty(0, weight.shape[1])


@_triton_grads.register_fake
def _(hidden, weight, targets, lse, ent, grad_logp, grad_ent, inv_temperature,
      inv_temperature_rows, vocab_start, chunk_tokens, chunk_vocab, need_weight_grad, tiles):
    rows = weight.shape[0] if need_weight_grad else 0
    return (hidden.new_empty(hidden.shape, dtype=torch.float32),
            weight.new_empty(rows, weight.shape[1]))


@torch.library.custom_op("r1fast::linear_logprob", mutates_args=())
def _triton_fused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  inv_temperature: float, inv_temperature_rows: torch.Tensor | None,
                  ignore_index: int, chunk_tokens: int, chunk_vocab: int,
                  tiles: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse), each [T] fp32: the single-rank Triton path."""
    stats = _triton_partials(hidden, weight, targets, inv_temperature, inv_temperature_rows, 0,
                             tiles, chunk_tokens, chunk_vocab)
    return _finish(stats, targets == ignore_index, None)


@_triton_fused.register_fake
def _(hidden, weight, targets, inv_temperature, inv_temperature_rows, ignore_index,
      chunk_tokens, chunk_vocab, tiles):
    return tuple(hidden.new_empty(hidden.shape[0], dtype=torch.float32) for _ in range(3))


def _fused_setup(ctx, inputs, output):
    hidden, weight, targets, inv_tau, inv_tau_rows, ignore_index, ct, cv, tiles = inputs
    _, ent, lse = output
    ctx.save_for_backward(hidden, weight, targets, lse, ent, inv_tau_rows)
    ctx.args = (inv_tau, ignore_index, ct, cv, tiles)


def _fused_backward(ctx, grad_logp, grad_ent, grad_lse):
    hidden, weight, targets, lse, ent, inv_tau_rows = ctx.saved_tensors
    inv_tau, ignore_index, ct, cv, tiles = ctx.args
    g, h = _row_grads(grad_logp, grad_ent, targets == ignore_index, lse)
    need_dw = ctx.needs_input_grad[1]
    dx, dw = _triton_grads(hidden, weight, targets, lse, ent, g, h, inv_tau, inv_tau_rows, 0,
                           ct, cv, need_dw, tiles)
    return (dx.to(hidden.dtype), dw if need_dw else None) + (None,) * 7


_triton_fused.register_autograd(_fused_backward, setup_context=_fused_setup)


# ----------------------------------------------------------------------------- autograd (torch, TP)

def _split_tau(inv_tau: float | torch.Tensor) -> tuple[float, torch.Tensor | None]:
    """(the float, None) or (1.0, the ``[T]`` factors): the custom ops' two arguments."""
    return (1.0, inv_tau) if isinstance(inv_tau, torch.Tensor) else (inv_tau, None)


class _LinearLogprobFn(torch.autograd.Function):
    """Torch reference (any group) and the Triton path under vocabulary parallelism: partial
    statistics of this shard -> merge over the group -> outputs; backward per shard, dx
    all-reduced. ``backend`` is "torch" or "triton" (with ``tiles`` "fused" or "gemm");
    ``inv_tau`` is one float or ``[T]`` factors (no gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_tau, ignore_index, group, backend, ct, cv,
                tiles="fused"):
        rank = dist.get_rank(group) if group is not None else 0
        vocab_start = rank * weight.shape[0]
        if backend == "torch":
            stats = _torch_partials(hidden, weight, targets, inv_tau, vocab_start, ct, cv)
        else:
            stats = _triton_partials(hidden, weight, targets, *_split_tau(inv_tau), vocab_start,
                                     tiles, ct, cv)
        ignored = targets == ignore_index
        logp, ent, lse = _finish(stats, ignored, group)
        rows = inv_tau if isinstance(inv_tau, torch.Tensor) else None
        ctx.save_for_backward(hidden, weight, targets, lse, ent, rows)
        ctx.args = (None if rows is not None else inv_tau, ignore_index, group, backend, ct, cv,
                    vocab_start, tiles)
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, targets, lse, ent, rows = ctx.saved_tensors
        inv_tau, ignore_index, group, backend, ct, cv, vocab_start, tiles = ctx.args
        inv_tau = rows if rows is not None else inv_tau
        g, h = _row_grads(grad_logp, grad_ent, targets == ignore_index, lse)
        need_dw = ctx.needs_input_grad[1]
        if backend == "torch":
            dx, dw = _torch_grads(hidden, weight, targets, lse, ent, g, h, inv_tau, vocab_start,
                                  ct, cv, need_dw)
        else:
            dx, dw = _triton_grads(hidden, weight, targets, lse, ent, g, h, *_split_tau(inv_tau),
                                   vocab_start, ct, cv, need_dw, tiles)
        if group is not None:
            dist.all_reduce(dx, group=group)  # every shard's vocabulary contributes to dx
        return (dx.to(hidden.dtype), dw if need_dw else None) + (None,) * 8


# ----------------------------------------------------------------------------- public op

def _check_chunk(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or a positive int, got {value!r}")


def _validate(hidden, weight, targets, temperature, return_entropy, ignore_index, tp_group,
              chunk_tokens, chunk_vocab, validate=None) -> None:
    check_tensor("hidden", hidden, ndim=2, dtypes=_TORCH_DTYPES)
    T, H = hidden.shape
    if isinstance(weight, torch.Tensor) and weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have hidden's dtype ({hidden.dtype}), got {weight.dtype} "
                         f"(a bf16 body with an fp32 head: cast hidden, the smaller tensor, "
                         f"e.g. hidden.to(weight.dtype))")
    check_tensor("weight", weight, ndim=2, dtypes=(hidden.dtype,), shape=(None, H),
                 device=hidden.device)
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row, got shape [0, H]")
    check_tensor("targets", targets, ndim=1, dtypes=INDEX_DTYPES, shape=(T,), device=hidden.device)
    _check_temperature(temperature, T, hidden.device)
    if not isinstance(return_entropy, bool):
        raise ValueError(f"return_entropy must be a bool, got {return_entropy!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    _check_chunk("chunk_tokens", chunk_tokens)
    _check_chunk("chunk_vocab", chunk_vocab)
    world = 1
    if tp_group is not None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("tp_group was given but torch.distributed is not initialized")
        world = dist.get_world_size(tp_group)
    if not checks_values(validate, targets.device):  # a host sync on a GPU: debug mode only
        return
    check_temperature_values(temperature, targets, ignore_index)
    if world > 1:
        _check_even_shards(weight, tp_group, world)
    v_total = weight.shape[0] * world
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= v_total))  # [T]
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets must be in [0, {v_total}) (the vocabulary size) or equal "
                         f"ignore_index={ignore_index}; got targets[{i}] = {int(targets[i])}")


def _check_even_shards(weight: torch.Tensor, group, world: int) -> None:
    """Every rank of ``group`` holds as many vocabulary rows: rank r's shard starts at r x its
    own row count, so unequal shards would score targets against the wrong rows (collective;
    debug mode on a GPU, as the other value checks)."""
    on_host = dist.get_backend(group) != "nccl"
    mine = torch.tensor([weight.shape[0]], device="cpu" if on_host else weight.device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    rows = [int(n) for n in sizes]
    if len(set(rows)) > 1:
        raise ValueError(f"weight: the vocabulary shards of tp_group must be equal (Megatron pads "
                         f"the vocabulary to a multiple of the TP size), got {rows} rows per rank")


def _check_temperature(temperature, T: int, device: torch.device) -> None:
    """One finite float > 0, or a ``[T]`` float tensor on ``device`` without a gradient (its
    values are checked with the targets', in debug mode)."""
    if isinstance(temperature, torch.Tensor):
        check_tensor("temperature", temperature, ndim=1, dtypes=FLOAT_DTYPES, shape=(T,),
                     device=device)
        if temperature.requires_grad:
            raise ValueError("temperature requires grad, but linear_logprob gives it no "
                             "gradient; pass temperature.detach()")
    elif torch.compiler.is_compiling() and isinstance(temperature, (int, float)) \
            and not isinstance(temperature, bool):
        # a traced float (dynamic=True) is symbolic: math.isfinite cannot read it, a runtime
        # check in the graph can (inf > 0 passes it: the eager check below catches that)
        torch._check(temperature > 0, lambda: "temperature must be a finite number > 0")
    elif isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError("temperature must be a finite number > 0 or a [T] float tensor, got "
                         f"{temperature!r}")


def check_temperature_values(temperature, targets: torch.Tensor, ignore_index: int) -> None:
    """A tensor temperature is finite and > 0 on every row that is not ignored (a host sync:
    callers run it in debug mode only)."""
    if not isinstance(temperature, torch.Tensor):
        return
    bad = (targets != ignore_index) & ~(torch.isfinite(temperature) & (temperature > 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"temperature must be finite and > 0 on every row that is not "
                         f"ignored; got temperature[{i}] = {float(temperature[i])}")


def inverse_temperature(temperature: float | torch.Tensor, targets: torch.Tensor,
                        ignore_index: int, dtype: torch.dtype = torch.float32
                        ) -> float | torch.Tensor:
    """``1 / temperature``: a float, or a contiguous ``[T]`` tensor of ``dtype`` with 1 on the
    ignored rows (whatever their temperature: a 0 there must not make their discarded logits,
    and through them the gradients, NaN)."""
    if not isinstance(temperature, torch.Tensor):
        return 1.0 / float(temperature)
    inv = torch.reciprocal(temperature.detach().to(dtype))  # [T]
    return torch.where(targets == ignore_index, torch.ones_like(inv), inv).contiguous()


def triton_chunks(T: int, chunk_tokens, chunk_vocab, tiles: str) -> tuple[int, int]:
    """(chunk_tokens, chunk_vocab) the Triton path of ``T`` tokens uses for ``tiles``; None
    takes ``DEFAULT_CHUNKS`` (the kernels clip them to T and V)."""
    ct = chunk_tokens or DEFAULT_CHUNKS.triton_tokens
    if chunk_vocab is None:
        # GEMM tiles hold fp32 logits: half the columns keep the workspace's bytes those of
        # DEFAULT_CHUNKS.triton_workspace 16-bit elements
        elems = DEFAULT_CHUNKS.triton_workspace // (2 if tiles == "gemm" else 1)
        chunk_vocab = max(256, elems // max(1, min(T, ct)) // 256 * 256)
    return ct, chunk_vocab


def linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   temperature: float | torch.Tensor = 1.0, return_entropy: bool = False,
                   ignore_index: int = -100, *, tp_group=None, impl: str = "auto",
                   chunk_tokens: int | None = None, chunk_vocab: int | None = None,
                   tiles: str = "fused", validate: bool | None = None):
    """Log-probability (and entropy) of ``targets`` under ``softmax(hidden @ weight.T / tau)``.

    Args:
        hidden: ``[T, H]`` fp32/bf16/fp16 (fp64 with ``impl="torch"``) hidden states.
        weight: ``[V, H]`` LM head of the same dtype (this rank's shard under ``tp_group``).
        targets: ``[T]`` int64/int32 global vocabulary ids, or ``ignore_index``.
        temperature: ``tau > 0``; logits are divided by it. One float, or a ``[T]`` float
            tensor with one per row (per-sample temperatures, repeated over each sample's
            tokens; no gradient). The kernels take ``1 / tau`` in fp32 (fp64 for fp64 inputs).
        return_entropy: also return the entropy of each row's distribution.
        ignore_index: rows with this target give logp 0 and entropy 0 and no gradient.
        tp_group: process group of a vocabulary-parallel LM head (Megatron layout), or None.
        impl: "auto" | "torch" | "triton" (see ``r1fast.ops._dispatch``).
        chunk_tokens, chunk_vocab: tile sizes (torch: logit tiles; triton: the backward's dz
            workspace, and the forward's logit tiles with ``tiles="gemm"``); None uses
            ``DEFAULT_CHUNKS``.
        tiles: how ``impl="triton"`` computes the logits: ``"fused"`` (Triton GEMM tiles with
            the softmax in their epilogue; the logits never reach memory) or ``"gemm"``
            (cuBLAS fp32 logit tiles, reduced by Triton row kernels; see
            ``r1fast.kernels.linear_logprob_gemm``). Any other impl takes only ``"fused"``.
        validate: check that every target is in the vocabulary or ``ignore_index``, and a
            tensor temperature finite and > 0 on the other rows (a host sync on a GPU);
            None: always for CPU tensors, on a GPU as ``R1FAST_DEBUG_CHECKS`` says (off: an
            out-of-range target is undefined behaviour, as indexing out of range).

    Returns ``logp [T]`` float32 (float64 for fp64 inputs), or ``(logp, entropy)``. Gradients
    flow to ``hidden`` and ``weight`` in their dtypes; dW is accumulated in fp32.
    """
    _validate(hidden, weight, targets, temperature, return_entropy, ignore_index, tp_group,
              chunk_tokens, chunk_vocab, validate)
    if tiles not in _TILES:
        raise ValueError(f"tiles must be one of {_TILES}, got {tiles!r}")
    # auto on a GPU picks Triton, which has no fp64: fp64 inputs then take the torch path
    chosen = resolve_impl(_OP, impl, hidden.device, supported=(
        "torch", "triton") if impl != "auto" or hidden.dtype in _TRITON_DTYPES else ("torch",))
    if tiles != "fused" and chosen != "triton":
        raise ValueError(f"tiles={tiles!r} is a way of running impl='triton'; impl={impl!r} "
                         f"runs {chosen!r} here, which takes only tiles='fused'")
    inv_tau = inverse_temperature(temperature, targets, ignore_index, _acc_dtype(hidden.dtype))
    if chosen == "torch":
        ct = chunk_tokens or DEFAULT_CHUNKS.torch_tokens
        cv = chunk_vocab or DEFAULT_CHUNKS.torch_vocab
        logp, ent = _LinearLogprobFn.apply(hidden, weight, targets, inv_tau, ignore_index,
                                           tp_group, "torch", ct, cv)
    else:
        if hidden.dtype not in _TRITON_DTYPES:
            raise ValueError("hidden must have dtype in (float32, bfloat16, float16) for "
                             f"impl='triton', got {str(hidden.dtype).replace('torch.', '')}")
        ct, cv = triton_chunks(hidden.shape[0], chunk_tokens, chunk_vocab, tiles)
        if tp_group is None:
            logp, ent, _ = _triton_fused(hidden, weight, targets, *_split_tau(inv_tau),
                                         ignore_index, ct, cv, tiles)
        else:
            logp, ent = _LinearLogprobFn.apply(hidden, weight, targets, inv_tau, ignore_index,
                                               tp_group, "triton", ct, cv, tiles)
    return (logp, ent) if return_entropy else logp
