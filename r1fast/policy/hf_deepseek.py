"""The ``deepseek_v3`` and ``deepseek_v2`` Hugging Face configs <-> :class:`ModelConfig`
(DeepSeek-V3/R1, Moonlight and Kimi-K2 checkpoints use ``deepseek_v3``; DeepSeek-V2/V2-Lite/V2.5
``deepseek_v2``).

What maps to what: MLA (``q_lora_rank`` None means one q projection, ``kv_lora_rank``,
``qk_nope_head_dim``, ``qk_rope_head_dim``, ``v_head_dim``), YaRN from ``rope_parameters`` /
``rope_scaling`` (``factor``, ``original_max_position_embeddings``, ``beta_fast``,
``beta_slow``, ``mscale``, ``mscale_all_dim``), the first ``first_k_dense_replace`` layers dense,
``n_routed_experts`` routed experts of width ``moe_intermediate_size``, ``n_shared_experts``
shared experts fused into one of width ``n_shared_experts * moe_intermediate_size``, sigmoid
scores with the ``e_score_correction_bias`` (always present in the family), group-limited
selection (``n_group``/``topk_group``), ``norm_topk_prob``, ``routed_scaling_factor``, and
``num_nextn_predict_layers`` multi-token-prediction layers (kept as tensors, not built).
RoPE must be interleaved (``rope_interleave=True``, DeepSeek's layout, which megatron's MLA
assumes).

``deepseek_v2`` is the same architecture (MLA, dense first layers, shared experts, the same
tensor names) with softmax routing: scores are the softmax over every expert, the top-k of them
are the weights (times ``routed_scaling_factor``), no correction bias, no MTP. Carried here:
``topk_method = "greedy"`` (V2-Lite) with ``norm_topk_prob = false``. Refused with the reason:
``group_limited_greedy`` (V2, V2.5) ranks a group by its best expert, while r1fast's router
ranks it by the sum of its top ``k / topk_group`` (V3's rule); ``norm_topk_prob = true``, which
DeepSeek's own code applies and transformers 5 ignores.
"""
from __future__ import annotations

from typing import Any, Callable

_YARN_KEYS = (("factor", "rope_factor"), ("original_max_position_embeddings",
                                          "rope_original_max_position"),
              ("beta_fast", "rope_beta_fast"), ("beta_slow", "rope_beta_slow"),
              ("mscale", "rope_mscale"), ("mscale_all_dim", "rope_mscale_all_dim"))


def _given(get: Callable[..., Any], key: str, default: Any) -> Any:
    """``get(key)``, or ``default`` when the key is absent or None (never for 0 or False: a
    zero is the config's value, and the range checks judge it)."""
    value = get(key)
    return default if value is None else value


def _check_hf(get: Callable[..., Any], family: str) -> None:
    """The deepseek_v3/v2 keys whose errors would otherwise name r1fast's fields: MLA's head dims
    and ranks, the expert groups, V2's routing method."""
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        v = get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"from_hf_config: {family} {key} must be an int >= 1 (multi-head "
                             f"latent attention needs it), got {v!r}")
    if family == "deepseek_v2":
        method = _given(get, "topk_method", "greedy")
        if method != "greedy":
            raise ValueError(f"from_hf_config: deepseek_v2 topk_method must be 'greedy', got "
                             f"{method!r} (group_limited_greedy ranks a group by its best expert; "
                             f"r1fast's router ranks it by the sum of its top k/topk_group)")
        if get("norm_topk_prob", False):
            raise ValueError("from_hf_config: deepseek_v2 norm_topk_prob must be false "
                             "(DeepSeek's code renormalises the top-k weights, transformers 5 "
                             "does not: the checkpoint's meaning is ambiguous)")
        return
    n_exp = get("n_routed_experts")
    if not n_exp:
        return
    n_group, topk_group = _given(get, "n_group", 1), _given(get, "topk_group", 1)
    if not isinstance(n_group, int) or n_group < 1 or n_exp % n_group != 0:
        raise ValueError(f"from_hf_config: deepseek_v3 n_group must be an int >= 1 that divides "
                         f"n_routed_experts ({n_exp}), got {n_group!r}")
    if not isinstance(topk_group, int) or not 1 <= topk_group <= n_group:
        raise ValueError(f"from_hf_config: deepseek_v3 topk_group must be an int in [1, n_group="
                         f"{n_group}], got {topk_group!r}")


