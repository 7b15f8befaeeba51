"""The ``qwen3_moe``, ``qwen3`` and ``qwen2`` Hugging Face configs <-> :class:`ModelConfig` (the
keys of their own; :meth:`ModelConfig.from_hf_config` reads the ones every family shares).

What maps to what: qwen2 has qkv biases and no q/k norm, qwen3 / qwen3_moe the reverse (an
``attention_bias`` there is refused); Qwen3-MoE's ``num_experts`` (or ``num_local_experts``)
experts of width ``moe_intermediate_size``, ``num_experts_per_tok`` of them per token, dense
layers from ``decoder_sparse_step`` and ``mlp_only_layers``, and ``norm_topk_prob``: softmax
over the k selected logits when true (megatron's softmax after top-k), the top-k of the
softmax over every expert as they are when false. ``router_aux_loss_coef`` is the aux-loss
coefficient only when ``output_router_logits`` is true, as transformers trains with it.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger("r1fast.policy")


def qwen_from_hf(get: Callable[..., Any], kw: dict[str, Any], model_type: str
                 ) -> dict[str, Any]:
    """``kw`` (ModelConfig keyword arguments, the shared ones already in) with the
    ``model_type`` family's own fields added; ``get(key, default)`` reads config.json."""
    if model_type == "qwen2":
        kw.update(qk_layernorm=False, add_qkv_bias=True)
    else:
        if get("attention_bias", False):
            raise ValueError("from_hf_config: attention_bias=True is not supported for "
                             f"{model_type}")
        kw.update(qk_layernorm=True, add_qkv_bias=False)
    if model_type != "qwen3_moe":
        return kw
    n_exp = get("num_experts") or get("num_local_experts")
    for key, value in (("num_experts", n_exp), ("num_experts_per_tok",
                       get("num_experts_per_tok")),
                       ("moe_intermediate_size", get("moe_intermediate_size"))):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"from_hf_config: qwen3_moe {key} must be an int >= 1, "
                             f"got {value!r}")
    step = get("decoder_sparse_step", 1) or 1
    only = set(get("mlp_only_layers", []) or [])
    dense = tuple(i for i in range(kw["num_layers"])
                  if i in only or not (n_exp > 0 and (i + 1) % step == 0))
    norm = bool(get("norm_topk_prob", False))
    # top-1 renormalised is weight 1: megatron reaches it only as a softmax over all
    # experts renormalised (its top-1 refuses the softmax over the k logits)
    top1 = norm and get("num_experts_per_tok") == 1
    kw.update(num_experts=n_exp, moe_ffn_hidden_size=get("moe_intermediate_size"),
              moe_router_topk=get("num_experts_per_tok"), dense_layers=dense,
              router_score="softmax", router_pre_softmax=not norm or top1,
              router_normalize=True if top1 else None if norm else False,
              aux_loss_coef=float(get("router_aux_loss_coef", 0.0) or 0.0)
              if get("output_router_logits", False) else 0.0)
    return kw


def qwen_to_hf(cfg, base: dict[str, Any]) -> dict[str, Any]:
    """The qwen3_moe / qwen3 / qwen2 config.json of a GQA ModelConfig (``base``: the shared
    keys); a model no Qwen family describes is a ValueError saying why."""
    if cfg.shared_expert_size is not None or cfg.router_score != "softmax" \
            or cfg.router_n_groups is not None or cfg.router_expert_bias \
            or cfg.router_scaling_factor != 1.0:
        raise ValueError("to_hf_config: only Qwen3-MoE-style routing (softmax, no groups, no "
                         "expert bias, no shared expert, scaling 1) has an HF layout here")
    if cfg.add_qkv_bias and (cfg.qk_layernorm or cfg.is_moe):
        raise ValueError("to_hf_config: qkv biases map to qwen2, which is dense without "
                         "q/k norm")
    if not cfg.add_qkv_bias and not cfg.qk_layernorm:
        raise ValueError("to_hf_config: qwen3/qwen3_moe have q/k norm; a model without it "
                         "and without qkv biases has no supported HF family")
    model_type = "qwen2" if cfg.add_qkv_bias else ("qwen3_moe" if cfg.is_moe else "qwen3")
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM"}[model_type]
    d = {"architectures": [arch], "model_type": model_type, **base}
    if model_type != "qwen2":
        d["attention_bias"] = False
    if cfg.is_moe:
        aux = cfg.aux_loss_coef if cfg.aux_loss_type == "aux_loss" else 0.0
        if aux != cfg.aux_loss_coef:
            log.warning("to_hf_config: qwen3_moe has no sequence-wise balance loss: "
                        "aux_loss_coef=%g with aux_loss_type=%r is written as "
                        "router_aux_loss_coef=0", cfg.aux_loss_coef, cfg.aux_loss_type)
        d.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.moe_ffn_hidden_size,
                 num_experts_per_tok=cfg.moe_router_topk, decoder_sparse_step=1,
                 mlp_only_layers=list(cfg.dense_layers),
                 norm_topk_prob=not cfg.router_pre_softmax or bool(cfg.router_normalize),
                 router_aux_loss_coef=aux, output_router_logits=aux > 0)
    return d
