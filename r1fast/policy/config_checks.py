"""Range checks of the policy configs' numeric fields (issue #16: nothing non-finite or out of
range gets past load time).

Every numeric field of :class:`~r1fast.policy.config.ModelConfig` and
:class:`~r1fast.policy.config.ParallelConfig` has a :class:`Range` here; :func:`check_fields`
raises a one-line ``ValueError`` naming the field, the value and what is allowed, e.g.
``ModelConfig: rms_norm_eps must be a finite number in (0, 1), got nan``. NaN fails every
comparison, so a bound alone would let it through: floats are checked finite first. Ints must be
ints (a bool or a float is refused: ``True`` is an int to Python, and a layer count of 2.0 is a
typo). The relations between fields (divisibility, top-k within the experts, MLA fields set
together) stay in the configs' ``validate`` methods.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True, kw_only=True)
class Range:
    """What one numeric field may hold."""

    integer: bool = False
    """An int (not a bool); else a finite number (int or float)."""
    lo: Optional[float] = None
    """Lower bound; None: unbounded below."""
    lo_open: bool = False
    """Exclude ``lo`` itself (``> lo`` instead of ``>= lo``)."""
    hi: Optional[float] = None
    """Upper bound; None: unbounded above."""
    hi_open: bool = False
    """Exclude ``hi`` itself."""
    optional: bool = False
    """None is allowed (the field's "not set")."""

    def ok(self, v: Any) -> bool:
        if v is None:
            return self.optional
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if self.integer and not isinstance(v, int):
            return False
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def allowed(self) -> str:
        kind = "an int" if self.integer else "a finite number"
        if self.lo is not None and self.hi is not None:
            bounds = (f" in {'(' if self.lo_open else '['}{self.lo:g}, "
                      f"{self.hi:g}{')' if self.hi_open else ']'}")
        elif self.lo is not None:
            bounds = f" {'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is not None:
            bounds = f" {'<' if self.hi_open else '<='} {self.hi:g}"
        else:
            bounds = ""
        return ("None or " if self.optional else "") + kind + bounds


_POSITIVE_INT = Range(integer=True, lo=1)
_OPTIONAL_INT = Range(integer=True, lo=1, optional=True)
_NON_NEGATIVE = Range(lo=0)
_POSITIVE = Range(lo=0, lo_open=True)

MODEL_RANGES: dict[str, Range] = {
    **{name: _POSITIVE_INT for name in (
        "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
        "moe_router_topk", "max_position_embeddings")},
    **{name: _OPTIONAL_INT for name in (
        "num_query_groups", "head_dim", "num_experts", "moe_ffn_hidden_size",
        "shared_expert_size", "router_n_groups", "router_topk_groups",
        "router_group_score_topk", "q_lora_rank",
        "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
        "rope_original_max_position")},
    "mtp_layers": Range(integer=True, lo=0),
    "router_bias_update_rate": _NON_NEGATIVE,
    "router_scaling_factor": _POSITIVE,
    "aux_loss_coef": _NON_NEGATIVE,
    "z_loss_coef": _NON_NEGATIVE,
    "rope_theta": _POSITIVE,
    "rope_factor": Range(lo=1),  # YaRN stretches the context by it; 1 = no scaling
    "rope_beta_fast": _POSITIVE,
    "rope_beta_slow": _POSITIVE,
    "rope_mscale": _NON_NEGATIVE,
    "rope_mscale_all_dim": _NON_NEGATIVE,
    "rms_norm_eps": Range(lo=0, lo_open=True, hi=1, hi_open=True),
    "init_std": _POSITIVE,
}
"""ModelConfig's numeric fields (``dense_layers``, a tuple, is checked in ``validate``)."""

PARALLEL_RANGES: dict[str, Range] = {
    **{name: _POSITIVE_INT for name in ("tp", "pp", "ep", "etp")},
    **{name: _OPTIONAL_INT for name in ("pp_first_stage_layers", "pp_last_stage_layers",
                                        "world_size", "micro_batch_size")},
    "max_tokens_per_microbatch": Range(integer=True, lo=0),
    "max_tokens_per_logprob_forward": Range(integer=True, lo=0),
}
"""ParallelConfig's numeric fields."""

EXPERT_MODES = ("auto", "grouped", "sequential")
"""How the routed experts run (``parallel.experts``, ``rollout.experts``): r1fast's grouped
kernels, megatron's per-expert loop, or "auto": grouped on a GPU."""


def runs_grouped(mode: str, on_gpu: bool) -> bool:
    """Whether experts setting ``mode`` runs the grouped kernels on a GPU (``on_gpu``) or not
    (what the planner assumes; r1fast.policy.local_experts decides at run time)."""
    return mode == "grouped" or (mode == "auto" and on_gpu)


PARALLEL_CHOICES: dict[str, tuple[str, ...]] = {
    "recompute": ("none", "selective", "full"),
    "experts": EXPERT_MODES,
}
"""ParallelConfig's fields that take one of a few names."""


def pipeline_stage_layers(first: Optional[int], last: Optional[int], pp: int,
                          num_layers: int) -> list[int]:
    """Layers of each of ``pp`` pipeline stages, ``first``/``last`` on the first/last stage
    when given (ParallelConfig's ``pp_first_stage_layers``/``pp_last_stage_layers``), the
    middle stages an even share; raises ValueError naming the field when the split does not
    add up to ``num_layers``."""
    for name, v in (("pp_first_stage_layers", first), ("pp_last_stage_layers", last)):
        if v is not None and (pp == 1 or v < 1):
            raise ValueError(f"ParallelConfig: {name} must be None at pp=1 and >= 1 "
                             f"otherwise, got {v} at pp={pp}")
    if first is not None and last is not None and pp == 2 and first + last != num_layers:
        raise ValueError(f"ParallelConfig: pp_first_stage_layers + pp_last_stage_layers "
                         f"({first} + {last}) must equal num_layers ({num_layers}) at pp=2")
    if first is None and last is None and num_layers % pp != 0:
        raise ValueError(f"ParallelConfig: num_layers ({num_layers}) must be divisible by pp "
                         f"({pp}), or set pp_first_stage_layers / pp_last_stage_layers")
    middle = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    if middle == 0 and rest != 0 or middle and (rest < middle or rest % middle != 0):
        raise ValueError(f"ParallelConfig: pp_first_stage_layers/pp_last_stage_layers "
                         f"({first}/{last}) do not split num_layers ({num_layers}) "
                         f"over pp={pp} stages: {rest} layers left for {middle} stages")
    each = rest // middle if middle else 0
    out = [each] * pp
    if first is not None:
        out[0] = first
    if last is not None:
        out[-1] = last
    return out


def check_fields(owner: str, obj: Any, ranges: dict[str, Range]) -> None:
    """Raise ``ValueError("<owner>: <field> must be <allowed>, got <value>")`` for the first
    field of ``obj`` outside its range."""
    for name, rule in ranges.items():
        value = getattr(obj, name)
        if not rule.ok(value):
            raise ValueError(f"{owner}: {name} must be {rule.allowed()}, got {value!r}")


HF_KEYS: dict[str, str] = {
    "num_layers": "num_hidden_layers", "num_query_groups": "num_key_value_heads",
    "ffn_hidden_size": "intermediate_size", "moe_ffn_hidden_size": "moe_intermediate_size",
    "moe_router_topk": "num_experts_per_tok", "num_experts": "n_routed_experts / num_experts",
    "router_n_groups": "n_group", "router_topk_groups": "topk_group",
    "router_group_score_topk": "topk_method (deepseek_v2)",
    "router_scaling_factor": "routed_scaling_factor", "init_std": "initializer_range",
    "mtp_layers": "num_nextn_predict_layers", "rope_factor": "rope_parameters.factor",
    "dense_layers": "first_k_dense_replace / mlp_only_layers",
    "shared_expert_size": "n_shared_experts x moe_intermediate_size",
    "tie_embeddings": "tie_word_embeddings",
}
"""ModelConfig field -> the Hugging Face config key it comes from, where the names differ."""


def validated_from_hf(cls, kw: dict[str, Any], model_type: str):
    """``cls(**kw).validate()``; a ValueError also names the HF keys of the fields it names, so
    a bad config.json is reported in its own vocabulary."""
    import logging
    import re

    if kw.get("aux_loss_coef"):  # Qwen3-MoE's router_aux_loss_coef, with output_router_logits
        logging.getLogger("r1fast.policy").warning(
            "from_hf_config: %s router_aux_loss_coef=%g becomes megatron's aux-loss "
            "coefficient, a loss per MoE layer summed over the layers (c*E/k*sum f*P each), "
            "where transformers pools every layer's counts into one loss (c*E*sum f*P): the "
            "same value weighs about layers/k times more here; set model.aux_loss_coef to "
            "choose", model_type, kw["aux_loss_coef"])
    try:
        return cls(**kw).validate()
    except ValueError as e:
        named = [f"{field} is {model_type} {key}" for field, key in HF_KEYS.items()
                 if re.search(rf"\b{field}\b", str(e))]
        if not named:
            raise
        raise ValueError(f"{e} (from_hf_config: {'; '.join(named)})") from None