def deepseek_from_hf(get: Callable[..., Any], base: dict[str, Any],
                     family: str = "deepseek_v3") -> dict[str, Any]:
    """ModelConfig keyword arguments of a ``deepseek_v3`` or ``deepseek_v2`` config
    (``get(key, default)``), on top of ``base`` (the family-independent ones)."""
    _check_hf(get, family)
    if get("attention_bias", False):
        raise ValueError(f"from_hf_config: attention_bias=True is not supported for {family}")
    if get("rope_interleave", True) is False:
        raise ValueError(f"from_hf_config: {family} with rope_interleave=False is not "
                         "supported (megatron's MLA applies DeepSeek's interleaved RoPE)")
    score = "softmax" if family == "deepseek_v2" else "sigmoid"
    if (get("scoring_func", score) or score) != score:
        raise ValueError(f"from_hf_config: {family} scoring_func must be {score!r}, got "
                         f"{get('scoring_func')!r}")
    kw = dict(base)
    heads = kw["num_attention_heads"]
    kw.update(attention="mla", num_query_groups=heads, head_dim=None, qk_layernorm=True,
              add_qkv_bias=False, q_lora_rank=get("q_lora_rank"),
              kv_lora_rank=get("kv_lora_rank"), qk_nope_head_dim=get("qk_nope_head_dim"),
              qk_rope_head_dim=get("qk_rope_head_dim"), v_head_dim=get("v_head_dim"),
              mtp_layers=int(get("num_nextn_predict_layers", 0) or 0))
    rope = get("rope_parameters") or get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
    if rope_type not in ("default", "yarn"):
        raise ValueError(f"from_hf_config: {family} rope_type must be 'default' or 'yarn', "
                         f"got {rope_type!r}")
    kw["rope_type"] = rope_type
    if rope_type == "yarn":
        for hf_key, key in _YARN_KEYS:
            if rope.get(hf_key) is not None:
                kw[key] = (int if key == "rope_original_max_position" else float)(rope[hf_key])
    n_exp = get("n_routed_experts")
    if n_exp:
        n_dense = _given(get, "first_k_dense_replace", 0)
        freq = _given(get, "moe_layer_freq", 1)
        if not isinstance(freq, int) or freq < 1:
            raise ValueError(f"from_hf_config: {family} moe_layer_freq must be an int >= 1, "
                             f"got {freq!r}")
        dense = tuple(i for i in range(kw["num_layers"]) if i < n_dense or i % freq != 0)
        n_shared = _given(get, "n_shared_experts", 0)
        n_group, topk_group = _given(get, "n_group", 1), _given(get, "topk_group", 1)
        kw.update(num_experts=n_exp, moe_ffn_hidden_size=get("moe_intermediate_size"),
                  moe_router_topk=get("num_experts_per_tok"), dense_layers=dense,
                  shared_expert_size=n_shared * get("moe_intermediate_size") or None,
                  router_score="sigmoid", router_expert_bias=True,
                  router_n_groups=n_group if n_group > 1 else None,
                  router_topk_groups=topk_group if n_group > 1 else None,
                  router_scaling_factor=float(_given(get, "routed_scaling_factor", 1.0)),
                  router_normalize=bool(_given(get, "norm_topk_prob", True)),
                  router_bias_update_rate=0.0)
        if family == "deepseek_v2":  # softmax over every expert, top-k weights as they are
            kw.update(router_score="softmax", router_pre_softmax=True, router_normalize=False,
                      router_expert_bias=False, router_n_groups=None, router_topk_groups=None,
                      router_bias_update_rate=0.0)
    return kw


