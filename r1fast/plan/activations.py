"""Saved activations of one training micro-batch: the planner's activation terms, per recompute
mode, counted tensor by tensor from what megatron-core (and r1fast's own MLA core attention and
router) keep for the backward.

What "saved" means here: the distinct storages autograd holds between a tensor's forward and its
backward (``torch.autograd.graph.saved_tensors_hooks`` sees every one;
:func:`r1fast.plan.measure.measure_peak_saved_bytes` measures them). Parameters do not count.

Peak, per recompute mode (``ParallelConfig.recompute``):

- ``none`` and ``selective``: the backward only frees what the forward saved, so the peak is the
  end of the forward: every layer's saved tensors plus the head's. (Selective re-runs one core
  attention at a time in the backward; by then the layer's MLP and the head are freed, which
  outweighs the re-run's [s, s] probabilities except at very long sequences; not modelled.)
- ``full``: the forward keeps only each layer's input (megatron's uniform method, one layer per
  checkpoint); the backward re-runs one layer with everything saved while the head is already
  freed. Peak = inputs + max(head, one layer's saved tensors less its input, which is the same
  storage as the kept input). 1F1B keeps the inputs of every micro-batch in flight, but only one
  layer is re-run at a time (:func:`held_activation_bytes`).

Layer implementations (``spec``): "te" (Transformer Engine on a GPU: flash attention,
fused RMSNorm) and "local" (megatron's local layers and r1fast's MLA core attention, as on
CPU: [s, s] probabilities, k/v repeated to every query head, torch RMSNorm also keeping its
normalised input); "local-segments" is "local" for packed micro-batches, whose grouped-query
attention runs per sequence through SDPA (r1fast.policy.packed_attention), keeping a
log-sum-exp per query head instead of [s, s] probabilities. Packed MLA also attends per
sequence, but SDPA takes its math path for MLA's unequal q/v head dims and keeps each
sequence's [L, L] probabilities: the plan counts L scores per token, L the longest a
sequence can be (``segment_len``; measured within 0.1% on the tiny MLA recipe with every
sequence at that length). The local counts are
held to measurements in tests/plan/test_plan.py and tests/policy/test_recompute.py; the TE
ones are counted from TE's documented saves.

Per-token terms use ``sp`` (tp under sequence parallelism, else 1): the residual stream is
``[T / sp, H]`` and megatron's TP linears keep their SP-local input; attention tensors are
``[T, width / tp]``; routed-expert tensors ``[T k / sp, width]`` (balanced load). Terms per
micro-batch rather than per token ([s, s] causal masks, [s, 1, 1, d] RoPE tables) are divided
by ``rows``, the sequences of the micro-batch.
"""
from __future__ import annotations

import math

from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.config_checks import runs_grouped

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _norm(width: float, rows: float, act: int, local: bool) -> float:
    """RMSNorm over ``width`` for ``rows`` rows per token: its input and 1/rms (fp32). torch's
    rms_norm (local) also keeps the normalised input, in fp32: with r1fast's fp32 norm weights
    a 16-bit input takes torch's unfused path, which keeps an fp32 copy of it. The output
    (normalised x weight) is kept by its consumer."""
    return rows * (2 * width * 4 + 4) if local else rows * (width * act + 4)


def _gqa_attention_bytes(m: ModelConfig, tp: int, act: int, seq_len: int, rows: float,
                         selective: bool, local: bool, segments: bool = False) -> float:
    """Grouped-query attention (megatron's SelfAttention), per token on one rank."""
    d, nq, nkv = m.kv_channels, m.num_attention_heads / tp, m.kv_heads / tp
    rep = m.num_attention_heads > m.kv_heads  # k/v shared by several query heads
    out = 4 * d * act  # RoPE cos/sin of q and k: r1fast passes an [s, b, 1, d] table
    # Is the linear_qkv output [T, (nq + 2 nkv) d] itself kept? The q/k norms' inputs are
    # views of it; else v is, when attention keeps it unrepeated or as a checkpoint input.
    upcast = local and act < 4  # torch's rms_norm keeps fp32 copies of 16-bit inputs
    qkv_kept = (m.qk_layernorm and not upcast) or not local or not rep or selective
    out += (nq + 2 * nkv) * d * act if qkv_kept else 0.0
    if m.qk_layernorm:
        out += _norm(d, nq + nkv, act, local)
        if not upcast:  # their inputs: views of linear_qkv's output (counted above), except q
            out -= (nq + nkv) * d * act  # when megatron's reshape of the split q copies it
            out += nq * d * act if rep and nkv > 1 else 0.0
    if local:
        if selective:  # the checkpoint keeps q and k after RoPE (v is a view of linear_qkv)
            out += (nq + nkv) * d * act
        else:  # q; k and v repeated to every query head; [s, s] probabilities and causal mask
            out += nq * d * act + (2 * nq * d * act if rep else nkv * d * act)
            if segments:  # per-sequence SDPA: a log-sum-exp per query head, no [s, s] terms
                out += nq * 4
            else:
                out += nq * seq_len * (4 + (act if act < 4 else 0)) + seq_len / rows
    else:  # flash attention keeps q and k after RoPE (v is a view), + its fp32 log-sum-exp
        out += (nq + nkv) * d * act + (0.0 if selective else nq * 4)
    return out + nq * d * act  # core attention output = linear_proj input


