"""Hugging Face checkpoints: tiny random Qwen3-MoE / Qwen3 / Qwen2 models built offline with
transformers, saved with save_pretrained(safe_serialization=True), imported into the policy:
log-probs and every gradient match the HF model; export and reload in transformers reproduces
every weight exactly; sharded checkpoints; error messages. (Single process; the multi-rank
sharding on load and gathering on save are covered by test_parallel_equivalence.py.)"""
from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from r1fast.ops.linear_logprob import linear_logprob  # noqa: E402
from r1fast.policy.config import ParallelConfig  # noqa: E402
from r1fast.policy.hf_checkpoint import (  # noqa: E402
    INDEX, gather_hf_state_dict, load_hf_checkpoint, load_model_config, save_hf_checkpoint)
from r1fast.policy.model import build_policy  # noqa: E402
from r1fast.policy.parallel import destroy_parallel  # noqa: E402
from tests.helpers.hf_parity import check_gradients_match_hf, hf_logprobs, load  # noqa: E402

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              tie_word_embeddings=False)
MODELS = {
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, **COMMON)),
    # softmax over all experts without renormalising the top-k, and a dense first layer
    "qwen3_moe-dense0-nonorm": lambda: transformers.Qwen3MoeForCausalLM(
        transformers.Qwen3MoeConfig(head_dim=16, moe_intermediate_size=32, num_experts=8,
                                    num_experts_per_tok=2, norm_topk_prob=False,
                                    mlp_only_layers=[0], **COMMON)),
    # top-1 renormalised: every token's expert output at weight 1
    "qwen3_moe-top1-norm": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=1,
        norm_topk_prob=True, **COMMON)),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16,
                                                                            **COMMON)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON)),
    "qwen3-tied": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        head_dim=16, **dict(COMMON, tie_word_embeddings=True))),
}


@pytest.fixture(scope="module", autouse=True)
def _single_rank():
    yield
    destroy_parallel()


def make_hf(name: str, seed: int = 0):
    """A random HF model with O(1) activations (the 0.02-std init makes every logit ~0)."""
    torch.manual_seed(seed)
    model = MODELS[name]().float()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "gate.weight" in pname else 0.1)
            if "norm" in pname:
                p.add_(1.0)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (hf model, checkpoint dir)."""
    out = {}
    for name in MODELS:
        model = make_hf(name)
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path, safe_serialization=True)
        out[name] = (model, path)
    return out


def batch(seed: int = 1, b: int = 3, length: int = 11):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (b, length), generator=g)
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = -100
    return tokens, targets


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logprobs_match_hf(saved, name):
    model, path = saved[name]
    policy = load(path)
    tokens, targets = batch()
    with torch.no_grad():
        ref = hf_logprobs(model, tokens, targets)
    mine = policy.logprobs(tokens, targets)
    assert mine.dtype == torch.float32
    assert (mine.double() - ref).abs().max().item() < 1e-4
    assert bool((mine[targets == -100] == 0).all())


def test_position_ids_match_hf(saved):
    model, path = saved["qwen3_moe"]
    policy = load(path)
    tokens, targets = batch()
    pos = torch.arange(11).expand(3, 11) + torch.tensor([[0], [3], [17]])  # shifted rows
    with torch.no_grad():
        ref = hf_logprobs(model, tokens, targets, pos)
        hidden = policy.hidden_states(tokens, position_ids=pos)
    b, length, h = hidden.shape
    mine = linear_logprob(hidden.reshape(-1, h), policy.output_weight, targets.reshape(-1))
    assert (mine.view(b, length).double() - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen3_moe-dense0-nonorm", "qwen2", "qwen3-tied"])
def test_gradients_match_hf(saved, name):
    """Every parameter's gradient (|grad| up to ~0.5; measured differences ~3e-7)."""
    model, path = saved[name]
    check_gradients_match_hf(model, path, *batch(seed=2))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_then_reload_in_transformers_is_exact(saved, tmp_path, name):
    model, path = saved[name]
    policy = load(path)
    out = str(tmp_path / "export")
    save_hf_checkpoint(policy, out)
    assert os.path.exists(os.path.join(out, "config.json"))
    reloaded = type(model).from_pretrained(out).float()
    ref = model.state_dict()
    got = reloaded.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert load_model_config(out) == load_model_config(path).replace(
        params_dtype=load_model_config(out).params_dtype)


