"""DeepSeek config fields read as transformers reads them (review of the HF mapping, session 17).

Each config below used to load without a word and compute other log-probs than transformers
(max |d log p| 0.24 to 1.2 on these tiny models): latent RMSNorms built with rms_norm_eps
(DeepSeek and transformers keep 1e-6), YaRN's cos/sin factor when only one mscale is set or
``attention_factor`` is given, a top-level ``original_max_position_embeddings``, routing keys
left out of config.json (transformers' class defaults apply), ``norm_topk_prob: null``. What
megatron cannot compute (``truncate: false``) or transformers refuses (no ``factor``) is an
error. Export writes ``norm_topk_prob`` as r1fast resolves it and keeps the router weight and
bias in fp32, as transformers saves them."""
from __future__ import annotations

import json
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

from r1fast.policy.config import ModelConfig, ParallelConfig  # noqa: E402
from r1fast.policy.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint  # noqa: E402
from r1fast.policy.model import build_policy  # noqa: E402
from r1fast.policy.parallel import destroy_parallel  # noqa: E402
from tests.helpers.hf_parity import hf_logprobs, load, next_token_batch  # noqa: E402
from tests.policy.test_deepseek_v3 import HF_CONFIG, V, make_hf  # noqa: E402

YARN = HF_CONFIG["rope_parameters"]


@pytest.fixture(scope="module", autouse=True)
def _single_rank():
    yield
    destroy_parallel()


