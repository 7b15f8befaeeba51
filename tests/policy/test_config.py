"""ModelConfig / ParallelConfig: presets, validation messages (one test per bad input), the
translation from and to Hugging Face configs, and the derived data-parallel sizes."""
from __future__ import annotations

import dataclasses
import logging
import re

import pytest

from r1fast.policy.config import PRESETS, ModelConfig, ParallelConfig

QWEN3_MOE = {
    "model_type": "qwen3_moe", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "intermediate_size": 128, "moe_intermediate_size": 32, "num_experts": 8,
    "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "max_position_embeddings": 128, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
    "hidden_act": "silu", "attention_bias": False, "use_sliding_window": False,
    "router_aux_loss_coef": 0.001, "output_router_logits": False, "dtype": "bfloat16",
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    cfg = ModelConfig.preset(name)
    assert cfg.validate() is cfg
    assert cfg.is_moe == (name != "tiny-dense")


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        ModelConfig.preset("nope")


def test_dsv3_preset_routing():
    cfg = ModelConfig.preset("tiny-dsv3")
    assert (cfg.router_score, cfg.router_n_groups, cfg.router_topk_groups) == ("sigmoid", 4, 2)
    assert cfg.router_expert_bias and cfg.shared_expert_size == 32
    assert cfg.router_scaling_factor == 2.5


BAD_MODEL = [
    (dict(hidden_size=0), r"hidden_size must be an int >= 1, got 0"),
    (dict(num_query_groups=3), r"num_attention_heads \(4\) must be divisible by num_query_groups \(3\)"),
    (dict(head_dim=None, hidden_size=66), r"hidden_size \(66\) must be divisible by num_attention_heads"),
    (dict(params_dtype="int8"), r"params_dtype must be one of"),
    (dict(router_score="relu"), r"router_score must be one of \('softmax', 'sigmoid'\)"),
    (dict(moe_router_topk=1), r"moe_router_topk=1 with router_score='softmax' needs router_pre_softmax=true"),
    (dict(aux_loss_type="global_aux_loss"), r"aux_loss_type must be one of \('aux_loss', 'seq_aux_loss'\), got 'global_aux_loss'"),
    (dict(moe_ffn_hidden_size=None), r"moe_ffn_hidden_size must be set"),
    (dict(moe_router_topk=9), r"moe_router_topk must be in \[1, num_experts=8\], got 9"),
    (dict(dense_layers=(5,)), r"dense_layers must be layer indices in \[0, 2\)"),
    (dict(router_n_groups=4), r"router_n_groups and router_topk_groups must be given together"),
    (dict(router_n_groups=3, router_topk_groups=1), r"num_experts \(8\) must be divisible by router_n_groups \(3\)"),
    (dict(router_n_groups=4, router_topk_groups=5), r"router_topk_groups must be in \[1, router_n_groups=4\]"),
    (dict(router_expert_bias=True), r"router_expert_bias .* needs router_score='sigmoid'"),
    (dict(router_score="sigmoid", router_pre_softmax=True), r"router_pre_softmax applies to router_score='softmax' only"),
    (dict(router_n_groups=4, router_topk_groups=3), r"router_topk_groups \(3\) must be <= moe_router_topk \(2\)"),
    (dict(router_n_groups=4, router_topk_groups=1, moe_router_topk=3),
     r"router_topk_groups \(1\) groups of 2 experts hold 2 experts, fewer than moe_router_topk \(3\)"),
    (dict(dense_layers=(0.0,)), r"dense_layers must be layer indices in \[0, 2\)"),
]


@pytest.mark.parametrize("changes,msg", BAD_MODEL)
def test_model_validation_messages(changes, msg):
    with pytest.raises(ValueError, match=msg):
        ModelConfig.preset("tiny-moe").replace(**changes)


def test_dense_model_rejects_moe_only_fields():
    with pytest.raises(ValueError, match="dense_layers/shared_expert_size need num_experts"):
        ModelConfig.preset("tiny-dense").replace(shared_expert_size=16)


def test_dict_round_trip_and_unknown_field():
    cfg = ModelConfig.preset("tiny-dsv3").replace(dense_layers=(0,))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown fields \['bogus'\]"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


# ---------------------------------------------------------------------------- HF translation

def test_from_hf_qwen3_moe():
    cfg = ModelConfig.from_hf_config(dict(QWEN3_MOE, mlp_only_layers=[1], decoder_sparse_step=2))
    assert cfg.num_experts == 8 and cfg.moe_router_topk == 2 and cfg.moe_ffn_hidden_size == 32
    # HF: layer i is MoE iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
    assert cfg.dense_layers == (0, 1, 2)
    assert cfg.rope_theta == 1e6 and cfg.params_dtype == "bfloat16" and cfg.qk_layernorm
    assert cfg.router_score == "softmax" and not cfg.router_pre_softmax
    assert cfg.aux_loss_coef == 0.0  # HF applies the coefficient only with output_router_logits


def test_from_hf_qwen3_moe_without_topk_renormalisation(caplog):
    with caplog.at_level(logging.WARNING, logger="r1fast.policy"):
        cfg = ModelConfig.from_hf_config(dict(QWEN3_MOE, norm_topk_prob=False,
                                              output_router_logits=True))
    assert cfg.router_pre_softmax and cfg.router_normalize is False
    assert cfg.aux_loss_coef == 0.001
    # megatron's per-layer aux loss is not transformers' pooled one: said, not silent
    assert "router_aux_loss_coef=0.001 becomes megatron's aux-loss coefficient" in caplog.text


def test_from_hf_qwen2_has_qkv_bias_and_no_qk_norm():
    hf = {k: v for k, v in QWEN3_MOE.items() if "expert" not in k and k not in
          ("moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
           "head_dim", "attention_bias")}
    cfg = ModelConfig.from_hf_config(dict(hf, model_type="qwen2"))
    assert cfg.add_qkv_bias and not cfg.qk_layernorm and not cfg.is_moe
    assert cfg.kv_channels == 16


def test_from_hf_accepts_a_transformers_object():
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16)
    cfg = ModelConfig.from_hf_config(hf)
    assert cfg.kv_heads == 2 and cfg.kv_channels == 16 and not cfg.is_moe


