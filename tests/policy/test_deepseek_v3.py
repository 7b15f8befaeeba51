"""DeepSeek-V3 end to end on a tiny ``deepseek_v3`` model built offline with transformers: MLA
with q LoRA and YaRN, 3 layers with the first dense, 8 routed experts in 4 groups (top-2
groups, top-4 experts), one shared expert, a random correction bias, routed_scaling_factor 2.5.
r1fast's log-probs and every gradient equal transformers' (fp32); export -> transformers reload
is bit-exact; multi-token-prediction tensors are kept and written back unchanged; our MLA core
attention equals an fp64 formula; packed rows equal each sequence alone; bad configs (HF
config.json, recipe [model] / [parallel]) name the field."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from r1fast.ops.linear_logprob import linear_logprob  # noqa: E402
from r1fast.policy.config import ModelConfig, ParallelConfig  # noqa: E402
from r1fast.policy.hf_checkpoint import (load_hf_checkpoint, load_model_config,  # noqa: E402
                                         save_hf_checkpoint)
from r1fast.policy.mla import MLACoreAttention, softmax_scale  # noqa: E402
from r1fast.policy.model import build_policy  # noqa: E402
from r1fast.policy.parallel import destroy_parallel  # noqa: E402
from tests.helpers.hf_parity import (check_export_reloads_exactly,  # noqa: E402
                                     check_gradients_match_hf, hf_logprobs, load,
                                     next_token_batch)

V = 128
HF_CONFIG = dict(
    vocab_size=V, hidden_size=48, intermediate_size=96, moe_intermediate_size=16,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
    first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    max_position_embeddings=256, tie_word_embeddings=False, rope_interleave=True,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 64, "beta_fast": 32.0,
                     "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})


@pytest.fixture(scope="module", autouse=True)
def _single_rank():
    yield
    destroy_parallel()


def make_hf(seed: int = 0, **over):
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV3Config(**{**HF_CONFIG, **over})
    model = transformers.DeepseekV3ForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if name.endswith("gate.weight") else 0.1)
            if "norm" in name:
                p.add_(1.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape) * 0.2 - 0.1)  # random, keys stay positive
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = make_hf()
    path = str(tmp_path_factory.mktemp("dsv3"))
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def batch(seed: int = 1, b: int = 3, length: int = 13):
    return next_token_batch(V, seed, b, length)


def test_config_translation(saved):
    cfg = load_model_config(saved[1])
    assert cfg.is_mla and cfg.q_lora_rank == 24 and cfg.kv_lora_rank == 16
    assert (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (8, 4, 12)
    assert cfg.dense_layers == (0,) and cfg.num_experts == 8 and cfg.shared_expert_size == 16
    assert (cfg.router_score, cfg.router_n_groups, cfg.router_topk_groups) == ("sigmoid", 4, 2)
    assert cfg.router_expert_bias and cfg.router_scaling_factor == 2.5
    assert cfg.rope_type == "yarn" and cfg.rope_factor == 4.0 and cfg.rope_mscale_all_dim == 1.0
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


def test_logprobs_match_hf(saved):
    model, path = saved
    policy = load(path)
    tokens, targets = batch()
    with torch.no_grad():
        ref = hf_logprobs(model, tokens, targets)
    mine = policy.logprobs(tokens, targets)
    assert (mine.double() - ref).abs().max().item() < 1e-5


def test_gradients_match_hf(saved):
    model, path = saved
    check_gradients_match_hf(model, path, *batch(seed=2))


def test_export_then_reload_in_transformers_is_exact(saved, tmp_path):
    model, path = saved
    check_export_reloads_exactly(load(path), model, transformers.DeepseekV3ForCausalLM,
                                 str(tmp_path / "export"), "deepseek_v3")


def test_export_config_has_what_serving_engines_read(saved, tmp_path):
    """vLLM and SGLang read topk_method (the expert bias exists only under noaux_tc) and
    scoring_func, which transformers infers from the family; engines on transformers < 5 read
    YaRN from rope_scaling and the dtype from torch_dtype. The legacy keys alone must describe
    the same model as the new ones."""
    out = tmp_path / "export"
    save_hf_checkpoint(load(saved[1]), str(out))
    hf = json.loads((out / "config.json").read_text())
    assert (hf["topk_method"], hf["scoring_func"]) == ("noaux_tc", "sigmoid")
    assert hf["torch_dtype"] == hf["dtype"] == "float32"
    legacy = {k: v for k, v in hf.items() if k not in ("rope_parameters", "dtype")}
    assert legacy["rope_scaling"]["type"] == "yarn"
    (out / "config.json").write_text(json.dumps(legacy))
    old_style = transformers.AutoConfig.from_pretrained(str(out))
    read = {k: v for k, v in old_style.rope_parameters.items() if k != "type"}
    assert read == hf["rope_parameters"]
    assert ModelConfig.from_hf_config(legacy) == ModelConfig.from_hf_config(hf)


def test_a_wider_gate_rounded_to_the_params_dtype_is_a_warning(saved, tmp_path, caplog):
    """transformers keeps DeepSeek's gate.weight in fp32, so a fine-tune it saved in bf16 stores
    the gate as F32: loading rounded it to bf16 without a word."""
    import logging

    bf16 = tmp_path / "bf16"
    transformers.DeepseekV3ForCausalLM.from_pretrained(
        saved[1], dtype=torch.bfloat16).save_pretrained(str(bf16))
    policy = build_policy(load_model_config(str(bf16)), ParallelConfig(), trainable=False)
    assert policy.model_cfg.params_dtype == "bfloat16"
    with caplog.at_level(logging.WARNING, logger="r1fast.policy"):
        load_hf_checkpoint(policy, str(bf16))
    assert "stored wider than the policy's params_dtype=bfloat16" in caplog.text
    assert "model.layers.1.mlp.gate.weight" in caplog.text and "gate.weight is among" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="r1fast.policy"):  # fp32 into fp32: nothing
        load_hf_checkpoint(build_policy(load_model_config(saved[1]), ParallelConfig(),
                                        trainable=False), saved[1])
    assert "stored wider" not in caplog.text


def _with_mtp(path, tmp_path):
    """A copy of the checkpoint ``path`` with num_nextn_predict_layers=1 and MTP tensors."""
    from safetensors.torch import load_file, save_file

    src = str(tmp_path / "mtp")
    os.makedirs(src)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    mtp = {"model.layers.3.eh_proj.weight": torch.randn(48, 96, generator=g),
           "model.layers.3.enorm.weight": torch.randn(48, generator=g).bfloat16(),
           "model.layers.3.self_attn.kv_b_proj.weight": torch.randn(80, 16, generator=g)}
    save_file({**tensors, **mtp}, os.path.join(src, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump({**hf, "num_nextn_predict_layers": 1}, f)
    return src, mtp


def _check_mtp_written_back(out, mtp):
    from safetensors.torch import load_file

    back = load_file(os.path.join(out, "model.safetensors"))
    for k, v in mtp.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["num_nextn_predict_layers"] == 1


def test_mtp_layers_are_kept_and_written_back(saved, tmp_path):
    """A checkpoint with num_nextn_predict_layers=1: the MTP layer (model.layers.3.*) is not
    built, but export writes its tensors back bit for bit."""
    src, mtp = _with_mtp(saved[1], tmp_path)
    policy = load(src)
    assert policy.model_cfg.mtp_layers == 1
    out = str(tmp_path / "out")
    save_hf_checkpoint(policy, out)
    _check_mtp_written_back(out, mtp)


def test_export_of_a_run_takes_the_mtp_layers_from_its_init_from(saved, tmp_path):
    """`r1fast export` builds the model from the run's config, so the MTP tensors (never
    trained) were silently missing from its HF folder; it now copies them from init_from."""
    from r1fast.data import CharTokenizer
    from r1fast.train.export import export_checkpoint
    from r1fast.train.sft import SFTConfig, SFTTrainer

    src, mtp = _with_mtp(saved[1], tmp_path)
    rows = [{"prompt": "1+1=", "completion": "2"}] * 4
    SFTTrainer(SFTConfig(model=load_model_config(src), steps=1, batch_size=2, init_from=src,
                         out_dir=str(tmp_path / "run")), rows, CharTokenizer()).fit()
    out = export_checkpoint(tmp_path / "run", tmp_path / "hf")
    _check_mtp_written_back(out, mtp)


def test_plain_q_projection_without_yarn(tmp_path):
    """q_lora_rank None (one q projection, DeepSeek-V2-Lite style) and default RoPE."""
    model = make_hf(seed=3, q_lora_rank=None,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    path = str(tmp_path / "plain")
    model.save_pretrained(path, safe_serialization=True)
    policy = load(path)
    tokens, targets = batch(seed=4)
    with torch.no_grad():
        ref = hf_logprobs(model, tokens, targets)
    assert (policy.logprobs(tokens, targets).double() - ref).abs().max().item() < 1e-5


def test_groups_rank_by_their_top_two_whatever_the_top_k(tmp_path):
    """transformers' DeepSeek-V3 scores a group by the sum of its best 2 whatever k; Megatron's
    rule (r1fast's default) sums the best k // topk_group. With 2 groups of 4, keep 1, top-4
    those differ (2 vs 4): the loader keeps transformers' rule, and exports it back."""
    model = make_hf(seed=5, n_group=2, topk_group=1)
    path = str(tmp_path / "top2")
    model.save_pretrained(path, safe_serialization=True)
    cfg = load_model_config(path)
    assert (cfg.router_n_groups, cfg.router_topk_groups, cfg.router_group_score_topk) == (2, 1, 2)
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg
    tokens, targets = batch(seed=6)
    with torch.no_grad():
        ref = hf_logprobs(model, tokens, targets)
    assert (load(path).logprobs(tokens, targets).double() - ref).abs().max().item() < 1e-5
    # the rule matters on this batch: summing the top 4 routes other tokens elsewhere
    megatron_rule = build_policy(cfg.replace(router_group_score_topk=None), ParallelConfig())
    load_hf_checkpoint(megatron_rule, path)
    assert (megatron_rule.logprobs(tokens, targets).double() - ref).abs().max().item() > 1e-3
    # and a config that ranks groups another way has no deepseek_v3 layout
    with pytest.raises(ValueError, match="this one ranks groups by their top 3"):
        cfg.replace(router_group_score_topk=3).to_hf_config()


def _fp64_attention(q, k, v, scale, mask=None):
    s = torch.einsum("qbnd,kbnd->bnqk", q.double(), k.double()) * scale
    sq, sk = q.shape[0], k.shape[0]
    hidden = mask if mask is not None else \
        torch.arange(sk)[None, :] > torch.arange(sq)[:, None] + (sk - sq)
    p = torch.softmax(s.masked_fill(hidden, float("-inf")), -1)
    return torch.einsum("bnqk,kbnd->qbnd", p, v.double()).reshape(sq, q.shape[1], -1)


@pytest.mark.parametrize("sq,sk", [(7, 7), (1, 9), (3, 9)])
def test_core_attention_matches_fp64(sq, sk):
    cfg = ModelConfig(vocab_size=V, hidden_size=48, num_attention_heads=4, attention="mla",
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
                      rope_type="yarn", rope_factor=40.0, rope_mscale_all_dim=1.0).validate()
    scale = softmax_scale(cfg)
    m = 0.1 * math.log(40.0) + 1.0
    assert scale == pytest.approx(m * m / math.sqrt(12))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(sq, 2, 4, 12, generator=g), torch.randn(sk, 2, 4, 12, generator=g)
    v = torch.randn(sk, 2, 4, 5, generator=g)

    class C:
        attention_dropout = 0.0
        context_parallel_size = 1

    att = MLACoreAttention(C(), 1, None, "self", softmax_scale=scale, k_channels=12,
                           v_channels=5)
    out = att(q, k, v, None)
    assert out.shape == (sq, 2, 20)
    assert (out.double() - _fp64_attention(q, k, v, scale)).abs().max().item() < 1e-5
    mask = torch.rand(sq, sk, generator=g) > 0.5
    mask[:, 0] = False
    got = att(q, k, v, mask[None, None])
    assert (got.double() - _fp64_attention(q, k, v, scale, mask)).abs().max().item() < 1e-5


@pytest.mark.parametrize("change,match", [
    (dict(kv_lora_rank=None), "kv_lora_rank must be set"),
    (dict(attention="gqa"), "q_lora_rank is an MLA field"),
    (dict(num_experts=6, router_n_groups=4), r"num_experts \(6\) must be divisible by "
                                             r"router_n_groups"),
    (dict(router_topk_groups=5), "router_topk_groups must be in"),
    (dict(router_group_score_topk=3), r"router_group_score_topk must be None or an int in "
                                      r"\[1, experts per group=2\], got 3"),
    (dict(router_n_groups=None, router_topk_groups=None, router_group_score_topk=1),
     "router_group_score_topk needs group-limited routing"),
    (dict(qk_rope_head_dim=3), "qk_rope_head_dim must be even"),
])
def test_bad_configs_name_the_field(saved, change, match):
    cfg = load_model_config(saved[1])
    with pytest.raises(ValueError, match=match):
        cfg.replace(**change)


@pytest.mark.parametrize("change,match", [
    (dict(kv_lora_rank=None), r"deepseek_v3 kv_lora_rank must be an int >= 1 \(multi-head latent "
                              r"attention needs it\), got None"),
    (dict(n_group=3), r"deepseek_v3 n_group must be an int >= 1 that divides n_routed_experts "
                      r"\(8\), got 3"),
    (dict(topk_group=5), r"deepseek_v3 topk_group must be an int in \[1, n_group=4\], got 5"),
    (dict(topk_group=0), r"deepseek_v3 topk_group must be an int in \[1, n_group=4\], got 0"),
    (dict(n_group=8, topk_group=4), r"deepseek_v3 n_group=8 leaves 1 expert per group; a "
                                    r"group's score is the sum of its top 2"),
    (dict(num_experts_per_tok=9), r"moe_router_topk must be in \[1, num_experts=8\], got 9 "
                                  r"\(from_hf_config: moe_router_topk is deepseek_v3 "
                                  r"num_experts_per_tok"),
    (dict(routed_scaling_factor=0.0), r"router_scaling_factor must be a finite number > 0, got "
                                      r"0.0 \(from_hf_config: router_scaling_factor is "
                                      r"deepseek_v3 routed_scaling_factor\)"),
])
def test_bad_hf_configs_name_the_key(saved, tmp_path, change, match):
    """A bad deepseek_v3 config.json fails on load, naming its own key (no silent default:
    topk_group = 0 or routed_scaling_factor = 0 is an error, not 1)."""
    with open(os.path.join(saved[1], "config.json")) as f:
        hf = {**json.load(f), **change}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hf, f)
    with pytest.raises(ValueError, match=match):
        load_model_config(str(tmp_path))