def _shrink_latents(model):
    """Small latents, so the eps of their norms matters (as for a small-norm latent)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_a_proj.weight.mul_(0.3)
            layer.self_attn.kv_a_proj_with_mqa.weight.mul_(0.3)


VARIANTS = {  # name: (make_hf overrides, edit of the saved config.json, in-memory edit)
    "rms_norm_eps": ({"rms_norm_eps": 1e-2}, None, _shrink_latents),
    "mscale_alone": ({"rope_parameters": {**{k: v for k, v in YARN.items()
                                            if k != "mscale_all_dim"}, "mscale": 0.5}},
                     None, None),
    "mscale_zero": ({"rope_parameters": {**YARN, "mscale": 0.0}}, None, None),
    "attention_factor": ({"rope_parameters": {**YARN, "attention_factor": 1.5}}, None, None),
    # wide rope dims: the correction range moves with the pre-training length
    "top_level_original_max": ({"qk_rope_head_dim": 16},
                               lambda c: (c.update(original_max_position_embeddings=16),
                                          c["rope_parameters"].pop(
                                              "original_max_position_embeddings")), None),
    "routing_keys_absent": ({"n_routed_experts": 16, "n_group": 8, "topk_group": 4},
                            lambda c: [c.pop(k) for k in ("n_group", "topk_group",
                                                          "routed_scaling_factor")], None),
    "norm_topk_prob_null": ({}, lambda c: c.update(norm_topk_prob=None), None),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fields_read_as_transformers_reads_them(variant, tmp_path):
    over, edit_config, edit_model = VARIANTS[variant]
    model = make_hf(seed=11, **over)
    if edit_model is not None:
        edit_model(model)
    path = tmp_path / variant
    model.save_pretrained(str(path), safe_serialization=True)
    if edit_config is not None:
        cfg = json.loads((path / "config.json").read_text())
        edit_config(cfg)
        (path / "config.json").write_text(json.dumps(cfg))
    ref_model = transformers.DeepseekV3ForCausalLM.from_pretrained(str(path)).float().eval()
    tokens, targets = next_token_batch(V, 12, 2, 40)  # past original_max_position 16 / 64
    with torch.no_grad():
        ref = hf_logprobs(ref_model, tokens, targets)
        got = load(str(path)).logprobs(tokens, targets).double()
    assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("rope, match", [
    ({**YARN, "truncate": False}, "yarn truncate=False is not supported"),
    ({k: v for k, v in YARN.items() if k != "factor"}, "rope_type 'yarn' need 'factor'"),
    ({**YARN, "factor": 1.0, "attention_factor": 1.5}, "factor=1.0 <= 1 is not supported"),
])
def test_yarn_that_cannot_be_matched_is_an_error(rope, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_config({**HF_CONFIG, "model_type": "deepseek_v3",
                                    "rope_parameters": rope})


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2"])
def test_biases_are_refused_by_name(family):
    v2 = {"norm_topk_prob": False} if family == "deepseek_v2" else {}  # V2's only routing
    for key in ("attention_bias", "mlp_bias"):
        with pytest.raises(ValueError, match=f"{key}=True is not supported for {family}"):
            ModelConfig.from_hf_config({**HF_CONFIG, **v2, "model_type": family, key: True})


@pytest.mark.parametrize("value", [False, None])
def test_rope_not_interleaved_is_an_error(value):
    """transformers' DeepSeek-V3 interleaves the rope dims only when rope_interleave is
    truthy: a null there is the other layout (|d log p| 1.1 on a tiny model), not a default."""
    with pytest.raises(ValueError, match=f"rope_interleave={value} is not supported"):
        ModelConfig.from_hf_config({**HF_CONFIG, "model_type": "deepseek_v3",
                                    "rope_interleave": value})


def test_qwen3_moe_without_expert_count_names_the_key():
    cfg = {"model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 64, "moe_intermediate_size": 16, "num_experts_per_tok": 2}
    with pytest.raises(ValueError, match="qwen3_moe num_experts must be an int >= 1, got None"):
        ModelConfig.from_hf_config(cfg)


def test_export_top1_sigmoid_and_bf16_router(tmp_path):
    """Top-1 sigmoid routing with router_normalize=None does not renormalise in r1fast; export
    wrote norm_topk_prob=True, so transformers renormalised the one weight to 1."""
    from safetensors import safe_open

    cfg = ModelConfig.preset("tiny-dsv3-mla").replace(moe_router_topk=1, router_normalize=None,
                                                      router_n_groups=None,
                                                      router_topk_groups=None)
    policy = build_policy(cfg, ParallelConfig(), seed=3)
    with torch.no_grad():  # a non-zero bias and router, so routing and weights matter
        for name, t in policy.gpt.named_buffers():
            if name.endswith("expert_bias"):
                t.copy_(torch.rand(t.shape) * 0.2 - 0.1)
    out = tmp_path / "k1"
    save_hf_checkpoint(policy, str(out))
    assert json.loads((out / "config.json").read_text())["norm_topk_prob"] is False
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(out)).float().eval()
    tokens, targets = next_token_batch(cfg.vocab_size, 13, 2, 12)
    with torch.no_grad():
        ref = hf_logprobs(hf, tokens, targets)
        assert (policy.logprobs(tokens, targets).double() - ref).abs().max().item() < 1e-5
    save_hf_checkpoint(policy, str(tmp_path / "bf16"), dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    router = [k for k in dtypes if k.endswith(("mlp.gate.weight", "e_score_correction_bias"))]
    assert router and all(dtypes[k] == "F32" for k in router)
    assert dtypes["model.embed_tokens.weight"] == "BF16"


def test_loading_into_other_math_settings_warns(tmp_path, caplog):
    model = make_hf(seed=12)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    theirs = load(str(tmp_path)).model_cfg
    policy = build_policy(theirs.replace(rope_theta=5e5, router_scaling_factor=1.0),
                          ParallelConfig())
    with caplog.at_level(logging.WARNING, logger="r1fast.policy"):
        load_hf_checkpoint(policy, str(tmp_path))
    assert "rope_theta: policy 500000.0 vs checkpoint 10000.0" in caplog.text
    assert "router_scaling_factor: policy 1.0 vs checkpoint 2.5" in caplog.text


def test_fp8_weights_are_refused_not_cast(tmp_path):
    """FP8 tensors were cast to the policy's dtype without their block scales (wrong weights,
    no error unless a scale tensor happened to be left over). Without its scale an FP8 weight
    is refused; with it, it is dequantized (tests/policy/test_hf_fp8.py)."""
    from safetensors.torch import load_file, save_file

    model = make_hf(seed=13)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    state = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.1.mlp.experts.0.up_proj.weight"
    state[key] = state[key].to(torch.float8_e4m3fn)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{key} is F8_E4M3 without its block scale"):
        load(str(tmp_path))


def test_sequence_wise_balance_loss_is_read_but_not_applied(caplog):
    """DeepSeek-V3's config.json carries its pretraining balance loss (aux_loss_alpha with
    seq_aux, true by default in DeepSeek's code): transformers does not train with it, so the
    coefficient stays 0 and a warning says how to turn it on; the kind is kept. Export writes
    both keys back when the loss is on."""
    with caplog.at_level(logging.WARNING, logger="r1fast.policy"):
        cfg = ModelConfig.from_hf_config({**HF_CONFIG, "model_type": "deepseek_v3",
                                          "aux_loss_alpha": 0.001, "seq_aux": True})
    assert cfg.aux_loss_coef == 0.0 and cfg.aux_loss_type == "seq_aux_loss"
    assert "aux_loss_alpha=0.001 (seq_aux=True) is not applied" in caplog.text
    assert "model.aux_loss_coef = 0.001 turns on that sequence-wise balance loss" in caplog.text
    for seq_aux, kind in ((False, "aux_loss"), (None, "seq_aux_loss")):
        got = ModelConfig.from_hf_config({**HF_CONFIG, "model_type": "deepseek_v3",
                                          "aux_loss_alpha": 0.001, "seq_aux": seq_aux})
        assert got.aux_loss_type == kind
    on = cfg.replace(aux_loss_coef=1e-4).to_hf_config()
    assert on["aux_loss_alpha"] == 1e-4 and on["seq_aux"] is True
    assert "aux_loss_alpha" not in cfg.to_hf_config()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="r1fast.policy"):
        plain = ModelConfig.from_hf_config({**HF_CONFIG, "model_type": "deepseek_v3"})
    assert "aux_loss_alpha" not in caplog.text and plain.aux_loss_type == "aux_loss"
