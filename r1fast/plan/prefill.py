"""The rollout prefill's transient memory: the planner's ``prefill_bytes`` term.

The KV-cache decoder (r1fast.rollout.kv_cache) starts a rollout by running every prompt of the
DP rank through the model in no-grad forwards: ``rows x width`` query tokens at a time,
``width`` the whole prompt length or, with ``rollout.prefill_tokens``, as many positions as fit
that many tokens (r1fast.rollout.kv_cache.prefill_width), each attending to ``L`` cached slots
(the prompt length, for the last slice). Nothing is kept for a backward, but one layer's tensors
over all those tokens are alive at once while it runs, and for a large prompt batch that is a
lot: DeepSeek-V3's routed experts hold four copies of the hidden state per routed slot (k = 8),
0.46 MB per prompt token on a rank without sequence parallelism, 28 GiB for 64k tokens. This
module counts the peak of one forward on one rank from what the decoder's layers make (held to
measurements of r1fast.plan.measure.measure_peak_alloc_bytes in tests/plan/test_prefill.py):

- always: the residual stream (the layer's input, the sum after attention, the output:
  ``3 H / sp`` per token) and the decoder's boolean mask ``[rows, 1, width, L]``;
- the larger of the two phases of the stage's largest layer:
  - attention, per query token: the norm's output; GQA: ``linear_qkv``'s output, RoPE's
    product and concatenation for q and k, the query laid out per key/value group, the output
    and its re-layout (r1fast.rollout.attention); MLA: the down projections and their norms,
    the latent written to the cache, q and its fp32 copies, the fp32 output and its cast
    (r1fast.rollout.mla_latent); then ``linear_proj``'s output, and the mask as SDPA gets it
    (negated, tiled over a group's heads, as a float bias). MLA also, in the form the decoder
    picks for ``width`` queries over ``L`` keys: expanded, per key slot the fp32 latent,
    per-head keys (and their concatenation with the RoPE part) and values; absorbed, per query
    the latent-space query and two fp32 ``[heads, L]`` score tensors at a time. On the local
    spec (a CPU) the expanded form's SDPA takes its math path (unequal q/v head dims) and holds
    fp32 scores and their sum with the bias; on a GPU the memory-efficient kernel holds none
    (not yet measured there);
  - MLP: the norm's output; a dense SwiGLU's ``[2F]``, ``[F]``, ``[F]`` and output; an MoE
    layer's router (fp32 logits, probabilities, scores; top-k ids and weights), four copies of
    the hidden state per routed slot (the permuted input, each expert's output, the
    dispatcher's concatenations), one expert's SwiGLU at a time (megatron's sequential
    experts: ``4 F`` for its ``k / E`` share of the tokens, balanced load) or, where the
    rollout runs the grouped expert kernels (``rollout.experts``: on a GPU by default), their
    activation ``[k, F]`` per token at once, the un-permuted fp32 sum, and the shared expert.

Per-token terms follow r1fast.plan.activations: the residual stream and routed tokens per
``1 / sp`` of the tokens under sequence parallelism, attention tensors per ``1 / tp`` of the
heads. Torch's RMSNorm on the local spec upcasts a 16-bit input to fp32 (two copies).
"""
from __future__ import annotations

import math

from r1fast.policy.config import ModelConfig
from r1fast.rollout.mla_latent import expanded_is_cheaper

__all__ = ["prefill_bytes"]


def _norm_out(m: ModelConfig, sp: int, act: int, local: bool) -> float:
    """A pre-attention / pre-MLP norm's output (gathered under SP), per token."""
    upcast = 2 * m.hidden_size * 4 / sp if local and act < 4 else 0.0
    return m.hidden_size * act + upcast


def _gqa_attention(m: ModelConfig, tp: int, act: int, L: int) -> float:
    """Grouped-query attention through r1fast's CachedAttention, per query token."""
    d, nq, nkv = m.kv_channels, m.num_attention_heads / tp, m.kv_heads / tp
    rep = m.num_attention_heads // m.kv_heads
    out = (nq + 2 * nkv) * d * act  # linear_qkv's output
    out += 2 * (nq + nkv) * d * act  # RoPE: product and concatenation, for q and k
    out += 3 * nq * d * act  # the query per group, the output, its re-layout
    return out + L + (rep * L if rep > 1 else 0) + rep * L * act  # negated, tiled, float bias


