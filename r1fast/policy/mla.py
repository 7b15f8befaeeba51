"""Multi-head latent attention (MLA, DeepSeek-V2/V3) in the policy, on megatron-core's modules.

megatron-core builds the MLA layer (``MLASelfAttention`` from the local or TE layer spec with
``multi_latent_attention=True``; ``MLATransformerConfig`` carries the ranks and head dims and the
YaRN parameters). What r1fast adds:

* :func:`mla_config_kwargs`: the ``MLATransformerConfig`` class and fields of a
  :class:`~r1fast.policy.config.ModelConfig` with ``attention="mla"``.
* :class:`MLACoreAttention`: the core attention of the *local* spec. megatron's local
  ``DotProductAttention`` cannot take MLA's ``k_channels``/``v_channels`` (q/k heads of width
  ``qk_nope + qk_rope``, v heads of ``v_head_dim``); this module computes, per head,

      out = softmax(Q K^T * scale + mask) V,      Q, K: [s, d_qk],  V: [s, d_v],

  with the scale MLA hands it, ``mscale^2 / sqrt(qk_nope + qk_rope)`` where ``mscale = 0.1
  mscale_all_dim ln(factor) + 1`` under YaRN with ``mscale_all_dim != 0`` (else 1), and a
  causal mask aligned bottom-right (query i of sq sees keys 0 .. sk - sq + i, so decoding with a
  KV cache works), or the boolean ``attention_mask`` megatron passes (True = hidden), e.g. the
  block-diagonal mask of packed rows. Scores and softmax are fp32 (docs/DESIGN.md §4); the
  output has the input dtype, shape ``[sq, b, heads * d_v]``. Packed rows come as megatron's
  ``thd`` layout (``[t, heads, d]`` and ``packed_seq_params``): without a mask, each sequence
  attends causally to itself only, one SDPA call per group of similar-length sequences
  (r1fast.policy.packed_attention's ``segment_attention``: cost sum L_i^2, not T^2; SDPA's
  precision). With Transformer Engine (GPU) the TE spec's attention is
  used instead.
* :class:`DuplicatedLinear`: MLA's down projections, replicated over TP (why: its docstring).
* :func:`use_mla_local_modules`: puts both into a block spec of the local kind, and builds
  the two latent RMSNorms (``q_a_layernorm`` / ``kv_a_layernorm``) with eps
  :data:`LATENT_NORM_EPS` = 1e-6, as DeepSeek's code and transformers do whatever
  ``rms_norm_eps`` says (megatron would pass ``rms_norm_eps``).

RoPE: megatron's MLA applies DeepSeek's interleaved RoPE (and the YaRN cos/sin factor) itself,
at positions ``0 .. s-1``, or, given megatron's packed-sequence parameters (``thd``, with
``cu_seqlens``), at positions restarting at 0 in every packed sequence. So the policy's
``position_ids`` reach MLA as :func:`mla_packed_params`: None for ``0 .. s-1``, packed-sequence
parameters for one row of packed sequences (positions 0, 1, ... restarting at each boundary, as
r1fast.policy.packed lays them out); anything else (e.g. left-padding offsets) is refused.
RoPE scores depend only on position differences, so what keeps packed sequences apart is the
block-diagonal mask; restarting the positions makes each sequence use the very angles it has
alone (equal up to rounding otherwise, which grows with the position).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from r1fast.policy.config import ModelConfig


def mla_config_kwargs(model: ModelConfig) -> tuple[type, dict[str, Any]]:
    """(config class, extra fields) of ``model`` for megatron: ``TransformerConfig`` and {} for
    grouped-query attention, ``MLATransformerConfig`` and the MLA/YaRN fields for MLA."""
    from megatron.core.transformer import TransformerConfig

    if not model.is_mla:
        return TransformerConfig, {}
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    yarn = model.rope_type == "yarn"
    return MLATransformerConfig, dict(
        q_lora_rank=model.q_lora_rank, kv_lora_rank=model.kv_lora_rank,
        qk_head_dim=model.qk_nope_head_dim, qk_pos_emb_head_dim=model.qk_rope_head_dim,
        v_head_dim=model.v_head_dim, rope_type="yarn" if yarn else "rope",
        rotary_base=model.rope_theta,
        rotary_scaling_factor=model.rope_factor if yarn else 1.0,
        original_max_position_embeddings=(model.rope_original_max_position
                                          or model.max_position_embeddings),
        beta_fast=model.rope_beta_fast, beta_slow=model.rope_beta_slow,
        mscale=model.rope_mscale, mscale_all_dim=model.rope_mscale_all_dim if yarn else 0.0)


def softmax_scale(model: ModelConfig) -> float:
    """The attention softmax scale MLA uses: mscale^2 / sqrt(qk_nope + qk_rope) (YaRN mscale
    from rope_mscale_all_dim; 1 without YaRN)."""
    import math

    mscale = 1.0
    if model.rope_type == "yarn" and model.rope_mscale_all_dim and model.rope_factor > 1:
        mscale = 0.1 * model.rope_mscale_all_dim * math.log(model.rope_factor) + 1.0
    return mscale * mscale / math.sqrt(model.qk_head_dim)


class MLACoreAttention(torch.nn.Module):
    """softmax(Q K^T * scale + mask) V with q/k head width != v head width (module docstring).

    Built by megatron's ``MultiLatentAttention`` with the arguments of its core attention;
    ``forward(query [sq, b, n, dqk], key [sk, b, n, dqk], value [sk, b, n, dv],
    attention_mask)`` returns ``[sq, b, n * dv]``.
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, k_channels: Optional[int] = None,
                 v_channels: Optional[int] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Any = None) -> None:
        super().__init__()
        if getattr(config, "context_parallel_size", 1) != 1:
            raise ValueError("MLACoreAttention: context parallelism is not supported")
        p = config.attention_dropout if attention_dropout is None else attention_dropout
        if p:
            raise ValueError(f"MLACoreAttention: attention dropout must be 0, got {p}")
        self.config = config
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.k_channels, self.v_channels = k_channels, v_channels
        # megatron's Attention base class first builds this without k_channels, then MLA
        # rebuilds it with them (and its scale); the first instance is discarded.
        d = k_channels or getattr(config, "kv_channels", None) or 1
        self.softmax_scale = softmax_scale if softmax_scale is not None else d ** -0.5

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type=None,
                attention_bias: Optional[torch.Tensor] = None,
                packed_seq_params: Any = None) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("MLACoreAttention: attention_bias is not supported")
        if packed_seq_params is not None:  # megatron's thd layout: [t, n, d], batch of 1
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(f"MLACoreAttention: packed_seq_params.qkv_format must be 'thd',"
                                 f" got {packed_seq_params.qkv_format!r}")
            if attention_mask is None:  # each packed sequence attends to itself only
                from r1fast.policy.packed_attention import segment_attention

                out = segment_attention(query, key, value, packed_seq_params.cu_seqlens_q,
                                        self.softmax_scale,
                                        plan=getattr(packed_seq_params, "plan", None))
                return out.reshape(out.shape[0], 1, -1)
            query, key, value = query[:, None], key[:, None], value[:, None]
        sq, b, n, _ = query.shape
        sk = key.shape[0]
        q = query.permute(1, 2, 0, 3).float()           # [b, n, sq, dqk]
        k = key.permute(1, 2, 3, 0).float()             # [b, n, dqk, sk]
        v = value.permute(1, 2, 0, 3)                   # [b, n, sk, dv]
        scores = torch.matmul(q, k) * self.softmax_scale  # [b, n, sq, sk] fp32
        if attention_mask is not None:
            hidden = attention_mask.to(torch.bool)
        else:  # causal, aligned so that the last query sees every key
            i = torch.arange(sq, device=query.device)[:, None]
            j = torch.arange(sk, device=query.device)[None, :]
            hidden = j > i + (sk - sq)
        scores = scores.masked_fill(hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if attention_mask is not None:
            # a fully hidden row (a pad under a packed mask) gives NaN: it attends to nothing
            # (the causal mask never hides a whole row; skipping this saves an [s, s] copy)
            probs = torch.nan_to_num(probs, nan=0.0)
        out = torch.matmul(probs.to(v.dtype), v)        # [b, n, sq, dv]
        return out.permute(2, 0, 1, 3).reshape(sq, b, n * v.shape[-1])


class DuplicatedLinear(torch.nn.Module):
    """``y = x W^T`` with the whole ``W [out, in]`` on every TP rank: MLA's q and kv down
    projections in the local spec (TE's ``parallel_mode="duplicated"``).

    megatron's local spec makes them ``ColumnParallelLinear`` and gathers the output over TP;
    the backward of that gather keeps only this rank's slice of the gradient, but the shared
    RoPE key ``k_pos_emb`` taken from it feeds only this rank's heads, so its gradient is a
    partial sum and the kv down projection's gradient comes out wrong at TP > 1 (measured:
    4% off). Duplicated, the projection runs on this rank's sequence-parallel tokens, MLA
    gathers ``k_pos_emb`` over the sequence (whose backward reduce-scatters, summing the heads'
    contributions), and the weight is flagged ``sequence_parallel`` so megatron sums its
    gradient over TP. MLA at TP > 1 therefore runs with sequence parallelism.
    """

    def __init__(self, input_size: int, output_size: int, *, config, init_method,
                 bias: bool = False, tp_group=None, **_: Any) -> None:
        super().__init__()
        if bias:
            raise ValueError("DuplicatedLinear: bias is not supported")
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size,
                                                     dtype=config.params_dtype))
        init_method(self.weight)
        import torch.distributed as dist

        if tp_group is not None and dist.is_initialized() and dist.get_world_size(tp_group) > 1:
            with torch.no_grad():  # one initial value on every TP rank
                dist.broadcast(self.weight.data, src=dist.get_global_rank(tp_group, 0),
                               group=tp_group)
        self.weight.sequence_parallel = bool(config.sequence_parallel)
        self.weight.tensor_model_parallel = False

    def forward(self, x: torch.Tensor):
        return torch.nn.functional.linear(x, self.weight), None