def _mla_attention_bytes(m: ModelConfig, tp: int, sp: int, act: int, seq_len: int,
                         rows: float, selective: bool, local: bool,
                         segment_len: int = 0) -> float:
    """Multi-head latent attention (megatron's MLASelfAttention with r1fast's duplicated down
    projections and, locally, r1fast's core attention), per token on one rank.
    ``segment_len``: a packed row's sequences attend one by one (SDPA's math path), keeping
    ``[L, L]`` probabilities each, L at most this; 0 for one [s, s] block per row."""
    n = m.num_attention_heads / tp
    dqk, dv = m.qk_head_dim, m.v_head_dim
    out = 0.0
    if m.q_lora_rank is not None:  # q norm (input = q down output) + its output (q up input)
        out += _norm(m.q_lora_rank, 1 / sp, act, local) + m.q_lora_rank * act / sp
    # kv norm: its input is a view of the kv down output [kv_lora + rope] (unless torch's norm
    # keeps an fp32 copy of the kv_lora part); + its output, the kv up input
    out += _norm(m.kv_lora_rank, 1 / sp, act, local) + m.kv_lora_rank * act / sp
    out += 0.0 if local and act < 4 else m.qk_rope_head_dim * act / sp
    out += 4 * m.qk_rope_head_dim * act / rows  # RoPE cos/sin of q and k: [s, 1, 1, rope]
    if local and not selective:  # fp32 q, k; v; fp32 probabilities (+ a 16-bit copy); mask
        out += 2 * n * dqk * 4 + n * dv * act
        if segment_len:  # per sequence: L scores per token (worst case: every L at most)
            out += n * segment_len * (4 + (act if act < 4 else 0))
        else:
            out += n * seq_len * (4 + (act if act < 4 else 0)) + seq_len / rows
    else:  # q, k after RoPE and v: the checkpoint's inputs, or what flash attention keeps
        out += (2 * n * dqk + n * dv) * act
        out += 0.0 if (local or selective) else n * 4  # flash attention's log-sum-exp
    return out + n * dv * act  # core attention output = linear_proj input


def _router_bytes(m: ModelConfig, act: int, mb_tokens: float) -> float:
    """Router and token permutation per token (before the /sp), as r1fast's moe_route (torch
    path) and megatron's alltoall dispatcher keep them; ``mb_tokens``: tokens per micro-batch."""
    H, E, k = m.hidden_size, m.num_experts, m.moe_router_topk
    out = 0.0
    if act < 4:  # the router runs in fp32: copies of its input and (once) of its weight
        out += 4 * H + 4 * E * H / mb_tokens
    out += 4 * E + 8 * E + 4 * k  # scores, top-k index storage (int64 over E), weights
    out += E + 4 * E + 8 * k  # routing map (bool), probabilities [E, T], permutation indices
    if m.aux_loss_coef > 0:  # the aux loss's scores (+ the row of each token: seq_aux_loss)
        out += 4 * E + (8 if m.aux_loss_type == "seq_aux_loss" else 0)
    if m.router_score == "sigmoid" and m.router_normalize is not False:
        out += 4  # the sum the k weights are normalised by
    return out


def _mlp_activation_bytes(m: ModelConfig, layer: int, tp: int, sp: int, act: int,
                          mb_tokens: float, grouped_experts: bool = False) -> float:
    H = m.hidden_size
    if not m.is_moe or layer in m.dense_layers:
        # SwiGLU: its input [H / sp], fc1 output [2F], silu output [F], linear half [F],
        # fc2 input [F]
        return H / sp * act + 5 * m.ffn_hidden_size / tp * act
    k, Fm = m.moe_router_topk, m.moe_ffn_hidden_size
    # the input (pre-MLP norm output) is kept by the shared expert, or by the router when it
    # needs no fp32 copy; the experts keep permuted copies
    out = H / sp * act if m.shared_expert_size is not None or act == 4 else 0.0
    out += _router_bytes(m, act, mb_tokens / sp) / sp
    # per routed token: expert input [H], fc1 output [2 Fm], its probability (fp32); the loop
    # also keeps silu output, linear half, product, probability-scaled fc2 input [Fm each],
    # the grouped kernels only h [Fm] (r1fast.ops.moe_experts)
    out += k * ((H + 2 * Fm) * act + (1 if grouped_experts else 4) * Fm * act + 4) / sp
    if m.shared_expert_size is not None:
        out += 5 * m.shared_expert_size / tp * act
    return out