BAD_HF = [
    (dict(model_type="llama"), r"model_type must be one of \('qwen3_moe', 'qwen3', 'qwen2', 'deepseek_v3', 'deepseek_v2'\), got 'llama'"),
    (dict(hidden_act="gelu"), r"hidden_act must be 'silu', got 'gelu'"),
    (dict(use_sliding_window=True), r"sliding-window attention"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), r"only default RoPE is supported, got rope_type='yarn'"),
    (dict(attention_bias=True), r"attention_bias=True is not supported"),
]


@pytest.mark.parametrize("changes,msg", BAD_HF)
def test_from_hf_rejections(changes, msg):
    with pytest.raises(ValueError, match=msg):
        ModelConfig.from_hf_config(dict(QWEN3_MOE, **changes))


@pytest.mark.parametrize("cfg", [
    ModelConfig.preset("tiny-moe").replace(aux_loss_coef=0.0),
    ModelConfig.preset("tiny-moe").replace(router_pre_softmax=True, router_normalize=False,
                                           aux_loss_coef=0.0, dense_layers=(1,)),
    ModelConfig.preset("tiny-dense"),
    ModelConfig.preset("tiny-dense").replace(qk_layernorm=False, add_qkv_bias=True,
                                             tie_embeddings=True),
], ids=["qwen3_moe", "qwen3_moe-presoftmax", "qwen3", "qwen2-tied"])
def test_to_hf_config_round_trip(cfg):
    back = ModelConfig.from_hf_config(cfg.to_hf_config())
    for field in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "kv_heads",
                  "kv_channels", "ffn_hidden_size", "num_experts", "moe_ffn_hidden_size",
                  "moe_router_topk", "dense_layers", "router_pre_softmax", "qk_layernorm",
                  "add_qkv_bias", "tie_embeddings", "rope_theta", "rms_norm_eps"):
        assert getattr(back, field) == getattr(cfg, field), field


def test_to_hf_config_of_a_sequence_wise_loss_says_qwen_has_none(caplog):
    """Qwen3-MoE's router_aux_loss_coef is a batch-wise loss: a sequence-wise one is not
    written as it (export warns), a batch-wise one is."""
    cfg = ModelConfig.preset("tiny-moe").replace(aux_loss_coef=1e-3)
    assert cfg.to_hf_config()["router_aux_loss_coef"] == 1e-3
    with caplog.at_level(logging.WARNING, logger="r1fast.policy"):
        d = cfg.replace(aux_loss_type="seq_aux_loss").to_hf_config()
    assert d["router_aux_loss_coef"] == 0.0 and d["output_router_logits"] is False
    assert "qwen3_moe has no sequence-wise balance loss" in caplog.text


def test_to_hf_config_rejects_deepseek_routing():
    with pytest.raises(ValueError, match="only Qwen3-MoE-style routing"):
        ModelConfig.preset("tiny-dsv3").to_hf_config()


# ---------------------------------------------------------------------------- ParallelConfig

def test_parallel_sizes_derived_from_world():
    p = ParallelConfig(tp=2, pp=2, ep=4, world_size=8)
    assert p.validate(ModelConfig.preset("tiny-moe")) is p
    assert (p.dp, p.expert_dp) == (2, 1)
    assert ParallelConfig(world_size=1).dp == 1


