"""MLA parameters in the per-GPU memory model (r1fast.plan.memory): megatron's MLASelfAttention
as r1fast builds it (duplicated down projections, r1fast.policy.mla). Its saved activations are
in r1fast.plan.activations, next to grouped-query attention's."""
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