@pytest.mark.parametrize("overrides,match", [
    (["--model.attention=mla", "--model.qk_nope_head_dim=8", "--model.qk_rope_head_dim=4",
      "--model.v_head_dim=8"], r"kv_lora_rank must be set \(>= 1\) for attention='mla', got None"),
    (["--model.preset=tiny-dsv3-mla", "--model.router_n_groups=3"],
     r"num_experts \(8\) must be divisible by router_n_groups \(3\)"),
    (["--model.preset=tiny-dsv3-mla", "--model.router_topk_groups=5"],
     r"router_topk_groups must be in \[1, router_n_groups=4\], got 5"),
    (["--model.preset=tiny-dsv3-mla", "--parallel.pp_first_stage_layers=0"],
     r"pp_first_stage_layers must be None or an int >= 1, got 0"),
])
def test_bad_recipes_name_the_field(overrides, match):
    from r1fast.train.config import load_train_config

    with pytest.raises(ValueError, match=match):
        load_train_config(None, overrides)


def test_a_recipe_pp_split_that_does_not_add_up_names_the_fields(capsys):
    """The split is checked against the model where the layout is built (the trainer's
    init_parallel, ``r1fast plan``): here through the planner, at the world it needs."""
    from r1fast.plan import plan_main, plan_memory
    from r1fast.train.config import load_train_config

    recipe = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "tiny_dsv3_mla.toml")
    split = ["--parallel.pp=2", "--parallel.pp_first_stage_layers=1",
             "--parallel.pp_last_stage_layers=1"]
    msg = (r"pp_first_stage_layers \+ pp_last_stage_layers \(1 \+ 1\) must equal num_layers "
           r"\(3\) at pp=2")
    with pytest.raises(ValueError, match=msg):
        plan_memory(load_train_config(recipe, split), world_size=2)
    assert plan_main([recipe, *split, "--gpus", "2"]) == 2
    assert "pp_first_stage_layers + pp_last_stage_layers (1 + 1)" in capsys.readouterr().err