def test_sequence_parallel_default():
    moe, dense = ModelConfig.preset("tiny-moe"), ModelConfig.preset("tiny-dense")
    assert ParallelConfig(tp=2).use_sequence_parallel(moe)
    assert not ParallelConfig(tp=2).use_sequence_parallel(dense)
    assert not ParallelConfig(tp=1).use_sequence_parallel(moe)
    assert ParallelConfig(tp=2, sequence_parallel=True).use_sequence_parallel(dense)


BAD_LAYOUT = [
    (dict(tp=2, world_size=3), None, r"world size 3 is not a multiple of tp\*pp = 2\*1"),
    (dict(ep=3, world_size=4), None, r"world size 4 is not a multiple of ep\*pp = 3\*1"),
    (dict(tp=0), None, r"tp must be an int >= 1, got 0"),
    (dict(etp=2, world_size=2), None, r"etp \(expert tensor parallel\) must be 1, got 2"),
    (dict(sequence_parallel=True), None, r"sequence_parallel needs tp > 1"),
    (dict(micro_batch_size=0), None, r"micro_batch_size must be None or an int >= 1, got 0"),
    (dict(tp=1.0), None, r"tp must be an int >= 1, got 1.0"),
    (dict(max_tokens_per_microbatch=-1), None, r"max_tokens_per_microbatch must be an int >= 0, got -1"),
    (dict(pp_first_stage_layers=0), None, r"pp_first_stage_layers must be None or an int >= 1, got 0"),
    (dict(world_size=0), None, r"world_size must be None or an int >= 1, got 0"),
    (dict(recompute="some"), None, r"recompute must be one of \('none', 'selective', 'full'\), got 'some'"),
    (dict(sequence_parallel="yes"), None, r"sequence_parallel must be None, true or false, got 'yes'"),
    (dict(experts="fast"), None, r"experts must be one of \('auto', 'grouped', 'sequential'\), got 'fast'"),
    (dict(pp=4, world_size=4), "tiny-moe", r"num_layers \(2\) must be divisible by pp \(4\)"),
    (dict(ep=3, world_size=3), "tiny-moe", r"num_experts \(8\) must be divisible by ep \(3\)"),
    (dict(tp=8, world_size=8), "tiny-moe", r"num_attention_heads \(4\) must be divisible by tp \(8\)"),
    (dict(tp=4, world_size=4), "tiny-moe", r"num_query_groups \(2\) must be divisible by tp \(4\)"),
    (dict(tp=2, world_size=2), "odd-vocab", r"vocab_size \(255\) must be divisible by tp \(2\)"),
    (dict(ep=2, world_size=2), "tiny-dense", r"ep must be 1 for a dense model, got 2"),
    (dict(tp=2, world_size=2, sequence_parallel=False), "tiny-moe",
     r"an MoE model at tp > 1 needs sequence_parallel"),
]


@pytest.mark.parametrize("layout,model,msg", BAD_LAYOUT)
def test_parallel_validation_messages(layout, model, msg):
    cfg = None
    if model == "odd-vocab":
        cfg = ModelConfig.preset("tiny-moe").replace(vocab_size=255)
    elif model is not None:
        cfg = ModelConfig.preset(model)
    with pytest.raises(ValueError, match=msg):
        ParallelConfig(**layout).validate(cfg)


def test_parallel_fields_are_checked_when_the_config_is_made():
    """A bad [parallel] value fails at load time (construction), before any layout is built."""
    with pytest.raises(ValueError, match=r"ParallelConfig: tp must be an int >= 1, got 0"):
        ParallelConfig(tp=0)
    from r1fast.train.config import load_train_config

    with pytest.raises(ValueError, match=r"ParallelConfig: ep must be an int >= 1, got -2"):
        load_train_config(None, ["--parallel.ep=-2"])


# ---------------------------------------------------------------------------- ranges (#16)

