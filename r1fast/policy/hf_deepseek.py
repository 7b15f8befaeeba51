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
selection (``n_group``/``topk_group``; a group ranks by the sum of its top 2 scores, as
transformers' DeepSeek-V3 does whatever ``num_experts_per_tok``), ``norm_topk_prob``,
``routed_scaling_factor``, and
``num_nextn_predict_layers`` multi-token-prediction layers (kept as tensors, not built).
RoPE must be interleaved (``rope_interleave=True``, DeepSeek's layout, which megatron's MLA
assumes).

Read as transformers 5 reads them (each checked against its logits): YaRN's cos/sin factor
(``attention_factor``, else the mscale ratio when both mscales are non-zero, else
``0.1 ln(factor) + 1``; megatron always takes the ratio, so ``rope_mscale`` is solved for it,
and export writes ``attention_factor`` when transformers would infer another one); a
top-level ``original_max_position_embeddings`` over the rope dict's; routing keys missing
from config.json take transformers' class defaults (:data:`_HF_DEFAULTS`, e.g. V3's
``n_group = 8``); ``norm_topk_prob: null`` is off. Errors: YaRN without ``factor``, or with
``truncate = false`` (megatron always rounds the correction range). MLA's latent norms use eps
1e-6 whatever ``rms_norm_eps`` (r1fast.policy.mla).

``deepseek_v2`` is the same architecture (MLA, dense first layers, shared experts, the same
tensor names) with softmax routing: scores are the softmax over every expert, the top-k of them
are the weights (times ``routed_scaling_factor``), no correction bias, no MTP. Carried here:
``topk_method = "greedy"`` (V2-Lite) and ``"group_limited_greedy"`` (V2, V2.5: the
``topk_group`` groups whose best expert scores highest, ``router_group_score_topk = 1``), with
``norm_topk_prob = false``. Refused with the reason: ``norm_topk_prob = true``, which
DeepSeek's own code applies and transformers 5 ignores.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional

log = logging.getLogger("r1fast.policy")

V2_TOPK_METHODS = ("greedy", "group_limited_greedy")
#: transformers' DeepSeek-V3 scores a group by the sum of its top 2 (whatever the top-k)
V3_GROUP_SCORE_TOPK = 2

_YARN_KEYS = (("factor", "rope_factor"), ("original_max_position_embeddings",
                                          "rope_original_max_position"),
              ("beta_fast", "rope_beta_fast"), ("beta_slow", "rope_beta_slow"),
              ("mscale", "rope_mscale"), ("mscale_all_dim", "rope_mscale_all_dim"))


#: transformers 5's class defaults (DeepseekV3Config / DeepseekV2Config) of the routing keys a
#: config.json may leave out: transformers reads such a checkpoint with them, so r1fast does too
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": {"n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
                    "norm_topk_prob": True, "first_k_dense_replace": 3, "n_shared_experts": 1},
    "deepseek_v2": {"n_group": None, "topk_group": None, "routed_scaling_factor": 1.0,
                    "norm_topk_prob": False, "first_k_dense_replace": 0, "n_shared_experts": 2,
                    "topk_method": "greedy"},
}
_ABSENT = object()