@pytest.mark.parametrize("layout,match", [
    (dict(pp=2, pp_first_stage_layers=1, pp_last_stage_layers=1),
     r"pp_first_stage_layers \+ pp_last_stage_layers \(1 \+ 1\) must equal num_layers \(3\)"),
    (dict(pp=2), r"num_layers \(3\) must be divisible by pp \(2\), or set pp_first_stage"),
    (dict(pp=1, pp_first_stage_layers=1), "pp_first_stage_layers must be None at pp=1"),
    (dict(tp=2, sequence_parallel=False), "attention='mla' at tp > 1 needs sequence_parallel"),
])
def test_bad_layouts_name_the_field(saved, layout, match):
    cfg = load_model_config(saved[1])
    with pytest.raises(ValueError, match=match):
        ParallelConfig(world_size=2, **layout).validate(cfg)


def test_uneven_pipeline_split():
    assert ParallelConfig(pp=2, pp_first_stage_layers=1).stage_layers(3) == [1, 2]
    assert ParallelConfig(pp=4, pp_first_stage_layers=13,
                          pp_last_stage_layers=12).stage_layers(61) == [13, 18, 18, 12]
    assert sum(ParallelConfig(pp=16, pp_first_stage_layers=1).stage_layers(61)) == 61


def test_tiny_mla_preset_builds_and_takes_packed_rows():
    cfg = ModelConfig.preset("tiny-dsv3-mla")
    assert cfg.is_mla and cfg.dense_layers == (0,) and cfg.router_n_groups == 4
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg
    ParallelConfig(max_tokens_per_microbatch=64, world_size=1).validate(cfg)
    policy = build_policy(cfg, ParallelConfig(), trainable=False)
    tokens, targets = batch(length=9)
    lp = policy.logprobs(tokens, targets)
    assert lp.shape == (3, 9) and bool(torch.isfinite(lp).all())
    with pytest.raises(ValueError, match="attention='mla' takes positions 0..L-1 per row, or "
                                         "one row of packed sequences"):
        policy.hidden_states(tokens, position_ids=torch.arange(9).expand(3, 9) + 2)