def _family(cfg) -> str:
    """deepseek_v3 (sigmoid scores with the expert bias) or deepseek_v2 (greedy softmax top-k
    without renormalising); anything else has no DeepSeek layout."""
    if cfg.router_score == "sigmoid" and cfg.router_expert_bias and not cfg.router_pre_softmax \
            and not cfg.shared_expert_gate:
        return "deepseek_v3"
    if cfg.router_score == "softmax" and cfg.router_pre_softmax and cfg.router_normalize is False \
            and not cfg.router_expert_bias and cfg.router_n_groups is None \
            and not cfg.shared_expert_gate and not cfg.mtp_layers:
        return "deepseek_v2"
    raise ValueError("to_hf_config: an MLA model routes as deepseek_v3 (sigmoid scores and the "
                     "expert bias, no pre-softmax, no shared-expert gate) or as deepseek_v2 "
                     "(softmax over all experts, top-k weights not renormalised, no bias, no "
                     "groups, no MTP)")


def deepseek_to_hf(cfg, base: dict[str, Any]) -> dict[str, Any]:
    """The ``deepseek_v3`` or ``deepseek_v2`` config.json of an MLA ModelConfig (``base``: the
    shared keys)."""
    family = _family(cfg) if cfg.is_moe else "deepseek_v3"
    n_dense = len(cfg.dense_layers)
    if cfg.is_moe and tuple(cfg.dense_layers) != tuple(range(n_dense)):
        raise ValueError(f"to_hf_config: {family} needs the dense layers first "
                         f"(first_k_dense_replace), got dense_layers={cfg.dense_layers}")
    d = dict(base)
    for key in ("head_dim", "use_sliding_window"):
        d.pop(key, None)
    arch = "DeepseekV2ForCausalLM" if family == "deepseek_v2" else "DeepseekV3ForCausalLM"
    d.update(architectures=[arch], model_type=family,
             num_key_value_heads=cfg.num_attention_heads, attention_bias=False,
             q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
             qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
             v_head_dim=cfg.v_head_dim, rope_interleave=True,
             num_nextn_predict_layers=cfg.mtp_layers)
    rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type}
    if cfg.rope_type == "yarn":
        for hf_key, key in _YARN_KEYS:
            rope[hf_key] = getattr(cfg, key)
        if rope["original_max_position_embeddings"] is None:
            rope["original_max_position_embeddings"] = cfg.max_position_embeddings
    d["rope_parameters"] = rope
    if cfg.is_moe:
        shared = cfg.shared_expert_size or 0
        if shared % cfg.moe_ffn_hidden_size != 0:
            raise ValueError(f"to_hf_config: shared_expert_size ({shared}) must be a multiple "
                             f"of moe_ffn_hidden_size ({cfg.moe_ffn_hidden_size})")
        d.update(n_routed_experts=cfg.num_experts, moe_intermediate_size=cfg.moe_ffn_hidden_size,
                 num_experts_per_tok=cfg.moe_router_topk, first_k_dense_replace=n_dense,
                 n_shared_experts=shared // cfg.moe_ffn_hidden_size,
                 n_group=cfg.router_n_groups or 1, topk_group=cfg.router_topk_groups or 1,
                 routed_scaling_factor=cfg.router_scaling_factor,
                 norm_topk_prob=cfg.router_normalize is not False)
        if family == "deepseek_v2":
            for key in ("rope_interleave", "num_nextn_predict_layers"):
                d.pop(key)
            d.update(topk_method="greedy", n_group=None, topk_group=None)
    else:
        raise ValueError("to_hf_config: deepseek_v3 has routed experts; a dense MLA model has "
                         "no HF family here (r1fast_config.json describes it)")
    return d