NAN, INF = float("nan"), float("inf")
# (field, a bad value, what the message says is allowed): every numeric ModelConfig field
BAD_RANGE = [
    ("vocab_size", 0, "an int >= 1"), ("hidden_size", -64, "an int >= 1"),
    ("hidden_size", 64.0, "an int >= 1"), ("hidden_size", True, "an int >= 1"),
    ("num_layers", 0, "an int >= 1"), ("num_attention_heads", 0, "an int >= 1"),
    ("num_query_groups", 0, "None or an int >= 1"), ("head_dim", -16, "None or an int >= 1"),
    ("ffn_hidden_size", 0, "an int >= 1"), ("num_experts", 0, "None or an int >= 1"),
    ("moe_ffn_hidden_size", 0, "None or an int >= 1"), ("moe_router_topk", 0, "an int >= 1"),
    ("shared_expert_size", -1, "None or an int >= 1"),
    ("router_n_groups", 0, "None or an int >= 1"), ("router_topk_groups", 0, "None or an int >= 1"),
    ("router_group_score_topk", 0, "None or an int >= 1"),
    ("router_bias_update_rate", -1e-3, "a finite number >= 0"),
    ("router_bias_update_rate", NAN, "a finite number >= 0"),
    ("router_scaling_factor", NAN, "a finite number > 0"),
    ("router_scaling_factor", 0.0, "a finite number > 0"),
    ("router_scaling_factor", -2.5, "a finite number > 0"),
    ("aux_loss_coef", -1.0, "a finite number >= 0"), ("aux_loss_coef", NAN, "a finite number >= 0"),
    ("z_loss_coef", INF, "a finite number >= 0"),
    ("rope_theta", 0.0, "a finite number > 0"), ("rope_theta", -1e4, "a finite number > 0"),
    ("rope_theta", INF, "a finite number > 0"),
    ("q_lora_rank", 0, "None or an int >= 1"), ("kv_lora_rank", -8, "None or an int >= 1"),
    ("qk_nope_head_dim", 0, "None or an int >= 1"), ("qk_rope_head_dim", 0, "None or an int >= 1"),
    ("v_head_dim", 0, "None or an int >= 1"),
    ("rope_factor", 0.5, "a finite number >= 1"), ("rope_factor", NAN, "a finite number >= 1"),
    ("rope_original_max_position", 0, "None or an int >= 1"),
    ("rope_beta_fast", 0.0, "a finite number > 0"), ("rope_beta_slow", -1.0, "a finite number > 0"),
    ("rope_mscale", -1.0, "a finite number >= 0"), ("rope_mscale_all_dim", NAN, "a finite number >= 0"),
    ("mtp_layers", -1, "an int >= 0"),
    ("rms_norm_eps", NAN, r"a finite number in \(0, 1\)"),
    ("rms_norm_eps", 0.0, r"a finite number in \(0, 1\)"),
    ("rms_norm_eps", -1e-6, r"a finite number in \(0, 1\)"),
    ("rms_norm_eps", 1.0, r"a finite number in \(0, 1\)"),
    ("max_position_embeddings", 0, "an int >= 1"),
    ("init_std", 0.0, "a finite number > 0"), ("init_std", "0.02", "a finite number > 0"),
]


@pytest.mark.parametrize("field,value,allowed", BAD_RANGE,
                         ids=[f"{f}={v!r}" for f, v, _ in BAD_RANGE])
def test_every_number_is_checked_finite_and_in_range(field, value, allowed):
    base = ModelConfig.preset("tiny-dsv3-mla")  # MoE, groups, MLA: every field is in use
    with pytest.raises(ValueError) as err:
        base.replace(**{field: value})
    msg = str(err.value)
    assert "\n" not in msg
    assert re.fullmatch(rf"ModelConfig: {field} must be {allowed}, got {re.escape(repr(value))}",
                        msg), msg


def test_the_range_table_covers_every_numeric_field():
    numeric = {f.name for f in dataclasses.fields(ModelConfig)
               if f.type in ("int", "float", "Optional[int]", "Optional[float]")}
    assert numeric == {field for field, _, _ in BAD_RANGE}


@pytest.mark.parametrize("override,match", [
    ("--model.rms_norm_eps=0.0", r"rms_norm_eps must be a finite number in \(0, 1\), got 0.0"),
    ("--model.router_scaling_factor=-1.0", r"router_scaling_factor must be a finite number > 0"),
    ("--model.rope_theta=0.0", r"rope_theta must be a finite number > 0, got 0.0"),
    ("--model.num_layers=0", r"num_layers must be an int >= 1, got 0"),
])
def test_ranges_are_checked_when_a_recipe_loads(override, match):
    from r1fast.train.config import load_train_config

    with pytest.raises(ValueError, match=match):
        load_train_config(None, ["--model.preset=tiny-dsv3", override])


def test_ranges_are_checked_on_hf_import():
    with pytest.raises(ValueError, match=r"ModelConfig: rms_norm_eps must be a finite number in "
                                         r"\(0, 1\), got nan$"):
        ModelConfig.from_hf_config(dict(QWEN3_MOE, rms_norm_eps=float("nan")))
    with pytest.raises(ValueError, match=r"moe_router_topk must be in \[1, num_experts=8\], got "
                                         r"9 \(from_hf_config: moe_router_topk is qwen3_moe "
                                         r"num_experts_per_tok"):
        ModelConfig.from_hf_config(dict(QWEN3_MOE, num_experts_per_tok=9))