#: eps of MLA's latent RMSNorms in DeepSeek's reference code and transformers' DeepSeek-V2/V3
#: (``DeepseekV3RMSNorm(q_lora_rank)``: the default, not ``config.rms_norm_eps``)
LATENT_NORM_EPS = 1e-6


def _with_latent_eps(norm):
    """The norm class / ModuleSpec ``norm`` built with eps :data:`LATENT_NORM_EPS` (megatron
    passes ``layernorm_epsilon``); what it builds is ``norm``'s own module, so parameter names
    and checkpoints are unchanged."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(norm, ModuleSpec):
        return ModuleSpec(module=_with_latent_eps(norm.module), params=norm.params,
                          submodules=norm.submodules)
    if not isinstance(norm, type) or getattr(norm, "latent_eps_of", None) is not None:
        return norm  # IdentityOp-like placeholders, or already wrapped

    def build(cls, *args, eps=None, **kwargs):
        return norm(*args, eps=LATENT_NORM_EPS, **kwargs)

    return type(f"Latent{norm.__name__}", (), {"__new__": build, "latent_eps_of": norm})


def use_mla_local_modules(spec, rms_norm_eps: float = LATENT_NORM_EPS) -> None:
    """In every MLA layer of ``spec`` (a block spec) of the local (non-TE) kind: our core
    attention and duplicated down projections (:class:`MLACoreAttention`,
    :class:`DuplicatedLinear`). TE layers (GPU with Transformer Engine) are kept. In every MLA
    layer the latent norms get eps :data:`LATENT_NORM_EPS`; where TE fuses them into a linear
    (built with ``rms_norm_eps``), another ``rms_norm_eps`` is an error."""
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer import multi_latent_attention as mla_module
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    for layer in spec.layer_specs:
        attn = layer.submodules.self_attention
        if attn.module is not mla_module.MLASelfAttention:
            continue
        sub = attn.submodules
        for name in ("q_layernorm", "kv_layernorm"):
            norm = getattr(sub, name)
            if getattr(norm, "module", norm) is IdentityOp:  # TE: fused into the up projection
                if rms_norm_eps != LATENT_NORM_EPS:
                    raise ValueError(f"model.rms_norm_eps={rms_norm_eps} with Transformer "
                                     f"Engine's MLA layers: TE fuses the latent RMSNorms into "
                                     f"their linears with that eps, where DeepSeek uses "
                                     f"{LATENT_NORM_EPS}; use rms_norm_eps={LATENT_NORM_EPS} or "
                                     f"run without Transformer Engine")
            else:
                setattr(sub, name, _with_latent_eps(norm))
        if sub.core_attention in (DotProductAttention, None):
            sub.core_attention = MLACoreAttention
        if sub.linear_kv_down_proj is ColumnParallelLinear:
            sub.linear_q_down_proj = sub.linear_kv_down_proj = DuplicatedLinear
            # MLASelfAttention accepts its down projections from a fixed list of classes; the
            # slot of modelopt's Linear is free without TE (see megatron_compat.te).
            if not mla_module.HAVE_TE:
                mla_module.Linear = DuplicatedLinear


def mla_packed_params(position_ids: Optional[torch.Tensor], length: int, given=None):
    """What MLA needs to know of ``position_ids`` [b, L] (see the module docstring): ``given``
    when there is one (:func:`mla_thd_params`, built from the host's boundaries: nothing is
    read); None when every row is ``0 .. L-1`` (or no positions are given); megatron's
    ``PackedSeqParams`` (``thd``; ``cu_seqlens`` where the positions restart at 0) for one row
    of packed sequences, found by reading the positions (a wait on a GPU); a ValueError for
    anything else."""
    if given is not None or position_ids is None:
        return given
    pos = position_ids[:, :length].long()
    idx = torch.arange(length, device=pos.device)
    if bool((pos == idx).all()):
        return None
    starts = pos[0] == 0
    steps = pos[0, 1:] == pos[0, :-1] + 1
    if pos.shape[0] != 1 or not bool(starts[0]) or not bool((steps | starts[1:]).all()):
        raise ValueError("position_ids: attention='mla' takes positions 0..L-1 per row, or one "
                         "row of packed sequences (0, 1, ... restarting at 0 at each sequence, "
                         "r1fast.policy.packed); right-pad rows instead of left-padding")
    from r1fast.policy.packed_attention import thd_params

    cu = torch.cat([idx[starts], idx.new_tensor([length])])  # [S+1]
    # megatron ropes each sequence at 0..len-1 from a table of max_seqlen rows (a table as long
    # as the whole row would switch it to row offsets, which a single sequence never needs);
    # the segment plan rides along, so the core attention of every layer reuses it
    return thd_params(cu, length)


def mla_thd_params(cu_seqlens: torch.Tensor, length: int, device: torch.device):
    """:func:`mla_packed_params`' answer for a packed row from its host boundaries
    ``cu_seqlens`` [S+1] instead of from the positions: empty sequences dropped, the last one
    running to ``length`` (the sequence-parallel pads continue it); None when one sequence
    covers the row (as its positions are then ``0 .. length-1``)."""
    from r1fast.policy.packed_attention import thd_params

    cu = torch.unique_consecutive(cu_seqlens.reshape(-1).to("cpu", torch.int64))
    cu[-1] = length
    return None if cu.numel() <= 2 else thd_params(cu, length, device)