def test_sharded_save_writes_an_index_and_reloads(saved, tmp_path):
    model, path = saved["qwen3_moe"]
    policy = load(path)
    out = str(tmp_path / "sharded")
    save_hf_checkpoint(policy, out, max_shard_bytes=64 * 1024)
    with open(os.path.join(out, INDEX)) as f:
        index = json.load(f)
    assert len(set(index["weight_map"].values())) > 1
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    again = load(out)
    tokens, targets = batch()
    assert torch.equal(again.logprobs(tokens, targets), policy.logprobs(tokens, targets))
    reloaded = type(model).from_pretrained(out).float()
    for k, v in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k


@pytest.mark.parametrize("first_shard_bytes,second_shard_bytes",
                         [(64 * 1024, 4 << 30), (4 << 30, 64 * 1024)],
                         ids=["sharded-then-one-file", "one-file-then-sharded"])
def test_a_save_over_an_earlier_one_leaves_no_old_weights(saved, tmp_path, caplog,
                                                          first_shard_bytes, second_shard_bytes):
    """A second save into the same folder with another shard layout left the first one's files:
    r1fast and vLLM followed the old index, transformers preferred the old single file, and
    each loaded the old weights. The new save removes them, with a warning."""
    import logging

    model, path = saved["qwen3_moe"]
    policy = load(path)
    out = str(tmp_path / "out")
    save_hf_checkpoint(policy, out, max_shard_bytes=first_shard_bytes)
    (tmp_path / "out" / "notes.txt").write_text("mine")  # not a weight file: kept
    w = policy.gpt.embedding.word_embeddings.weight
    with torch.no_grad():
        w.add_(1.0)
    with caplog.at_level(logging.WARNING, logger="r1fast.policy"):
        save_hf_checkpoint(policy, out, max_shard_bytes=second_shard_bytes)
    assert "removed the weight files of an earlier save" in caplog.text
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert os.path.exists(os.path.join(out, INDEX)) == (second_shard_bytes < 4 << 30)
    assert os.path.exists(os.path.join(out, "model.safetensors")) == (second_shard_bytes >= 4 << 30)
    new = w.detach().clone()
    again = load(out)
    assert torch.equal(again.gpt.embedding.word_embeddings.weight, new)
    reloaded = type(model).from_pretrained(out).float()
    assert torch.equal(reloaded.model.embed_tokens.weight, new)


def test_round_trip_of_a_deepseek_style_policy(tmp_path):
    """No HF family has sigmoid/grouped routing with an expert bias and a shared expert:
    the tensors still use HF-style names and r1fast_config.json restores the model exactly."""
    from r1fast.policy.config import ModelConfig

    cfg = ModelConfig.preset("tiny-dsv3").replace(shared_expert_gate=True, dense_layers=(0,))
    policy = build_policy(cfg, ParallelConfig(), trainable=False, seed=3)
    with torch.no_grad():
        for r in policy._routers():
            r.expert_bias.copy_(torch.linspace(-0.1, 0.1, 8))
    out = str(tmp_path / "dsv3")
    save_hf_checkpoint(policy, out)
    assert not os.path.exists(os.path.join(out, "config.json"))
    state = gather_hf_state_dict(policy)
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in state
    assert "model.layers.1.mlp.shared_expert_gate.weight" in state
    again = build_policy(load_model_config(out), ParallelConfig(), trainable=False, seed=4)
    load_hf_checkpoint(again, out)
    for k, v in gather_hf_state_dict(again).items():
        assert torch.equal(v, state[k]), k