def _with_hf_defaults(get: Callable[..., Any], family: str) -> Callable[..., Any]:
    """``get`` that answers an absent routing key with transformers' default for ``family``
    (an INFO line names them); a key present as None stays None."""
    defaults = _HF_DEFAULTS[family]
    missing = {k: v for k, v in defaults.items() if get(k, _ABSENT) is _ABSENT}
    if missing:
        log.info("from_hf_config: %s config.json has no %s; using transformers' defaults",
                 family, ", ".join(f"{k} (-> {v!r})" for k, v in missing.items()))

    def get_or_default(key: str, default: Any = None) -> Any:
        value = get(key, _ABSENT)
        return missing.get(key, default) if value is _ABSENT else value

    return get_or_default


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude factor ``0.1 mscale ln(factor) + 1`` (1 when ``factor <= 1``), as
    transformers and megatron both define it."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_from_hf(rope: dict, get: Callable[..., Any], family: str) -> dict[str, Any]:
    """ModelConfig's YaRN fields of a ``yarn`` rope dict, read as transformers reads it.

    megatron scales cos/sin by ``yarn_mscale(f, mscale) / yarn_mscale(f, mscale_all_dim)``;
    transformers uses ``attention_factor`` when given, that ratio when both mscales are
    non-zero, else ``yarn_mscale(f)``. ``rope_mscale`` is set so megatron's ratio is
    transformers' factor (``mscale_all_dim`` also sets the softmax scale, so it is kept). A
    top-level ``original_max_position_embeddings`` wins over the dict's, as in transformers.
    ``truncate = false`` (an unrounded correction range) megatron cannot do: an error."""
    if rope.get("factor") is None:
        raise ValueError(f"from_hf_config: {family} rope_parameters of rope_type 'yarn' need "
                         f"'factor' (transformers requires it too)")
    if rope.get("truncate", True) is not True:
        raise ValueError(f"from_hf_config: {family} yarn truncate={rope['truncate']!r} is not "
                         f"supported (megatron's YaRN always rounds the correction range)")
    kw: dict[str, Any] = {}
    for hf_key, key in _YARN_KEYS:
        if rope.get(hf_key) is not None:
            kw[key] = (int if key == "rope_original_max_position" else float)(rope[hf_key])
    if get("original_max_position_embeddings") is not None:
        kw["rope_original_max_position"] = int(get("original_max_position_embeddings"))
    factor, all_dim = kw["rope_factor"], kw.get("rope_mscale_all_dim", 0.0)
    target = rope.get("attention_factor")
    if target is None:
        both = rope.get("mscale") and rope.get("mscale_all_dim")
        target = (yarn_mscale(factor, rope["mscale"]) / yarn_mscale(factor, all_dim) if both
                  else yarn_mscale(factor))
    mscale = kw.get("rope_mscale", 1.0)
    if not math.isclose(yarn_mscale(factor, mscale) / yarn_mscale(factor, all_dim), target,
                        rel_tol=1e-12):  # solve megatron's ratio for mscale
        if factor <= 1:
            raise ValueError(f"from_hf_config: {family} yarn attention_factor={target} with "
                             f"factor={factor} <= 1 is not supported (megatron's YaRN leaves "
                             f"cos/sin unscaled there)")
        kw["rope_mscale"] = (float(target) * yarn_mscale(factor, all_dim) - 1.0) / (
            0.1 * math.log(factor))
        log.info("from_hf_config: %s YaRN cos/sin factor %.6g (transformers' rule) is "
                 "megatron's with mscale=%.6g", family, target, kw["rope_mscale"])
    return kw


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
        if method not in V2_TOPK_METHODS:
            raise ValueError(f"from_hf_config: deepseek_v2 topk_method must be one of "
                             f"{V2_TOPK_METHODS}, got {method!r}")
        if get("norm_topk_prob", False):
            raise ValueError("from_hf_config: deepseek_v2 norm_topk_prob must be false "
                             "(DeepSeek's code renormalises the top-k weights, transformers 5 "
                             "does not: the checkpoint's meaning is ambiguous)")
        if method == "greedy":
            return
    n_exp = get("n_routed_experts")
    if not n_exp:
        return
    n_group, topk_group = _given(get, "n_group", 1), _given(get, "topk_group", 1)
    if not isinstance(n_group, int) or n_group < 1 or n_exp % n_group != 0:
        raise ValueError(f"from_hf_config: {family} n_group must be an int >= 1 that divides "
                         f"n_routed_experts ({n_exp}), got {n_group!r}")
    if not isinstance(topk_group, int) or not 1 <= topk_group <= n_group:
        raise ValueError(f"from_hf_config: {family} topk_group must be an int in [1, n_group="
                         f"{n_group}], got {topk_group!r}")
    if family == "deepseek_v3" and n_group > 1 and n_exp // n_group < V3_GROUP_SCORE_TOPK:
        raise ValueError(f"from_hf_config: deepseek_v3 n_group={n_group} leaves "
                         f"{n_exp // n_group} expert per group; a group's score is the sum of "
                         f"its top {V3_GROUP_SCORE_TOPK}")