def test_packed_positions_become_megatron_packed_params():
    from r1fast.policy.mla import mla_packed_params
    from r1fast.policy.packed import packed_layout

    assert mla_packed_params(None, 6) is None
    assert mla_packed_params(torch.arange(6).expand(2, 6), 6) is None
    pos, _ = packed_layout(torch.tensor([0, 2, 2, 7, 10]), 10)  # an empty sequence in between
    params = mla_packed_params(pos, 10)
    assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == [0, 2, 7, 10]
    assert params.cu_seqlens_kv.tolist() == [0, 2, 7, 10] and params.max_seqlen_q == 5
    with pytest.raises(ValueError, match="one row of packed sequences"):
        mla_packed_params(pos.expand(2, 10), 10)  # two packed rows in one micro-batch
    with pytest.raises(ValueError, match="right-pad rows instead of left-padding"):
        mla_packed_params(torch.tensor([[0, 1, 3, 4]]), 4)


def _packed(lengths=(5, 9, 4), seed=6):
    """Sequences of ``lengths`` alone (tokens, targets) and packed end to end in one row."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        t = torch.randint(0, V, (1, n), generator=g)
        y = torch.roll(t, -1, dims=1)
        y[:, -1] = -100
        rows.append((t, y))
    cu = torch.tensor([[0, *torch.tensor(lengths).cumsum(0).tolist()]])
    return rows, torch.cat([t for t, _ in rows], 1), torch.cat([y for _, y in rows], 1), cu


def test_packed_mla_row_of_one_sequence_takes_the_default_positions(saved, monkeypatch):
    """A packed row holding one sequence hands MLA no positions and no boundaries (its
    positions are the default 0..T-1), so the forward reads nothing off them; its log-probs
    are those of the unpacked row."""
    from r1fast.policy import model
    from r1fast.policy.hf_checkpoint import load_hf_checkpoint
    from r1fast.policy.packed_attention import packed_inputs

    _, path = saved
    rows, _, _, _ = _packed(lengths=(11,))
    tokens, targets = rows[0]
    cu = torch.tensor([[0, 11]])
    policy = build_policy(load_model_config(path), ParallelConfig(), trainable=False)
    load_hf_checkpoint(policy, path)
    assert packed_inputs(policy, cu, 11) == (None, None, None)
    plain = policy.logprobs(tokens, targets)
    real, given = model.mla_packed_params, []  # the positions the forward hands MLA
    monkeypatch.setattr(model, "mla_packed_params",
                        lambda pos, *a: given.append(pos) or real(pos, *a))
    packed = policy.logprobs(tokens, targets, cu_seqlens=cu)
    assert given and all(pos is None for pos in given)
    assert torch.equal(packed, plain)
    destroy_parallel()


@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_packed_mla_equals_each_sequence_alone(saved, recompute):
    """One row of packed sequences (YaRN, q LoRA): log-probs equal transformers' on each
    sequence alone (fp64 reference, 1e-5), and every gradient equals that of one micro-batch
    per sequence (1e-5), also with the core attention recomputed (packed_seq_params reach the
    checkpoint)."""
    from r1fast.policy.hf_checkpoint import gather_hf_state_dict, load_hf_checkpoint

    model, path = saved
    rows, tokens, targets, cu = _packed()
    policy = build_policy(load_model_config(path), ParallelConfig(recompute=recompute))
    load_hf_checkpoint(policy, path)
    if recompute == "none":
        lp = policy.logprobs(tokens, targets, cu_seqlens=cu)
        for (t, y), lo, hi in zip(rows, cu[0, :-1].tolist(), cu[0, 1:].tolist()):
            with torch.no_grad():
                ref = hf_logprobs(model, t, y)
            assert (lp[:, lo:hi].double() - ref).abs().max().item() < 1e-5
    n = float((targets != -100).sum())

    def loss_fn(hidden, weight, mb):
        lp = linear_logprob(hidden.reshape(-1, hidden.shape[-1]), weight,
                            mb["targets"].reshape(-1))
        return -lp.sum() / n, {}

    policy.forward_backward([{"tokens": tokens, "targets": targets, "cu_seqlens": cu}], loss_fn)
    packed = {k: v.clone() for k, v in gather_hf_state_dict(policy, grads=True).items()}
    policy.forward_backward([{"tokens": t, "targets": y} for t, y in rows], loss_fn)
    alone = gather_hf_state_dict(policy, grads=True)
    assert set(packed) == set(alone)
    for k in alone:
        assert (packed[k] - alone[k]).abs().max().item() < 1e-5, k
    assert max(v.abs().max().item() for v in alone.values()) > 1e-3  # gradients are not all 0
    destroy_parallel()


def test_expert_load_counts_every_routed_token():
    from r1fast.policy.router import expert_load

    cfg = ModelConfig.preset("tiny-dsv3-mla")
    policy = build_policy(cfg, ParallelConfig())
    tokens, targets = batch(length=9)

    def loss_fn(hidden, weight, mb):
        lp = linear_logprob(hidden.reshape(-1, hidden.shape[-1]), weight,
                            mb["targets"].reshape(-1))
        return -lp.mean(), {}

    policy.forward_backward([{"tokens": tokens, "targets": targets}], loss_fn)
    load = expert_load(policy)
    assert sorted(load) == [1, 2]  # layer 0 is dense
    for counts in load.values():
        assert counts.shape == (8,) and counts.sum().item() == 3 * 9 * cfg.moe_router_topk
    assert all(c.sum().item() == 0 for c in expert_load(policy).values())  # reset


def test_packed_mla_attends_per_sequence_without_a_mask(saved):
    """Packed MLA rows run MLACoreAttention per sequence (no [T, T] mask is built), equal to
    the explicit-mask path (packed_attention = "mask")."""
    from r1fast.policy.hf_checkpoint import load_hf_checkpoint
    from r1fast.policy.packed_attention import packed_inputs

    _, path = saved
    _, tokens, targets, cu = _packed()
    policy = build_policy(load_model_config(path), ParallelConfig(), trainable=False)
    load_hf_checkpoint(policy, path)
    pos, mask, params = packed_inputs(policy, cu, tokens.shape[1])
    # no mask; the boundaries MLA would find in the positions, built from the host's cu_seqlens
    assert mask is None and params.cu_seqlens_q.tolist() == cu[0].tolist()
    assert pos[0].tolist()[:3] == [0, 1, 2] and (pos == 0).sum() == cu.shape[1] - 1
    segments = policy.logprobs(tokens, targets, cu_seqlens=cu)
    policy.packed_attention = "mask"
    masked = policy.logprobs(tokens, targets, cu_seqlens=cu)
    assert (segments - masked).abs().max().item() < 1e-5
    destroy_parallel()