def layer_activation_bytes(m: ModelConfig, layer: int, tp: int, sp: int, act: int,
                           seq_len: int, mode: str, spec: str = "te", rows: float = 1,
                           segment_len: int = 0, grouped_experts: bool = False) -> float:
    """Bytes saved for backward per token of the micro-batch by one layer on one rank, in
    recompute ``mode`` ("full": only the layer input), ``rows`` sequences per micro-batch,
    the routed experts through the loop or the grouped kernels. Unfused SwiGLU and RoPE:
    r1fast turns the apex/TE fusions off for exactness."""
    H = m.hidden_size
    if mode == "full":
        return H / sp * act
    selective, local = mode == "selective", spec != "te"
    # two RMSNorms on the residual stream; the first one's output (attention's input) here,
    # the second one's in the MLP
    out = 2 * _norm(H, 1 / sp, act, local) + H / sp * act
    if m.is_mla:
        out += _mla_attention_bytes(m, tp, sp, act, seq_len, rows, selective, local,
                                    segment_len if spec == "local-segments" else 0)
    else:
        out += _gqa_attention_bytes(m, tp, act, seq_len, rows, selective, local,
                                    spec == "local-segments")
    return out + _mlp_activation_bytes(m, layer, tp, sp, act, rows * seq_len, grouped_experts)


def head_activation_bytes(m: ModelConfig, sp: int, act: int, spec: str) -> float:
    """Final RMSNorm (input, 1/rms, local: normalised) and the head's input [T, H] (gathered),
    per token on the last stage."""
    H = m.hidden_size
    return _norm(H, 1 / sp, act, spec != "te") + H * act


def _stage_terms(m: ModelConfig, par: ParallelConfig, stage: int, seq_len: int, mode: str,
                 spec: str, rows: float, segment_len: int = 0) -> tuple[float, float]:
    """(kept, transient) bytes per token of one micro-batch on ``stage``: ``kept`` stays from
    the forward to the backward; ``transient`` exists once per stage at a time (full
    recompute's re-run layer or the head, whichever is larger)."""
    tp, pp = par.tp, par.pp
    sp = tp if par.use_sequence_parallel(m) else 1
    act = _BYTES[m.params_dtype]
    split = par.stage_layers(m.num_layers)
    lo = sum(split[:stage])
    hi = lo + split[stage]
    head = head_activation_bytes(m, sp, act, spec) if stage == pp - 1 else 0.0
    grouped = runs_grouped(par.experts, on_gpu=spec == "te")  # parallel.experts
    kept = 8.0 if stage == 0 else 0.0  # the embedding keeps the token ids (int64)
    kept += sum(layer_activation_bytes(m, i, tp, sp, act, seq_len, mode, spec, rows, segment_len,
                                       grouped) for i in range(lo, hi))
    if mode != "full":
        return kept + head, 0.0
    if not m.is_mla:
        kept += m.kv_channels * 4  # the RoPE table r1fast passes, a checkpoint input
    # the re-run layer's first norm keeps the kept input itself (same storage), unless torch's
    # norm keeps an fp32 copy of a 16-bit input
    shared = 0.0 if spec != "te" and act < 4 else m.hidden_size * act / sp
    rerun = max(layer_activation_bytes(m, i, tp, sp, act, seq_len, "none", spec, rows,
                                       segment_len, grouped)
                for i in range(lo, hi)) - shared
    return kept, max(head, rerun)


def stage_activation_bytes(m: ModelConfig, par: ParallelConfig, stage: int, tokens: int,
                           seq_len: int, mode: str, spec: str = "te",
                           segment_len: int = 0) -> int:
    """Peak saved activations of one micro-batch of ``tokens`` tokens (sequences of
    ``seq_len``) on ``stage``, with recompute ``mode``; ``segment_len``: with spec
    "local-segments", the longest sequence a packed row holds."""
    kept, transient = _stage_terms(m, par, stage, seq_len, mode, spec, tokens / seq_len,
                                   segment_len)
    return int(math.ceil((kept + transient) * tokens))


def held_activation_bytes(m: ModelConfig, par: ParallelConfig, stage: int, tokens: int,
                          seq_len: int, mode: str, spec: str, in_flight: int,
                          segment_len: int = 0) -> int:
    """Peak saved activations on ``stage`` with ``in_flight`` micro-batches between their
    forward and backward (1F1B): each keeps its saved tensors; full recompute's re-run layer
    exists once."""
    kept, transient = _stage_terms(m, par, stage, seq_len, mode, spec, tokens / seq_len,
                                   segment_len)
    return int(math.ceil((kept * in_flight + transient) * tokens))