def test_missing_tensor_is_named(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = saved["qwen3"]
    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = load_file(os.path.join(path, "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    (broken / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    policy = build_policy(load_model_config(str(broken)), ParallelConfig(), trainable=False)
    with pytest.raises(ValueError, match=r"lacks 1 tensors, e.g. \['model.layers.1.mlp.up_proj"):
        load_hf_checkpoint(policy, str(broken))


def test_architecture_mismatch_is_named(saved):
    _, path = saved["qwen3"]
    policy = build_policy(load_model_config(saved["qwen2"][1]), ParallelConfig(),
                          trainable=False)
    with pytest.raises(ValueError, match="architecture differs: qk_layernorm: policy False vs "
                                         "checkpoint True"):
        load_hf_checkpoint(policy, path)


def test_directory_without_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no r1fast_config.json or config.json"):
        load_model_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", **COMMON,
                                                      "head_dim": 16}))
    policy = build_policy(load_model_config(str(tmp_path)), ParallelConfig(), trainable=False)
    with pytest.raises(ValueError, match="no model.safetensors or model.safetensors.index.json"):
        load_hf_checkpoint(policy, str(tmp_path))


def test_bad_shard_size(saved, tmp_path):
    policy = load(saved["qwen3"][1])
    with pytest.raises(ValueError, match="max_shard_bytes must be >= 1, got 0"):
        save_hf_checkpoint(policy, str(tmp_path / "x"), max_shard_bytes=0)


# ------------------------------------------------------------------------ layout properties

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class _DictReader:
    """The _Reader interface over an in-memory dict."""

    def __init__(self, tensors):
        self.tensors = tensors

    def __contains__(self, key):
        return key in self.tensors

    def slice(self, key):
        return self.tensors[key]

    def rows(self, key, start, stop):
        return self.tensors[key][start:stop]

    def full(self, key):
        return self.tensors[key]


@settings(max_examples=30, deadline=None)
@given(groups=st.sampled_from([1, 2, 4]), q_per_group=st.integers(1, 3),
       d=st.sampled_from([2, 4]), tp=st.sampled_from([1, 2, 4]), bias=st.booleans())
def test_qkv_and_glu_sharding_round_trip(groups, q_per_group, d, tp, bias):
    """Per TP rank, linear_qkv holds its KV groups as [q heads, k, v] each; the shards of all
    ranks concatenate to the one-rank tensor, whose export gives back HF's q/k/v. Likewise
    linear_fc1 = [gate shard; up shard] per rank."""
    from r1fast.policy.config import ModelConfig
    from r1fast.policy.hf_checkpoint import _full_hf, _Map, _shard_value

    if groups % tp:
        return
    h = 6
    cfg = ModelConfig(hidden_size=8, num_attention_heads=groups * q_per_group,
                      num_query_groups=groups, head_dim=d)
    tail = () if bias else (h,)
    hf = {"q": torch.randn(groups * q_per_group * d, *tail), "k": torch.randn(groups * d, *tail),
          "v": torch.randn(groups * d, *tail)}
    mp = _Map("qkv", ("q", "k", "v"))
    shape = (groups * (q_per_group + 2) * d // tp, *tail)
    shards = [_shard_value(_DictReader(hf), mp, cfg, tp, r, torch.Size(shape)) for r in range(tp)]
    whole = _shard_value(_DictReader(hf), mp, cfg, 1, 0, torch.Size((shape[0] * tp, *tail)))
    assert torch.equal(torch.cat(shards), whole)
    per_group = whole.view(groups, (q_per_group + 2) * d, *tail)
    assert torch.equal(per_group[0, :q_per_group * d], hf["q"][:q_per_group * d])
    back = _full_hf(whole, mp, cfg, group=None)
    assert all(torch.equal(back[x], hf[x]) for x in "qkv")

    ffn = 4 * tp
    glu = {"g": torch.randn(ffn, h), "u": torch.randn(ffn, h)}
    gm = _Map("glu", ("g", "u"))
    parts = [_shard_value(_DictReader(glu), gm, cfg, tp, r, torch.Size((2 * ffn // tp, h)))
             for r in range(tp)]
    for r, part in enumerate(parts):
        n = ffn // tp
        assert torch.equal(part, torch.cat([glu["g"][r * n:(r + 1) * n], glu["u"][r * n:(r + 1) * n]]))
