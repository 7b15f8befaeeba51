"""Typed configuration of the policy: what the model is (:class:`ModelConfig`) and how it is laid
out over processes (:class:`ParallelConfig`).

ModelConfig speaks the Hugging Face / paper vocabulary (hidden size, query groups, top-k,
DeepSeek-V3 group-limited routing with an aux-loss-free expert bias ...) and is translated into
a megatron-core ``TransformerConfig`` by :mod:`r1fast.policy.model`. Presets build tiny models
that run on a CPU in milliseconds; :meth:`ModelConfig.from_hf_config` reads a ``transformers``
config of the supported families (qwen3_moe, qwen3, qwen2, deepseek_v3, deepseek_v2).

Multi-head latent attention (``attention="mla"``, DeepSeek-V2/V3) uses megatron-core's
``MLASelfAttention``: q is ``hidden -> q_lora_rank -> RMSNorm -> heads x (qk_nope + qk_rope)``
(or one projection when ``q_lora_rank`` is None), k/v come from a compressed latent
``hidden -> kv_lora_rank (+ qk_rope shared RoPE key) -> RMSNorm -> heads x (qk_nope + v)``.

ParallelConfig holds the tensor (TP), pipeline (PP) and expert (EP) sizes; the data-parallel
size is what is left of the world size. :meth:`ParallelConfig.validate` raises a ``ValueError``
naming the first thing that does not divide.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

from r1fast.policy.config_checks import (MODEL_RANGES, PARALLEL_CHOICES, PARALLEL_RANGES,
                                         check_fields, pipeline_stage_layers,
                                         validated_from_hf)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUPPORTED_HF_MODEL_TYPES = ("qwen3_moe", "qwen3", "qwen2", "deepseek_v3", "deepseek_v2")
ATTENTIONS = ("gqa", "mla")
ROPE_TYPES = ("default", "yarn")
AUX_LOSS_TYPES = ("aux_loss", "seq_aux_loss")


@dataclass
class ModelConfig:
    """Architecture of a decoder-only (MoE) transformer, Qwen3/Qwen3-MoE/DeepSeek-V3 style."""

    vocab_size: int = 256
    """Vocabulary size (rows of the embedding and of the output layer)."""
    hidden_size: int = 64
    """Width of the residual stream, H."""
    num_layers: int = 2
    """Number of transformer blocks."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: Optional[int] = None
    """Key/value heads (grouped-query attention); None means one per query head (MHA)."""
    head_dim: Optional[int] = None
    """Per-head width (megatron kv_channels); None means hidden_size // num_attention_heads."""
    ffn_hidden_size: int = 128
    """Intermediate width of the dense SwiGLU MLP (dense models and dense layers of MoE models)."""
    num_experts: Optional[int] = None
    """Routed experts per MoE layer; None builds a dense model."""
    moe_ffn_hidden_size: Optional[int] = None
    """Intermediate width of one routed expert (SwiGLU)."""
    moe_router_topk: int = 2
    """Experts each token is routed to, k."""
    dense_layers: tuple[int, ...] = ()
    """0-based indices of layers that use the dense MLP in an MoE model (HF mlp_only_layers)."""
    shared_expert_size: Optional[int] = None
    """Intermediate width of an always-on shared expert (DeepSeek/Qwen2-MoE); None: none."""
    shared_expert_gate: bool = False
    """Scale the shared expert by a learned sigmoid gate (Qwen2-MoE); DeepSeek-V3 has none."""
    router_score: str = "softmax"
    """Router score function: "softmax" (Qwen3-MoE, Mixtral) or "sigmoid" (DeepSeek-V3)."""
    router_pre_softmax: bool = False
    """softmax only: take the softmax over all experts before top-k (weights not renormalised
    unless router_normalize); False takes the top-k of the logits and a softmax over those k,
    which equals renormalising the full softmax (Qwen3-MoE norm_topk_prob=True)."""
    router_n_groups: Optional[int] = None
    """Group-limited routing (DeepSeek-V3): experts split into this many groups."""
    router_topk_groups: Optional[int] = None
    """Group-limited routing: groups kept per token."""
    router_group_score_topk: Optional[int] = None
    """Group-limited routing: how many of a group's best scores sum to the group's score.
    None: moe_router_topk // router_topk_groups (Megatron's rule; 2 for DeepSeek-V3); 1: the
    group's best expert (DeepSeek-V2's group_limited_greedy). Loading a deepseek_v3 config sets
    2 where Megatron's rule would differ (transformers' DeepSeek-V3 always sums the top 2)."""
    router_expert_bias: bool = False
    """Aux-loss-free balancing: a per-expert bias added to the scores for selection only, nudged
    after each step towards equal load (DeepSeek-V3). Needs the sigmoid score."""
    router_bias_update_rate: float = 1e-3
    """Step of the aux-loss-free expert-bias update after each optimizer step, bias += rate *
    sign(mean_load - load) (megatron's finalize_model_grads); 0 switches the update off and
    keeps the bias fixed, as RL recipes and imported deepseek_v3 checkpoints do."""
    router_scaling_factor: float = 1.0
    """Multiplies the routing weights (DeepSeek-V3 uses 2.5)."""
    router_normalize: Optional[bool] = None
    """Renormalise the k selected weights to sum to 1; None: the op's default for the score
    function (sigmoid: yes; softmax: implied by router_pre_softmax=False)."""
    aux_loss_coef: float = 0.0
    """Coefficient of the load-balancing auxiliary loss (0 disables it), per MoE layer."""
    aux_loss_type: str = "aux_loss"
    """Which load-balancing loss: "aux_loss" (Switch / megatron's, over each micro-batch's
    tokens) or "seq_aux_loss" (DeepSeek-V3's sequence-wise one: the same loss within each row
    of a micro-batch, averaged over the rows; a packed row is one sequence)."""
    z_loss_coef: float = 0.0
    """Coefficient of the router z-loss (0 disables it)."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding."""
    attention: str = "gqa"
    """"gqa" (grouped-query attention, Qwen) or "mla" (multi-head latent attention, DeepSeek)."""
    q_lora_rank: Optional[int] = None
    """MLA: rank of the query down-projection (then RMSNorm, then up); None: one q projection."""
    kv_lora_rank: Optional[int] = None
    """MLA: rank of the compressed key/value latent (required for attention="mla")."""
    qk_nope_head_dim: Optional[int] = None
    """MLA: per-head q/k dims without RoPE."""
    qk_rope_head_dim: Optional[int] = None
    """MLA: per-head q/k dims with (decoupled) RoPE; the RoPE key is shared by all heads."""
    v_head_dim: Optional[int] = None
    """MLA: per-head value width (may differ from qk_nope + qk_rope)."""
    rope_type: str = "default"
    """"default" or "yarn" (YaRN context extension, MLA only, as DeepSeek-V3 configures it)."""
    rope_factor: float = 1.0
    """YaRN: scaling factor (DeepSeek-V3: 40)."""
    rope_original_max_position: Optional[int] = None
    """YaRN: context length of pre-training (None: max_position_embeddings)."""
    rope_beta_fast: float = 32.0
    """YaRN: high-frequency boundary (rotations)."""
    rope_beta_slow: float = 1.0
    """YaRN: low-frequency boundary (rotations)."""
    rope_mscale: float = 1.0
    """YaRN: mscale of the cos/sin attention factor."""
    rope_mscale_all_dim: float = 0.0
    """YaRN: mscale_all_dim; the softmax scale is multiplied by (0.1 mscale_all_dim ln factor
    + 1)^2 when it is non-zero."""
    mtp_layers: int = 0
    """Multi-token-prediction layers of the checkpoint (num_nextn_predict_layers): not built
    (GRPO does not train them); load_hf_checkpoint keeps their tensors and save writes them
    back unchanged."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    qk_layernorm: bool = True
    """RMSNorm on each query/key head before RoPE (Qwen3); Qwen2 has none."""
    add_qkv_bias: bool = False
    """Biases on the q/k/v projections (Qwen2)."""
    tie_embeddings: bool = False
    """Share the input embedding and the output layer weight."""
    max_position_embeddings: int = 4096
    """Longest sequence the rotary table is built for."""
    params_dtype: str = "float32"
    """Parameter dtype: "float32", "bfloat16" or "float16"."""
    init_std: float = 0.02
    """Standard deviation of the random initialisation (when not loading weights)."""

    # ----------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def is_mla(self) -> bool:
        return self.attention == "mla"

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        """Per-head q/k width: qk_nope + qk_rope under MLA, else kv_channels."""
        if self.is_mla:
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.kv_channels

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.params_dtype]

    def moe_layer_pattern(self) -> list[int]:
        """1 for an MoE layer, 0 for a dense one, per layer (megatron moe_layer_freq)."""
        return [0 if i in self.dense_layers else 1 for i in range(self.num_layers)]

    def validate(self) -> "ModelConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"ModelConfig: {msg}")

        check_fields("ModelConfig", self, MODEL_RANGES)  # every number finite and in range
        need(self.num_attention_heads % self.kv_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
             f"num_query_groups ({self.kv_heads})")
        need(self.attention in ATTENTIONS,
             f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        self._validate_attention(need)
        need(self.is_mla or self.head_dim is not None
             or self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
             f"({self.num_attention_heads}) when head_dim is not given")
        need(self.params_dtype in _DTYPES,
             f"params_dtype must be one of {tuple(_DTYPES)}, got {self.params_dtype!r}")
        need(self.aux_loss_type in AUX_LOSS_TYPES, f"aux_loss_type must be one of "
             f"{AUX_LOSS_TYPES}, got {self.aux_loss_type!r}")
        need(self.router_score in ("softmax", "sigmoid"),
             f"router_score must be one of ('softmax', 'sigmoid'), got {self.router_score!r}")
        if self.is_moe:
            need(self.moe_ffn_hidden_size is not None,
                 "moe_ffn_hidden_size must be set (>= 1) for an MoE model")
            need(1 <= self.moe_router_topk <= self.num_experts,
                 f"moe_router_topk must be in [1, num_experts={self.num_experts}], "
                 f"got {self.moe_router_topk}")
            need(all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_layers
                     for i in self.dense_layers),
                 f"dense_layers must be layer indices in [0, {self.num_layers}), "
                 f"got {self.dense_layers}")
            if (self.router_n_groups is None) != (self.router_topk_groups is None):
                raise ValueError("ModelConfig: router_n_groups and router_topk_groups must be "
                                 "given together")
            if self.router_n_groups is not None:
                need(self.num_experts % self.router_n_groups == 0,
                     f"num_experts ({self.num_experts}) must be divisible by router_n_groups "
                     f"({self.router_n_groups})")
                need(1 <= self.router_topk_groups <= self.router_n_groups,
                     f"router_topk_groups must be in [1, router_n_groups={self.router_n_groups}],"
                     f" got {self.router_topk_groups}")
                need(self.router_topk_groups <= self.moe_router_topk,
                     f"router_topk_groups ({self.router_topk_groups}) must be <= "
                     f"moe_router_topk ({self.moe_router_topk}): each kept group gives an expert")
                kept = self.router_topk_groups * (self.num_experts // self.router_n_groups)
                need(kept >= self.moe_router_topk,
                     f"router_topk_groups ({self.router_topk_groups}) groups of "
                     f"{self.num_experts // self.router_n_groups} experts hold {kept} experts, "
                     f"fewer than moe_router_topk ({self.moe_router_topk})")
                m = self.router_group_score_topk
                per_group = self.num_experts // self.router_n_groups
                need(m is None or (isinstance(m, int) and not isinstance(m, bool)
                                   and 1 <= m <= per_group),
                     f"router_group_score_topk must be None or an int in [1, experts per group="
                     f"{per_group}], got {m!r}")
            need(self.router_group_score_topk is None or self.router_n_groups is not None,
                 "router_group_score_topk needs group-limited routing (router_n_groups), got "
                 f"router_group_score_topk={self.router_group_score_topk!r}")
            need(not self.router_expert_bias or self.router_score == "sigmoid",
                 "router_expert_bias (aux-loss-free balancing) needs router_score='sigmoid'")
            need(not (self.router_pre_softmax and self.router_score == "sigmoid"),
                 "router_pre_softmax applies to router_score='softmax' only")
            # a softmax over the one selected logit is 1 whatever the logits: megatron refuses it
            need(not (self.moe_router_topk == 1 and self.router_score == "softmax"
                      and not self.router_pre_softmax),
                 "moe_router_topk=1 with router_score='softmax' needs router_pre_softmax=true "
                 "(a softmax over the one selected logit is always 1: nothing trains the router)")
        else:
            need(not self.dense_layers and self.shared_expert_size is None,
                 "dense_layers/shared_expert_size need num_experts (an MoE model)")
        return self

    def _validate_attention(self, need) -> None:
        mla_fields = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                      "v_head_dim")
        if not self.is_mla:
            for name in mla_fields:
                need(getattr(self, name) is None, f"{name} is an MLA field: set attention='mla'"
                     f" or leave {name} None")
            need(self.rope_type == "default",
                 f"rope_type {self.rope_type!r} needs attention='mla' (only default RoPE for gqa)")
        else:
            for name in mla_fields[1:]:
                v = getattr(self, name)
                need(v is not None and v >= 1, f"{name} must be set (>= 1) for attention='mla', "
                     f"got {v}")
            need(self.qk_rope_head_dim % 2 == 0,
                 f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
            need(self.kv_heads == self.num_attention_heads,
                 f"num_query_groups ({self.kv_heads}) must equal num_attention_heads "
                 f"({self.num_attention_heads}) under MLA (or be None)")
            need(not self.add_qkv_bias, "add_qkv_bias is not supported with attention='mla'")
        need(self.rope_type in ROPE_TYPES,
             f"rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dense_layers"] = list(self.dense_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {unknown}")
        d = dict(d)
        if "dense_layers" in d:
            d["dense_layers"] = tuple(d["dense_layers"])
        return cls(**d).validate()

    # ----------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """Tiny CPU-sized models: ``tiny-moe`` (Qwen3-MoE-like), ``tiny-dsv3`` (DeepSeek-V3-like
        routing: sigmoid, groups, expert bias, shared expert; GQA attention), ``tiny-dsv3-mla``
        (the DeepSeek-V3 architecture: MLA, dense first layer, V3 routing), ``tiny-dense``
        (Qwen3-like dense student for distillation)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {tuple(PRESETS)}")
        return dataclasses.replace(PRESETS[name]).validate()

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> "ModelConfig":
        """Translate a ``transformers`` config (object or dict) of a supported family."""
        get = (hf_config.get if isinstance(hf_config, dict)
               else lambda k, default=None: getattr(hf_config, k, default))
        model_type = get("model_type")
        if model_type not in SUPPORTED_HF_MODEL_TYPES:
            raise ValueError(f"from_hf_config: model_type must be one of "
                             f"{SUPPORTED_HF_MODEL_TYPES}, got {model_type!r}")
        act = get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"from_hf_config: hidden_act must be 'silu', got {act!r}")
        if get("use_sliding_window", False):
            raise ValueError("from_hf_config: sliding-window attention (use_sliding_window=True) "
                             "is not supported")
        rope = get("rope_parameters") or get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
        if rope_type != "default" and not model_type.startswith("deepseek"):
            raise ValueError(f"from_hf_config: only default RoPE is supported, got rope_type="
                             f"{rope_type!r}")
        theta = rope.get("rope_theta") if rope else None
        theta = theta if theta is not None else get("rope_theta", 10000.0)
        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        dtype = get("torch_dtype") or get("dtype") or "float32"
        dtype = str(dtype).replace("torch.", "")
        kw: dict[str, Any] = dict(
            vocab_size=get("vocab_size"), hidden_size=hidden, num_layers=get("num_hidden_layers"),
            num_attention_heads=heads, num_query_groups=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or hidden // heads,
            ffn_hidden_size=get("intermediate_size"), rope_theta=float(theta),
            rms_norm_eps=get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(get("tie_word_embeddings", False)),
            max_position_embeddings=get("max_position_embeddings", 4096),
            params_dtype=dtype if dtype in _DTYPES else "float32",
            init_std=get("initializer_range", 0.02),
        )
        if model_type in ("deepseek_v3", "deepseek_v2"):
            from r1fast.policy.hf_deepseek import deepseek_from_hf

            return validated_from_hf(cls, deepseek_from_hf(get, kw, model_type), model_type)
        from r1fast.policy.hf_qwen import qwen_from_hf

        return validated_from_hf(cls, qwen_from_hf(get, kw, model_type), model_type)

    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` dict of the matching HF family (qwen3_moe / qwen3 / qwen2;
        deepseek_v3 or deepseek_v2 for MLA)."""
        if self.is_mla:
            from r1fast.policy.hf_deepseek import deepseek_to_hf

            return deepseek_to_hf(self, self._hf_common())
        from r1fast.policy.hf_qwen import qwen_to_hf

        return qwen_to_hf(self, self._hf_common())

    def _hf_common(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.kv_channels,
            "intermediate_size": self.ffn_hidden_size, "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "rope_theta": self.rope_theta, "initializer_range": self.init_std,
            "attention_dropout": 0.0, "use_sliding_window": False, "dtype": self.params_dtype,
            "torch_dtype": self.params_dtype,  # the name before transformers 5
        }


@dataclass
class ParallelConfig:
    """How the model is split over ``world_size`` processes. DP = world / (TP * PP); the expert
    layers use EP out of the same ranks (expert DP = world / (EP * PP))."""

    tp: int = 1
    """Tensor parallel size: attention heads, MLP width and vocabulary split over tp ranks."""
    pp: int = 1
    """Pipeline parallel size: layers split over pp stages (one chunk per rank)."""
    pp_first_stage_layers: Optional[int] = None
    """Uneven pipelines: layers on the first stage (megatron num_layers_in_first_pipeline_stage);
    None: an even share. The middle stages split what the first/last leave evenly."""
    pp_last_stage_layers: Optional[int] = None
    """Uneven pipelines: layers on the last stage (e.g. fewer, as it also holds the head)."""
    recompute: str = "none"
    """Activation recompute (megatron's granularities): "none"; "selective" recomputes the
    core attention in the backward (megatron recompute_modules=["core_attn"]: the [s, s]
    softmax of the local attention; megatron's "layernorm" needs Transformer Engine and
    "moe_act" grouped GEMM, neither used here); "full" keeps only each layer's input and
    re-runs the whole layer (recompute_method="uniform", recompute_num_layers=1)."""
    ep: int = 1
    """Expert parallel size: routed experts split over ep ranks."""
    etp: int = 1
    """Expert tensor parallel size (only 1 is supported: whole experts per rank)."""
    sequence_parallel: Optional[bool] = None
    """Split the sequence over TP ranks outside attention/MLP. None: on exactly when tp > 1 and
    the model has experts (megatron refuses to train MoE at tp > 1 without it) or MLA; off
    otherwise. Requires the sequence length to be padded to a multiple of tp (done by Policy)."""
    world_size: Optional[int] = None
    """Number of processes; None: torch.distributed's world size (1 if not initialised)."""
    micro_batch_size: Optional[int] = None
    """Sequences per microbatch in forward_backward; None: the whole local batch at once."""
    max_tokens_per_microbatch: int = 0
    """Token budget of a packed micro-batch: the trainer packs sequences end to end (no padding
    between them, a block-diagonal causal mask, positions restarting per sequence) into
    micro-batches of at most this many tokens, so memory follows tokens, not rows. 0: padded
    micro-batches of ``micro_batch_size`` rows."""
    max_tokens_per_logprob_forward: int = 0
    """Token budget of one packed no-grad forward of the old and reference log-probs (verl's
    log_prob_max_token_len_per_gpu): nothing is kept for a backward there, so it can be several
    times ``max_tokens_per_microbatch`` and save forwards. 0: four times
    ``max_tokens_per_microbatch``. Only with packing."""
    balance_dp_tokens: bool = True
    """With packed micro-batches and DP > 1: move whole rows between the DP ranks before the
    update so each holds about the same number of tokens (r1fast.train.balance; per
    mini-batch, deterministic, the same update up to rounding). Off: each rank updates on the
    rows it generated."""
    experts: str = "auto"
    """How the policy's forwards and backwards compute the routed experts (r1fast's lean
    gated-SiLU experts, etp=1): "grouped" (r1fast's grouped Triton kernels, two launches
    forward and four backward per MoE layer; on one rank the row counts stay on the GPU: no
    wait per layer; an error where Triton cannot run), "sequential" (megatron's per-expert
    loop: a launch per expert, the counts read on the host), "auto" (grouped on a GPU, the
    loop on a CPU). The KV-cache decoder has its own ``rollout.experts``."""

    def __post_init__(self) -> None:
        self._check_fields()  # a bad [parallel] value fails at load time, naming the field

    def _check_fields(self) -> None:
        """What needs neither the model nor the world size."""
        check_fields("ParallelConfig", self, PARALLEL_RANGES)
        if self.etp != 1:
            raise ValueError(f"ParallelConfig: etp (expert tensor parallel) must be 1, "
                             f"got {self.etp}")
        for name, allowed in PARALLEL_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ParallelConfig: {name} must be one of {allowed}, got "
                                 f"{getattr(self, name)!r}")
        if self.sequence_parallel not in (None, True, False):
            raise ValueError(f"ParallelConfig: sequence_parallel must be None, true or false, "
                             f"got {self.sequence_parallel!r}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("ParallelConfig: sequence_parallel needs tp > 1")

    @property
    def dp(self) -> int:
        return self.resolved_world_size() // (self.tp * self.pp)

    @property
    def logprob_forward_tokens(self) -> int:
        """Tokens of one packed no-grad log-prob forward (its field's value, else 4 x update's)."""
        return self.max_tokens_per_logprob_forward or 4 * self.max_tokens_per_microbatch

    @property
    def expert_dp(self) -> int:
        return self.resolved_world_size() // (self.ep * self.etp * self.pp)

    def megatron_kwargs(self) -> dict[str, Any]:
        """The TransformerConfig fields of the pipeline split and of activation recompute."""
        kw: dict[str, Any] = dict(num_layers_in_first_pipeline_stage=self.pp_first_stage_layers,
                                  num_layers_in_last_pipeline_stage=self.pp_last_stage_layers)
        if self.recompute == "selective":
            kw.update(recompute_granularity="selective", recompute_modules=["core_attn"])
        elif self.recompute == "full":
            kw.update(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)
        return kw

    def stage_layers(self, num_layers: int) -> list[int]:
        """Layers of each pipeline stage (raises ValueError naming the field when the split
        does not add up to ``num_layers``)."""
        return pipeline_stage_layers(self.pp_first_stage_layers, self.pp_last_stage_layers,
                                     self.pp, num_layers)

    def resolved_world_size(self) -> int:
        if self.world_size is not None:
            return self.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size()
        return 1

    def use_sequence_parallel(self, model: Optional[ModelConfig] = None) -> bool:
        if self.sequence_parallel is not None:
            return bool(self.sequence_parallel) and self.tp > 1
        return self.tp > 1 and model is not None and (model.is_moe or model.is_mla)

    def validate(self, model: Optional[ModelConfig] = None) -> "ParallelConfig":
        """Raise ValueError for a layout that cannot hold ``model`` on this world size."""
        self._check_fields()
        ws = self.resolved_world_size()
        if ws % (self.tp * self.pp) != 0:
            raise ValueError(f"ParallelConfig: world size {ws} is not a multiple of tp*pp = "
                             f"{self.tp}*{self.pp}")
        if ws % (self.ep * self.etp * self.pp) != 0:
            raise ValueError(f"ParallelConfig: world size {ws} is not a multiple of ep*pp = "
                             f"{self.ep}*{self.pp}")
        if model is None:
            return self
        self.stage_layers(model.num_layers)
        if model.num_attention_heads % self.tp != 0:
            raise ValueError(f"ParallelConfig: num_attention_heads ({model.num_attention_heads}) "
                             f"must be divisible by tp ({self.tp})")
        if model.kv_heads % self.tp != 0:
            raise ValueError(f"ParallelConfig: num_query_groups ({model.kv_heads}) must be "
                             f"divisible by tp ({self.tp})")
        if model.vocab_size % self.tp != 0:
            raise ValueError(f"ParallelConfig: vocab_size ({model.vocab_size}) must be divisible "
                             f"by tp ({self.tp}); pad the vocabulary (padded rows would enter "
                             f"the softmax, so r1fast does not pad silently)")
        for name in ("ffn_hidden_size", "moe_ffn_hidden_size", "shared_expert_size"):
            v = getattr(model, name)
            if v is not None and v % self.tp != 0:
                raise ValueError(f"ParallelConfig: {name} ({v}) must be divisible by tp "
                                 f"({self.tp})")
        if model.is_moe:
            if model.num_experts % self.ep != 0:
                raise ValueError(f"ParallelConfig: num_experts ({model.num_experts}) must be "
                                 f"divisible by ep ({self.ep})")
        elif self.ep != 1:
            raise ValueError(f"ParallelConfig: ep must be 1 for a dense model, got {self.ep}")
        if self.sequence_parallel is False and self.tp > 1 and model.is_mla:
            raise ValueError("ParallelConfig: attention='mla' at tp > 1 needs sequence_parallel "
                             "(r1fast.policy.mla.DuplicatedLinear); leave it None")
        if self.sequence_parallel is False and self.tp > 1 and model.is_moe:
            raise ValueError("ParallelConfig: an MoE model at tp > 1 needs sequence_parallel "
                             "(megatron refuses to train it otherwise); leave it None")
        return self


PRESETS: dict[str, ModelConfig] = {
    "tiny-moe": ModelConfig(
        vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
        head_dim=16, ffn_hidden_size=128, num_experts=8, moe_ffn_hidden_size=32,
        moe_router_topk=2, router_score="softmax", qk_layernorm=True, max_position_embeddings=512,
        aux_loss_coef=1e-3),
    "tiny-dsv3": ModelConfig(
        vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
        head_dim=16, ffn_hidden_size=128, num_experts=8, moe_ffn_hidden_size=32,
        moe_router_topk=2, shared_expert_size=32, router_score="sigmoid", router_n_groups=4,
        router_topk_groups=2, router_expert_bias=True, router_bias_update_rate=1e-3,
        router_scaling_factor=2.5, qk_layernorm=True, max_position_embeddings=512),
    "tiny-dsv3-mla": ModelConfig(  # DeepSeek-V3 in small: MLA + V3 routing, first layer dense
        vocab_size=256, hidden_size=64, num_layers=3, num_attention_heads=4, num_query_groups=4,
        attention="mla", router_normalize=True,
        q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, ffn_hidden_size=128, num_experts=8, moe_ffn_hidden_size=32,
        moe_router_topk=4, dense_layers=(0,), shared_expert_size=32, router_score="sigmoid",
        router_n_groups=4, router_topk_groups=2, router_expert_bias=True,
        router_bias_update_rate=0.0, router_scaling_factor=2.5, max_position_embeddings=512),
    "tiny-dense": ModelConfig(
        vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
        head_dim=16, ffn_hidden_size=128, qk_layernorm=True, max_position_embeddings=512),
}