def deepseek_from_hf(get: Callable[..., Any], base: dict[str, Any],
                     family: str = "deepseek_v3") -> dict[str, Any]:
    """ModelConfig keyword arguments of a ``deepseek_v3`` or ``deepseek_v2`` config
    (``get(key, default)``), on top of ``base`` (the family-independent ones)."""
    get = _with_hf_defaults(get, family)
    _check_hf(get, family)
    for key in ("attention_bias", "mlp_bias"):  # biases megatron's MLA / experts do not have
        if get(key, False):
            raise ValueError(f"from_hf_config: {key}=True is not supported for {family}")
    # transformers' V3 interleaves only when the key is truthy (null too means it does not);
    # its V2 always interleaves
    if family == "deepseek_v3" and not get("rope_interleave", True):
        raise ValueError(f"from_hf_config: {family} with rope_interleave="
                         f"{get('rope_interleave', True)!r} is not supported (megatron's MLA "
                         f"applies DeepSeek's interleaved RoPE; transformers interleaves only "
                         f"when it is true)")
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
        kw.update(_yarn_from_hf(rope, get, family))
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
        k = get("num_experts_per_tok")
        grouped = n_group > 1
        # transformers' V3 sums a group's top 2 whatever k; r1fast's default is k // topk_group
        default_m = _group_m(k, n_group if grouped else None, topk_group)
        v3_sum = V3_GROUP_SCORE_TOPK if default_m not in (None, V3_GROUP_SCORE_TOPK) else None
        kw.update(num_experts=n_exp, moe_ffn_hidden_size=get("moe_intermediate_size"),
                  moe_router_topk=k, dense_layers=dense,
                  shared_expert_size=n_shared * get("moe_intermediate_size") or None,
                  router_score="sigmoid", router_expert_bias=True,
                  router_n_groups=n_group if grouped else None,
                  router_topk_groups=topk_group if grouped else None,
                  router_group_score_topk=v3_sum,
                  router_scaling_factor=float(_given(get, "routed_scaling_factor", 1.0)),
                  router_normalize=bool(get("norm_topk_prob")),  # null: off, as in HF
                  router_bias_update_rate=0.0)
        if family == "deepseek_v2":  # softmax over every expert, top-k weights as they are
            limited = _given(get, "topk_method", "greedy") == "group_limited_greedy" and grouped
            kw.update(router_score="softmax", router_pre_softmax=True, router_normalize=False,
                      router_expert_bias=False, router_n_groups=n_group if limited else None,
                      router_topk_groups=topk_group if limited else None,
                      router_group_score_topk=1 if limited else None,
                      router_bias_update_rate=0.0)
        alpha = get("aux_loss_alpha", 0.0) or 0.0
        if alpha:  # DeepSeek's own training keys (seq_aux defaults to true in its code)
            seq = bool(_given(get, "seq_aux", True))
            kw["aux_loss_type"] = "seq_aux_loss" if seq else "aux_loss"
            log.warning("from_hf_config: %s aux_loss_alpha=%g (seq_aux=%s) is not applied, as "
                        "transformers does not train with it: model.aux_loss_coef = %g turns "
                        "on that %s balance loss (model.aux_loss_type = %r)", family, alpha,
                        seq, alpha, "sequence-wise" if seq else "batch-wise",
                        kw["aux_loss_type"])
    return kw


