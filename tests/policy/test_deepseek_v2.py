"""DeepSeek-V2 (``deepseek_v2``) on a tiny model built offline with transformers: MLA without q
LoRA and with YaRN, 3 layers with the first dense, 8 routed experts top-3 by softmax (weights
the full softmax's, not renormalised) times routed_scaling_factor 1.5, two shared experts, no
correction bias; chosen greedily (V2-Lite) or group-limited (V2, V2.5 route so: here 2 groups of
4, the one whose best expert scores highest kept, where Megatron's rule would rank the groups by
the sum of their top 3). r1fast's log-probs and every gradient equal transformers'
(fp32); export -> transformers reload is bit-exact; the config round-trips; norm_topk_prob=true
and unknown topk methods are refused naming the key."""
from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from r1fast.policy.config import ModelConfig, ParallelConfig  # noqa: E402
from r1fast.policy.hf_checkpoint import load_hf_checkpoint, load_model_config  # noqa: E402
from r1fast.policy.model import build_policy  # noqa: E402
from r1fast.policy.parallel import destroy_parallel  # noqa: E402
from tests.helpers.hf_parity import (check_export_reloads_exactly,  # noqa: E402
                                     check_gradients_match_hf, hf_logprobs, load,
                                     next_token_batch)

V = 128
HF_CONFIG = dict(
    vocab_size=V, hidden_size=48, intermediate_size=96, moe_intermediate_size=16,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
    n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1,
    routed_scaling_factor=1.5, topk_method="greedy", norm_topk_prob=False,
    max_position_embeddings=256, tie_word_embeddings=False,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 8, "beta_fast": 32.0,
                     "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})


@pytest.fixture(scope="module", autouse=True)
def _single_rank():
    yield
    destroy_parallel()


# topk_method -> the keys that change; group_limited_greedy as V2 and V2.5 route
METHODS = {"greedy": {},
           "group_limited_greedy": dict(topk_method="group_limited_greedy", n_group=2,
                                        topk_group=1)}


@pytest.fixture(scope="module", params=sorted(METHODS))
def saved(request, tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.DeepseekV2Config(**{**HF_CONFIG, **METHODS[request.param]})
    model = transformers.DeepseekV2ForCausalLM(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if name.endswith("gate.weight") else 0.1)
            if "norm" in name:
                p.add_(1.0)
    path = str(tmp_path_factory.mktemp("dsv2"))
    model.eval().save_pretrained(path, safe_serialization=True)
    return model, path


def batch(seed: int = 1, length: int = 13):
    return next_token_batch(V, seed, length=length)


def test_config_translation(saved):
    cfg = load_model_config(saved[1])
    assert cfg.is_mla and cfg.q_lora_rank is None and cfg.kv_lora_rank == 16
    assert cfg.dense_layers == (0,) and cfg.num_experts == 8 and cfg.shared_expert_size == 32
    assert (cfg.router_score, cfg.router_pre_softmax, cfg.router_normalize) == ("softmax", True,
                                                                                 False)
    assert not cfg.router_expert_bias and cfg.router_scaling_factor == 1.5
    assert cfg.rope_type == "yarn"
    model, _ = saved
    method = model.config.topk_method
    if method == "greedy":
        assert cfg.router_n_groups is None and cfg.router_group_score_topk is None
    else:  # the one of 2 groups whose best expert scores highest
        assert (cfg.router_n_groups, cfg.router_topk_groups, cfg.router_group_score_topk) == \
            (2, 1, 1)
    hf = cfg.to_hf_config()
    assert hf["model_type"] == "deepseek_v2" and hf["topk_method"] == method
    assert hf["scoring_func"] == "softmax"  # vLLM reads it (transformers knows it)
    assert ModelConfig.from_hf_config(hf) == cfg


def test_logprobs_match_hf(saved):
    model, path = saved
    tokens, targets = batch()  # 13 positions > original_max_position_embeddings: YaRN matters
    with torch.no_grad():
        ref = hf_logprobs(model, tokens, targets)
    mine = load(path).logprobs(tokens, targets)
    assert ref.abs().max() > 1.0
    assert (mine.double() - ref).abs().max().item() < 1e-5
    if model.config.topk_method == "group_limited_greedy":
        # the group rule matters on this batch: Megatron's (sum of the top k // topk_group = 3)
        # routes other tokens elsewhere
        cfg = dataclasses.replace(load_model_config(path), router_group_score_topk=None)
        other = build_policy(cfg, ParallelConfig())
        load_hf_checkpoint(other, path)
        assert (other.logprobs(tokens, targets).double() - ref).abs().max().item() > 1e-3


def test_gradients_match_hf(saved):
    model, path = saved
    check_gradients_match_hf(model, path, *batch(seed=2))


def test_export_then_reload_in_transformers_is_exact(saved, tmp_path):
    model, path = saved
    check_export_reloads_exactly(load(path), model, transformers.DeepseekV2ForCausalLM,
                                 str(tmp_path / "export"), "deepseek_v2")


@pytest.mark.parametrize("over, match", [
    (dict(topk_method="noaux_tc"), r"deepseek_v2 topk_method must be one of \('greedy', "
                                   r"'group_limited_greedy'\), got 'noaux_tc'"),
    (dict(topk_method="group_limited_greedy", n_group=3, topk_group=2),
     r"deepseek_v2 n_group must be an int >= 1 that divides n_routed_experts \(8\), got 3"),
    (dict(norm_topk_prob=True), "deepseek_v2 norm_topk_prob must be false"),
    (dict(kv_lora_rank=None), "deepseek_v2 kv_lora_rank must be an int >= 1"),
])
def test_unsupported_v2_configs_name_the_key(over, match):
    hf = {**transformers.DeepseekV2Config(**HF_CONFIG).to_dict(), **over}  # as config.json
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_config(hf)