def _mla_attention(m: ModelConfig, tp: int, act: int, width: int, L: int,
                   local: bool) -> float:
    """MLA through r1fast's LatentMLAAttention, per query token (key-slot terms included as
    ``L / width`` per query)."""
    n, c, r = m.num_attention_heads / tp, m.kv_lora_rank, m.qk_rope_head_dim
    nope, dv = m.qk_nope_head_dim, m.v_head_dim
    out = 2 * m.q_lora_rank * act if m.q_lora_rank is not None else 0.0  # q down, its norm
    out += n * (nope + r) * act + n * r * act  # q up, q's RoPE part after RoPE
    upcast = 4 if act < 4 else 0  # .float() copies a 16-bit tensor, returns an fp32 one
    out += n * (nope + r) * upcast  # q in fp32
    out += (2 * (c + r) + c + r) * act  # kv down, c's norm, k's RoPE part, the cache entry
    out += n * dv * (2 * 4 + act)  # fp32 output and its re-layout, cast to the activations
    out += L + L * 4  # the mask: negated, and as an fp32 bias (the attention runs in fp32)
    keys = L / width  # key slots per query token
    out += keys * (c + r) * upcast  # the cached latents in fp32
    if expanded_is_cheaper(c, nope, dv, width, L):
        out += n * (nope + r) * 4 + keys * n * (nope + (nope + r) + dv) * 4  # q; k, k+rope, v
        if local:
            out += 2 * n * L * 4  # SDPA's math path: scores, scores + bias
    else:
        out += n * (2 * c + r) * 4 + 2 * n * L * 4 + n * dv * 4  # q absorbed; 2 scores; out
    return out


def _attention_phase(m: ModelConfig, tp: int, sp: int, act: int, width: int, L: int,
                     local: bool) -> float:
    """Bytes per query token alive while one layer attends (besides the residual stream)."""
    out = _norm_out(m, sp, act, local)
    if m.is_mla:
        out += _mla_attention(m, tp, act, width, L, local)
    else:
        out += _gqa_attention(m, tp, act, L)
    return out + m.hidden_size * act / sp  # linear_proj's output


def _mlp_phase(m: ModelConfig, layer: int, tp: int, sp: int, act: int, local: bool,
               grouped: bool) -> float:
    """Bytes per token alive while one layer's MLP runs (besides the residual stream)."""
    H = m.hidden_size
    out = _norm_out(m, sp, act, local)
    if not m.is_moe or layer in m.dense_layers:
        return out + 4 * m.ffn_hidden_size / tp * act + H * act / sp
    E, k, F = m.num_experts, m.moe_router_topk, m.moe_ffn_hidden_size
    out += (3 * E * 4 + k * 16) / sp  # router: fp32 logits, probabilities, scores; ids, weights
    out += 2 * E * 8 / sp  # the dispatcher's row search: int64 running counts and keys [T, E]
    out += k * 4 * H * act / sp  # permuted input, expert outputs, the dispatcher's concatenations
    if grouped:  # the grouped kernels' activation h [routed slots, F] (r1fast.ops.moe_experts)
        out += k * F * act / sp
    else:  # one sequential expert's SwiGLU at a time (balanced load)
        out += k / E * 4 * F * act / sp
    out += H * 4 / sp  # the un-permuted sum
    if m.shared_expert_size is not None:
        out += 4 * m.shared_expert_size / tp * act + H * act / sp
    return out


def prefill_bytes(m: ModelConfig, tp: int, sp: int, act: int, layers: tuple[int, int],
                  rows: int, width: int, attn_len: int, spec: str = "te", *,
                  grouped_experts: bool = False) -> int:
    """Peak transient bytes of one prefill forward over ``rows x width`` query tokens attending
    to ``attn_len`` slots, on one rank holding layers ``[first, last)`` (module doc); 0 for no
    layers. ``spec``: "te" (a GPU) or "local" (megatron's local layers, as on a CPU).
    ``grouped_experts``: the routed experts run as the grouped kernels (``rollout.experts``)."""
    lo, hi = layers
    if hi <= lo or rows < 1 or width < 1:
        return 0
    local = spec != "te"
    attention = _attention_phase(m, tp, sp, act, width, attn_len, local)
    phase = max(max(attention, _mlp_phase(m, i, tp, sp, act, local, grouped_experts))
                for i in range(lo, hi))
    per_token = 3 * m.hidden_size * act / sp + attn_len + phase
    return int(math.ceil(per_token * rows * width))