def _group_m(topk: int, n_groups: Optional[int], topk_groups: Optional[int],
             group_score_topk: Optional[int] = None) -> Optional[int]:
    """Scores summed per group score, as r1fast.ops.moe_route decides it; None without
    groups."""
    from r1fast.ops.moe_route import MoERouteConfig

    if n_groups is None:
        return None
    return MoERouteConfig(topk=topk, n_groups=n_groups, topk_groups=topk_groups,
                          group_score_topk=group_score_topk).group_m


def _normalizes(cfg) -> bool:
    """Whether r1fast's router renormalises the top-k weights (None: for sigmoid top-k > 1,
    as r1fast.ops.moe_route resolves it), which is what ``norm_topk_prob`` means."""
    from r1fast.ops.moe_route import MoERouteConfig

    return MoERouteConfig(topk=cfg.moe_router_topk, score=cfg.router_score,
                          normalize=cfg.router_normalize).normalize_resolved


def _family(cfg) -> str:
    """deepseek_v3 (sigmoid scores with the expert bias, groups ranked by their top-2 sum) or
    deepseek_v2 (softmax top-k without renormalising, groups ranked by their best expert);
    anything else has no DeepSeek layout."""
    m = _group_m(cfg.moe_router_topk, cfg.router_n_groups, cfg.router_topk_groups,
                 cfg.router_group_score_topk)
    if cfg.router_score == "sigmoid" and cfg.router_expert_bias and not cfg.router_pre_softmax \
            and not cfg.shared_expert_gate and m in (None, V3_GROUP_SCORE_TOPK):
        return "deepseek_v3"
    if cfg.router_score == "softmax" and cfg.router_pre_softmax and cfg.router_normalize is False \
            and not cfg.router_expert_bias and m in (None, 1) \
            and not cfg.shared_expert_gate and not cfg.mtp_layers:
        return "deepseek_v2"
    raise ValueError("to_hf_config: an MLA model routes as deepseek_v3 (sigmoid scores and the "
                     "expert bias, no pre-softmax, no shared-expert gate, groups ranked by "
                     "their top-2 sum) or as deepseek_v2 (softmax over all experts, top-k "
                     "weights not renormalised, no bias, groups ranked by their best expert, "
                     "no MTP)" + (f"; this one ranks groups by their top {m}" if m else ""))


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
        f, m, m_all = cfg.rope_factor, cfg.rope_mscale, cfg.rope_mscale_all_dim
        ours = yarn_mscale(f, m) / yarn_mscale(f, m_all)
        if not (m and m_all) and not math.isclose(ours, yarn_mscale(f), rel_tol=1e-12):
            rope["attention_factor"] = ours  # transformers would infer yarn_mscale(f)
    d["rope_parameters"] = rope
    if cfg.rope_type == "yarn":  # transformers < 5 and the engines on it read only this key
        legacy = {k: v for k, v in rope.items() if k != "rope_theta"}
        d["rope_scaling"] = {**legacy, "type": "yarn"}
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
                 norm_topk_prob=_normalizes(cfg),
                 # transformers infers these from the family; vLLM and SGLang read them (the
                 # expert bias exists only under noaux_tc)
                 topk_method="noaux_tc", scoring_func="sigmoid")
        if cfg.aux_loss_coef > 0:  # DeepSeek's training keys (transformers reads neither)
            d.update(aux_loss_alpha=cfg.aux_loss_coef,
                     seq_aux=cfg.aux_loss_type == "seq_aux_loss")
        if family == "deepseek_v2":
            for key in ("rope_interleave", "num_nextn_predict_layers"):
                d.pop(key)
            grouped = cfg.router_n_groups is not None
            d.update(topk_method="group_limited_greedy" if grouped else "greedy",
                     scoring_func="softmax", n_group=cfg.router_n_groups,
                     topk_group=cfg.router_topk_groups)
    else:
        raise ValueError("to_hf_config: deepseek_v3 has routed experts; a dense MLA model has "
                         "no HF family here (r1fast_config.json describes it)")
    return d
