"""MLA terms of the per-GPU memory model (r1fast.plan.memory): parameters and saved
activations of megatron's MLASelfAttention as r1fast builds it (duplicated down projections,
r1fast.policy.mla)."""
from __future__ import annotations

from r1fast.policy.config import ModelConfig


def mla_params(m: ModelConfig, tp: int) -> int:
    """MLA: input norm, q (down H x q_lora + its norm + up, or one projection), kv down
    H x (kv_lora + rope) + its norm, kv up, output projection; down projections are whole on
    every TP rank (r1fast.policy.mla.DuplicatedLinear)."""
    H, n = m.hidden_size, m.num_attention_heads // tp
    q_out = n * m.qk_head_dim
    q = H * q_out if m.q_lora_rank is None else H * m.q_lora_rank + m.q_lora_rank * (1 + q_out)
    kv = H * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank \
        + m.kv_lora_rank * n * (m.qk_nope_head_dim + m.v_head_dim)
    return H + q + kv + n * m.v_head_dim * H


def mla_activation_bytes(m: ModelConfig, tp: int, sp: int, act: int, seq_len: int,
                         selective: bool, local: bool, norm) -> float:
    """Per token, MLA (megatron's MLASelfAttention, r1fast's duplicated down projections and
    core attention): the SP-local down-projection outputs and their RMSNorms, the up-projection
    outputs, q/k after RoPE, the core attention (local: fp32 q/k copies and [s, s] fp32
    probabilities; TE: the log-sum-exp) and its output. Counted from the code, not measured."""
    n = m.num_attention_heads / tp
    dqk, dv = m.qk_head_dim, m.v_head_dim
    out = 0.0
    if m.q_lora_rank is not None:
        out += norm(m.q_lora_rank, 1 / sp)
    out += norm(m.kv_lora_rank, 1 / sp) + m.qk_rope_head_dim * act * (1 / sp + 1)
    out += n * (dqk + m.qk_nope_head_dim + dv) * act  # q up, kv up outputs
    out += 2 * n * dqk * act  # q and k after RoPE (concatenated)
    if local:
        out += 2 * n * dqk * 4 if act < 4 else 0.0  # fp32 q, k of the core attention
        out += 0.0 if selective else n * seq_len * (4 + (act if act < 4 else 0))
    else:
        out += 0.0 if selective else n * 4
    return out + n * dv * act  # core attention output = linear_proj input
