"""Tests of the memory planner (r1fast.plan: its memory model and ``r1fast plan``).

The planner is checked against the real thing: megatron-core policies built by r1fast.policy
(parameter counts per rank and per stage, parameter/gradient/optimizer bytes after an Adam
step, bytes autograd saves for a training micro-batch), at 1 rank here and at TP/PP/EP layouts
on 4 gloo processes (multiproc). The big recipes are planned and their headline numbers
checked against the published model sizes.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r1fast.plan import (GiB, format_plan, measure_saved_bytes, measure_state_bytes, plan_main,
                         plan_memory)
from r1fast.ops._dispatch import triton_missing
from r1fast.plan.memory import stage_activation_bytes, stage_params, total_params
from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.train.config import TrainConfig, load_train_config

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"


def recipe(name: str, *overrides: str) -> TrainConfig:
    return load_train_config(RECIPES / name, list(overrides))


# ----------------------------------------------------------------------------- vs megatron (1 rank)

@pytest.fixture
def megatron_rank():
    """A one-process gloo group for megatron; torn down afterwards so other tests start clean."""
    from r1fast.policy.parallel import destroy_parallel

    yield
    destroy_parallel()


def _build(model: ModelConfig, trainable: bool = True):
    from r1fast.policy.model import build_policy

    return build_policy(model, ParallelConfig(), seed=0, trainable=trainable)


@pytest.mark.parametrize("variant", ["tiny-recipe", "tiny-dsv3-dense0", "tiny-dense-tied"])
def test_param_count_equals_megatron_model(megatron_rank, variant):
    cfg = recipe("tiny.toml")
    m = {"tiny-recipe": cfg.model,
         "tiny-dsv3-dense0": ModelConfig.preset("tiny-dsv3").replace(dense_layers=(0,)),
         "tiny-dense-tied": ModelConfig.preset("tiny-dense").replace(tie_embeddings=True)}[variant]
    policy = _build(m, trainable=False)
    real = policy.num_parameters()
    local = sum(p.numel() for p in policy.gpt.parameters())
    assert total_params(m) == real  # the brief asks for 10%; the layout formula is exact
    dense, expert = stage_params(m, 1, 1, 1, 0)
    assert dense + expert == local


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_param_grad_optimizer_bytes_match_measured(megatron_rank, dtype):
    from r1fast.ops.linear_logprob import linear_logprob
    from r1fast.policy.optim import OptimConfig, build_optimizer

    cfg = recipe("tiny.toml", f"--model.params_dtype={dtype}")
    policy = _build(cfg.model)
    opt, _ = build_optimizer(policy, OptimConfig(lr=1e-3, total_steps=4))
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 17))

    def loss_fn(hidden, weight, mb):
        b, length, h = hidden.shape
        logp = linear_logprob(hidden.reshape(b * length, h), weight, mb["tokens"].reshape(-1),
                              tp_group=policy.tp_group, impl="torch")
        return -logp.mean(), {}

    policy.forward_backward([{"tokens": tokens}], loss_fn)
    ok, grad_norm, _ = opt.step()
    assert ok and grad_norm > 0
    real = measure_state_bytes(policy, opt)
    plan = plan_memory(cfg, 1).worst
    assert real["adam"] > 0 and real["grads"] > 0
    # within 2% (the brief asks for 10%): megatron pads its grad buffer and keeps the torch
    # RMSNorm weights of a bf16 model in fp32, nothing else differs
    assert plan.param_bytes == pytest.approx(real["params"], rel=0.02)
    assert plan.grad_bytes == pytest.approx(real["grads"], rel=0.02)
    assert plan.adam_bytes == pytest.approx(real["adam"], rel=0.02)
    assert plan.master_bytes == pytest.approx(real["master"], rel=0.02, abs=0)
    assert (plan.master_bytes > 0) == (dtype == "bfloat16")
    total_plan = plan.param_bytes + plan.grad_bytes + plan.master_bytes + plan.adam_bytes
    assert total_plan == pytest.approx(sum(real.values()), rel=0.02)


@pytest.mark.parametrize("preset,batch,length,experts", [
    ("tiny-moe", 3, 41, "sequential"), ("tiny-dsv3", 1, 63, "sequential"),
    pytest.param("tiny-dsv3", 1, 63, "grouped", marks=pytest.mark.skipif(
        triton_missing(torch.device("cpu")) is not None, reason="grouped experts need Triton")),
])
def test_activation_bytes_match_saved_tensors(megatron_rank, preset, batch, length, experts):
    """Bytes autograd saves in one training micro-batch (megatron's local layers, as on CPU;
    the routed experts through the loop or the grouped kernels) against the planner's "local"
    count, within 3% (measured: 0.1%; the log-prob head's own few tensors are not planned)."""
    from r1fast.ops.linear_logprob import linear_logprob
    from r1fast.policy.local_experts import use_grouped_experts

    m = ModelConfig.preset(preset)
    policy = _build(m)
    use_grouped_experts(policy.gpt, experts)
    tokens = torch.randint(0, m.vocab_size, (batch, length))

    def loss_fn(hidden, weight, mb):
        b, n, h = hidden.shape
        logp = linear_logprob(hidden.reshape(b * n, h), weight, mb["tokens"].reshape(-1),
                              tp_group=policy.tp_group, impl="torch")
        return -logp.mean(), {}

    _, saved = measure_saved_bytes(
        lambda: policy.forward_backward([{"tokens": tokens}], loss_fn),
        exclude=list(policy.gpt.parameters()))
    planned = stage_activation_bytes(m, ParallelConfig(world_size=1, experts=experts), 0,
                                     batch * length, length, "none", "local")
    assert planned == pytest.approx(saved, rel=0.03)


# ----------------------------------------------------------------------------- vs megatron (4 ranks)

@pytest.mark.multiproc
def test_per_rank_counts_match_megatron_layouts(tmp_path):
    """TP2xEP2, PP2xEP2 and TP2xPP2 on 4 gloo ranks: each rank's local parameters (dense and
    expert) equal the planner's stage counts; at PP1 the saved activations (sequence parallel)
    match within 3% (measured: 0.5%, the EP ranks' routed loads differ)."""
    out = tmp_path / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(Path(__file__).with_name("_plan_worker.py")), str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())
    m = ModelConfig.preset("tiny-dsv3").replace(dense_layers=(0,))
    assert len(rows) == 12
    for r in rows:
        tp, pp, ep = r["layout"]
        dense, expert = stage_params(m, tp, pp, ep, r["pp_rank"])
        assert r["dense"] + r["expert"] == dense + expert, r
        if ep > 1:  # megatron marks experts as expert-parallel only when ep > 1
            assert (r["dense"], r["expert"]) == (dense, expert), r
        if r["saved"] is not None:
            par = ParallelConfig(tp=tp, pp=pp, ep=ep, world_size=4)
            planned = stage_activation_bytes(m, par, 0, 2 * 24, 24, "none", "local")
            assert planned == pytest.approx(r["saved"], rel=0.03), r


# ----------------------------------------------------------------------------- the big recipes

def test_qwen3_30b_recipe_plans_and_prints(capsys):
    cfg = recipe("qwen3_30b_a3b.toml")
    plan = plan_memory(cfg)
    # Qwen3-30B-A3B: 30.5 B total, 3.3 B active
    assert 30.3e9 < plan.total_params < 30.7e9
    assert 3.2e9 < plan.active_params < 3.5e9
    assert (plan.world_size, plan.tp, plan.pp, plan.ep, plan.dp, plan.expert_dp) == \
        (8, 1, 1, 8, 8, 1)
    w = plan.worst
    assert w.expert_params == 48 * 16 * 3 * 2048 * 768  # 16 whole experts per layer per rank
    assert w.grad_bytes == 4 * (w.dense_params + w.expert_params)
    assert w.adam_bytes == 8 * (math.ceil(w.dense_params / 8) + w.expert_params)
    # the fused head is bounded (its workspace, and dX, dW as every head returns them), full
    # logits are not
    assert w.logprob_fused_bytes < w.logprob_unfused_bytes / 8
    assert not plan.fits and plan_memory(cfg, gpu_mem_gib=140).fits
    two_nodes = plan_memory(cfg, 16).worst
    assert two_nodes.adam_bytes < 0.6 * w.adam_bytes  # expert-DP 2 halves the expert state
    assert plan_main([str(RECIPES / "qwen3_30b_a3b.toml"), "--plain"]) == 0
    text = capsys.readouterr().out
    for label in ("parameters (bfloat16)", "gradients (fp32 main_grad)", "Adam m, v",
                  "reference policy", "activations (recompute none", "log-prob head",
                  "rollout KV cache", "PEAK", "fits 80 GiB: NO (short by 31.02 GiB)",
                  "ep 8, expert-dp 1", "checkpoint save (transient)", "= save peak",
                  # the default counts Transformer Engine's layers, which r1fast does not install
                  "activations are counted for Transformer Engine's layers",
                  "does NOT fit (--spec local)"):
        assert label in text, label


def test_deepseek_v3_recipe_loads_and_plans():
    cfg = recipe("deepseek_v3.toml")
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_experts, m.moe_router_topk) == (61, 7168, 256, 8)
    assert m.is_mla and (m.q_lora_rank, m.kv_lora_rank, m.qk_rope_head_dim) == (1536, 512, 64)
    assert m.vocab_size % cfg.parallel.tp == 0
    plan = plan_memory(cfg, recompute="full")
    assert plan.total_params == pytest.approx(671e9, rel=0.001)  # DeepSeek-V3: 671 B
    assert plan.world_size == 256 and plan.expert_dp == 1 and plan.sequence_parallel
    assert [s.layers for s in plan.stages] == [(0, 16), (16, 31), (31, 46), (46, 61)]
    stage0 = plan.stages[0]  # 13 MoE layers (0-2 dense), 4 experts of each on this rank
    assert stage0.expert_params == 13 * 4 * 3 * 7168 * 2048
    assert stage0.activation_bytes["full"] < stage0.activation_bytes["selective"] \
        < stage0.activation_bytes["none"]
    # the update fits 80 GB even without recompute, and so does the rollout: its MLA KV cache
    # is the compressed latent (r1fast.rollout.mla_latent), 512 + 64 numbers per token and layer
    assert max(s.train_peak for s in plan_memory(cfg, recompute="none").stages) < 80 * 2**30
    assert plan.fits and plan.worst.kv_cache_bytes < 11 * 2**30


def test_json_and_rich_output(capsys):
    assert plan_main([str(RECIPES / "tiny_tp2ep2.toml"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["world_size"], d["tp"], d["ep"], d["dp"], d["sequence_parallel"]) == \
        (4, 2, 2, 2, True)
    assert d["stages"][d["worst_stage"]]["peak"] >= d["stages"][0]["resident_bytes"]
    cfg = recipe("tiny.toml", "--parallel.pp=2")
    plan = plan_memory(cfg, 2)
    plain = format_plan(plan, cfg, use_rich=False)
    rich = format_plan(plan, cfg, use_rich=True)
    for text in (plain, rich):
        assert "per pipeline stage" in text and "PEAK" in text


def test_cli_overrides_and_check(capsys):
    args = [str(RECIPES / "tiny.toml"), "--override", "parallel.tp=2", "--parallel.ep=2",
            "--gpus", "4", "--plain"]
    assert plan_main(args) == 0
    assert "world 4 = tp 2 x pp 1 x dp 2; ep 2, expert-dp 2" in capsys.readouterr().out
    assert plan_main([str(RECIPES / "tiny.toml"), "--dp", "2", "--plain"]) == 0
    assert "world 2 = tp 1 x pp 1 x dp 2" in capsys.readouterr().out
    assert plan_main([str(RECIPES / "qwen3_30b_a3b.toml"), "--check", "--plain"]) == 1
    assert plan_main([str(RECIPES / "qwen3_30b_a3b.toml"), "--check", "--gpu-mem", "140",
                      "--plain"]) == 0


def test_a_plan_that_does_not_fit_says_what_would(capsys):
    """The cheapest recompute that fits at 1x, 2x and 4x the GPUs (README's 30B numbers), in
    the text and the JSON; nothing for a plan that fits, and a line when nothing does."""
    qwen = str(RECIPES / "qwen3_30b_a3b.toml")
    assert plan_main([qwen, "--plain"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == "fits 80 GiB with --gpus 32: 79.0 GiB (recompute none, margin 1.0 GiB)"
    cfg = recipe("qwen3_30b_a3b.toml")
    assert not plan_memory(cfg, 8, recompute="full").fits  # 8 GPUs: no recompute is enough
    # 16 GPUs train and sample in 70 GiB with full recompute, but the checkpoint save gathers
    # the fp32 expert buffer whole on the GPU: 82.1 GiB
    sixteen = plan_memory(cfg, 16, recompute="full").worst
    assert max(sixteen.train_peak, sixteen.rollout_peak) < 70 * GiB < 80 * GiB < sixteen.peak
    assert sixteen.peak == sixteen.save_peak
    # by hand: the largest buffer (the experts', sharded over expert-DP 2) whole in fp32, beside
    # a copy of this rank's shard; no gather without the distributed optimizer
    e = sixteen.expert_params
    assert sixteen.save_bytes == 4 * (e + math.ceil(e / 2))
    plain = recipe("qwen3_30b_a3b.toml", "--optim.use_distributed_optimizer=false")
    assert plan_memory(plain, 16).worst.save_bytes == 0
    assert plan_memory(cfg, 32, recompute="full").fits
    assert plan_main([qwen, "--json", "--gpu-mem", "140"]) == 0
    assert json.loads(capsys.readouterr().out)["fits_with"] == []
    assert plan_main([qwen, "--plain", "--gpu-mem", "40"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        "nothing else planned at up to 32 GPUs")
    # a what-if recompute of a run that fits as set: said, not an empty flag list
    assert plan_main([qwen, "--plain", "--gpus", "32", "--gpu-mem", "72", "--override",
                      "parallel.recompute=full", "--recompute", "none"]) == 0
    assert "fits 72 GiB with the run's own settings (no --recompute what-if): 68.0 GiB " \
        "(recompute full, margin 4.0 GiB)" in \
        capsys.readouterr().out
    # a GPU count the trainer refuses is named with its reason
    assert plan_main([str(RECIPES / "tiny_tp2ep2.toml"), "--plain", "--gpu-mem", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "at 16 GPUs the layout is refused: data.prompts_per_step (4) must be divisible" in out


def test_a_checkpoint_that_is_not_here_is_said_or_refused(tmp_path, capsys):
    """Planned where run.init_from is not, a recipe with [model] plans that table and says so;
    one without [model] used to plan the tiny default model (157 K parameters) for a 3B run."""
    assert plan_main([str(RECIPES / "deepseek_v3.toml"), "--plain"]) == 0
    out, err = capsys.readouterr()
    assert "671" in out and "run.init_from=/path/to/DeepSeek-V3-Base is not a model folder" in err
    assert plan_main([str(RECIPES / "countdown_tinyzero.toml"), "--plain"]) == 2
    err = capsys.readouterr().err
    assert "run.init_from=ckpt/Qwen2.5-3B holds no config.json" in err and "no [model]" in err
    # with the checkpoint's config.json, the plan is of that model, prompts as the recipe keeps
    (tmp_path / "config.json").write_text(json.dumps(ModelConfig.preset("tiny-moe").replace(
        max_position_embeddings=2048).to_hf_config()))
    assert plan_main([str(RECIPES / "countdown_tinyzero.toml"), f"--run.init_from={tmp_path}",
                      "--plain"]) == 0
    out, err = capsys.readouterr()
    assert "(256 prompt + 1024 new)" in out and "note" not in err


def test_the_plan_counts_the_recipes_recompute(capsys):
    """The planner used `--recompute` (default none) and never the recipe's
    parallel.recompute: a run planned as fitting with `--recompute full` ran without it, and a
    recipe with recompute was planned as if it had none. The recipe's setting is the default
    now; another `--recompute` is a what-if, said on stderr."""
    qwen = [str(RECIPES / "qwen3_30b_a3b.toml"), "--gpus", "32", "--gpu-mem", "72", "--check",
            "--plain"]
    assert plan_main([*qwen, "--override", "parallel.recompute=full"]) == 0  # 68.0 GiB: fits
    assert "activations (recompute full, x1)" in capsys.readouterr().out
    assert plan_main(qwen) == 1  # as the recipe runs: no recompute, 79.0 GiB
    assert plan_main([*qwen, "--recompute", "full"]) == 0
    err = capsys.readouterr().err
    assert "--recompute full is a what-if: the recipe runs with parallel.recompute=none" in err


def test_a_batch_layout_the_trainer_refuses_is_not_planned(capsys):
    qwen = [str(RECIPES / "qwen3_30b_a3b.toml"), "--gpus", "16", "--plain"]
    assert plan_main([*qwen, "--override", "parallel.micro_batch_size=3"]) == 2
    assert "parallel.micro_batch_size=3 must divide the rows" in capsys.readouterr().err


# ----------------------------------------------------------------------------- impossible layouts

@pytest.mark.parametrize("overrides,world,match", [
    (["--parallel.ep=3"], 3, r"num_experts \(8\) must be divisible by ep \(3\)"),
    (["--parallel.tp=4"], 6, r"world size 6 is not a multiple of tp\*pp = 4\*1"),
    (["--parallel.ep=4"], 2, r"world size 2 is not a multiple of ep\*pp = 4\*1"),
    (["--parallel.pp=3"], 3, r"num_layers \(2\) must be divisible by pp \(3\)"),
    (["--parallel.tp=8"], 8, r"num_attention_heads \(4\) must be divisible by tp \(8\)"),
    (["--parallel.tp=2", "--parallel.sequence_parallel=false"], 2,
     r"MoE model at tp > 1 needs sequence_parallel"),
    (["--data.prompts_per_step=3"], 2, r"prompts_per_step \(3\) must be divisible by the data "
                                        r"parallel size 2"),
])
def test_impossible_layouts_raise(overrides, world, match, capsys):
    cfg = recipe("tiny.toml", *overrides)
    with pytest.raises(ValueError, match=match):
        plan_memory(cfg, world)
    assert plan_main([str(RECIPES / "tiny.toml"), *overrides, "--gpus", str(world)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("r1fast plan: error:") and re.search(match, err)


def test_dsv3_pp_split_must_add_up_to_61_layers():
    with pytest.raises(ValueError, match=r"pp_first_stage_layers/pp_last_stage_layers "
                                         r"\(20/None\) do not split num_layers \(61\)"):
        plan_memory(recipe("deepseek_v3.toml", "--parallel.pp_first_stage_layers=20"))


@pytest.mark.parametrize("kwargs,match", [
    ({"gpu_mem_gib": 0}, r"gpu_mem_gib must be a number > 0, got 0"),
    ({"world_size": 0}, r"world_size must be an int >= 1, got 0"),
    ({"recompute": "some"}, r"recompute must be one of \('none', 'selective', 'full'\)"),
    ({"spec": "cuda"}, r"spec must be one of \('te', 'local'\)"),
    ({"decoder": "vllm"}, r"decoder must be one of \('kv-cache', 'recompute'\)"),
    ({"prompt_len": 0}, r"prompt_len must be an int >= 1, got 0"),
    ({"reserve_gib": -1.0}, r"reserve_gib must be >= 0, got -1.0"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_memory(recipe("tiny.toml"), **kwargs)


def test_cli_bad_inputs(capsys, tmp_path):
    assert plan_main([str(tmp_path / "missing.toml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    assert plan_main([str(RECIPES / "tiny.toml"), "--parallel.tpp=2"]) == 2
    assert "did you mean 'parallel.tp'" in capsys.readouterr().err
    assert plan_main([str(RECIPES / "tiny.toml"), "--dp", "0"]) == 2
    assert "--dp must be >= 1, got 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- properties

@st.composite
def layouts(draw):
    """A small MoE model and a layout that holds it."""
    tp = draw(st.sampled_from([1, 2, 4]))
    pp = draw(st.sampled_from([1, 2, 3]))
    ep = draw(st.sampled_from([1, 2, 4, 8]))
    per_stage = draw(st.integers(1, 3))
    layers = pp * per_stage
    m = ModelConfig(
        vocab_size=tp * draw(st.integers(1, 40)), hidden_size=draw(st.sampled_from([8, 16, 24])),
        num_layers=layers, num_attention_heads=4 * tp, num_query_groups=tp * draw(
            st.sampled_from([1, 2, 4])), head_dim=draw(st.sampled_from([4, 8])),
        ffn_hidden_size=tp * draw(st.integers(1, 9)), num_experts=8,
        moe_ffn_hidden_size=tp * draw(st.integers(1, 5)), moe_router_topk=(k := draw(
            st.integers(1, 8))), router_pre_softmax=k == 1,  # top-1 needs the full softmax
        dense_layers=tuple(sorted(draw(st.sets(st.integers(0, layers - 1), max_size=layers)))),
        shared_expert_size=draw(st.sampled_from([None, 2 * tp])),
        qk_layernorm=draw(st.booleans()), add_qkv_bias=draw(st.booleans()),
        tie_embeddings=draw(st.booleans()),
        params_dtype=draw(st.sampled_from(["float32", "bfloat16"]))).validate()
    dp = draw(st.sampled_from([1, 2, 4]))
    world = math.lcm(tp, ep) * pp * dp
    return m, ParallelConfig(tp=tp, pp=pp, ep=ep, world_size=world).validate(m)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_shards_add_up_to_the_model(layout):
    """Summing every rank's distinct shard gives the whole model: TP-split tensors times tp,
    replicated norms/router once, experts times ep, stages once each (a tied output layer on the
    last stage is the only copy, when pp > 1)."""
    m, par = layout
    tp, pp, ep = par.tp, par.pp, par.ep
    total = 0
    for s in range(pp):
        dense_tp, expert_ep = stage_params(m, tp, pp, ep, s)
        dense_1, _ = stage_params(m, 1, pp, 1, s)
        # replicated part r satisfies dense_tp = r + split/tp and dense_1 = r + split
        split = (dense_1 - dense_tp) * tp // (tp - 1) if tp > 1 else dense_1
        replicated = dense_1 - split
        assert replicated >= 0 and split >= 0
        total += replicated + split + expert_ep * ep
    tied_copy = m.vocab_size * m.hidden_size if (m.tie_embeddings and pp > 1) else 0
    assert total - tied_copy == total_params(m)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), st.sampled_from([1, 2]))
def test_more_data_parallel_never_costs_memory(layout, factor):
    m, par = layout
    cfg = TrainConfig(model=m, parallel=par)
    cfg.data.prompts_per_step = 8 * par.dp * 2
    small = plan_memory(cfg, par.world_size, spec="local")
    big = plan_memory(cfg, par.world_size * 2 * factor, spec="local")
    for a, b in zip(small.stages, big.stages):
        assert b.master_bytes + b.adam_bytes <= a.master_bytes + a.adam_bytes
        assert b.param_bytes == a.param_bytes and b.grad_bytes == a.grad_bytes
        # selective never saves more than none; full keeps less once a stage has 2+ layers
        acts = b.activation_bytes
        assert acts["selective"] <= acts["none"]
        if b.layers[1] - b.layers[0] >= 2:
            assert acts["full"] <= acts["none"]
    # fits is monotone in the GPU size
    need = small.worst.peak / GiB
    assert plan_memory(cfg, par.world_size, gpu_mem_gib=need * 1.01, spec="local").fits
    assert not plan_memory(cfg, par.world_size, gpu_mem_gib=need * 0.99, spec="local").fits


@pytest.mark.parametrize("model, budget", [("tiny", 64), ("tiny", 160), ("tiny_dsv3_mla", 64),
                                           ("tiny_dsv3_mla", 160)])
def test_packed_peak_follows_the_token_budget(megatron_rank, model, budget):
    """A packed micro-batch (rows end to end under parallel.max_tokens_per_microbatch) keeps
    activations for `budget` tokens, its rows attending per sequence (no [T, T] terms): the
    peak autograd keeps in its forward-backward is within 15% of the plan of that budget,
    whatever the rows (measured: 0.25% at budgets 64 and 160). MLA keeps each sequence's
    [L, L] probabilities, so its plan takes every row at its longest (prompt + completion,
    32 here): with rows of that length the peak is within 1% (measured: 0.1%)."""
    import itertools

    from r1fast.ops.linear_logprob import linear_logprob
    from r1fast.plan import plan_memory
    from r1fast.plan.measure import measure_peak_saved_bytes

    cfg = load_train_config(RECIPES / f"{model}.toml",
                            [f"--parallel.max_tokens_per_microbatch={budget}",
                             "--rollout.max_new_tokens=16"])
    m = cfg.model
    policy = _build(m)
    g = torch.Generator().manual_seed(0)
    mla = m.is_mla
    lengths = ([32] * (budget // 32) if mla  # every row at its longest: the plan's worst case
               else [budget // 2, budget // 4, budget - budget // 2 - budget // 4])  # uneven
    tokens = torch.randint(0, m.vocab_size, (1, budget), generator=g)
    cu = torch.tensor([[0, *itertools.accumulate(lengths)]])

    def loss_fn(hidden, weight, mb):
        b, n, h = hidden.shape
        logp = linear_logprob(hidden.reshape(b * n, h), weight, mb["tokens"].reshape(-1),
                              impl="torch")
        return -logp.mean(), {}

    _, peak, _ = measure_peak_saved_bytes(
        lambda: policy.forward_backward([{"tokens": tokens, "cu_seqlens": cu}], loss_fn),
        exclude=list(policy.gpt.parameters()))
    plan = plan_memory(cfg, world_size=1, prompt_len=16, spec="local")
    assert plan.packed and plan.micro_batch_tokens == budget
    assert plan.worst.activation_bytes["none"] == pytest.approx(peak, rel=0.01 if mla else 0.15)


def test_logprob_head_arrangements_are_planned():
    """algo.logprob_head changes the head's bytes by what each arrangement allocates: cuBLAS
    tiles add the fp32 logit tile beside the dz workspace (half as many columns); the
    in-forward gradient holds an fp32 dW accumulator and keeps dW and dx, rounded to bf16,
    until the backward."""
    from r1fast.ops.linear_logprob import DEFAULT_CHUNKS

    plans = {head: plan_memory(recipe("qwen3_30b_a3b.toml", f"--algo.logprob_head={head}"))
             for head in ("fused", "gemm", "grad-in-forward")}
    m = recipe("qwen3_30b_a3b.toml").model
    v, h, tp = m.vocab_size, m.hidden_size, plans["fused"].tp
    fused, gemm, in_forward = (plans[k].worst for k in ("fused", "gemm", "grad-in-forward"))
    workspace = DEFAULT_CHUNKS.triton_workspace * 2  # bytes of bf16 dz at the default chunk
    assert fused.logprob_bytes <= workspace + 7 * 4 * 16384 + v // tp * h * 4
    assert gemm.logprob_bytes - fused.logprob_bytes == pytest.approx(workspace / 2, rel=0.05)
    kept = (v // tp + fused.logprob_unfused_bytes // (v // tp * 16)) * h * (4 + 2)
    assert in_forward.logprob_bytes > kept
    assert in_forward.train_peak - fused.train_peak == \
        in_forward.logprob_bytes - fused.logprob_bytes
    assert fused.logprob_unfused_bytes == in_forward.logprob_unfused_bytes


def test_grad_in_forward_head_peak_is_measured(monkeypatch):
    """The in-forward gradient's planned bytes against its measured peak (CPU RSS, fp32, the
    Triton interpreter): two groups, so the fp32 dW accumulator and the GEMM result added to
    it are alive together, which is most of the peak here (2 x 8 MiB of ~17 MiB)."""
    import dataclasses
    from types import SimpleNamespace

    from r1fast.ops._dispatch import triton_missing

    if triton_missing(torch.device("cpu")) is not None:
        pytest.skip(str(triton_missing(torch.device("cpu"))))
    sys.path.insert(0, str(ROOT / "bench"))
    from harness import peak_extra_bytes

    import r1fast.ops.fused_linear_policy_grad as grad_mod
    from r1fast.ops.fused_linear_policy_loss import fused_linear_policy_loss
    from r1fast.plan.memory import logprob_head_bytes

    N, H, V = 64, 4096, 512
    monkeypatch.setattr(grad_mod, "DEFAULT_CHUNKS", dataclasses.replace(
        grad_mod.DEFAULT_CHUNKS, triton_workspace=2 * 16 * V, grad_in_forward_dz=32 * V))
    assert (grad_mod.chunk_rows(N, V), grad_mod.group_rows(N, V)) == (16, 32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, N, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, V, (1, N), generator=g)
    args = (x, w, targets, torch.full((1, N), -6.0), torch.randn(1), torch.ones(1, N))

    def head():
        return fused_linear_policy_loss(*args, impl="triton", grad_in_forward=True)

    head()  # warm: the interpreter's own first-call allocations are not the op's
    measured = peak_extra_bytes(head, torch.device("cpu"))
    model = SimpleNamespace(params_dtype="float32", vocab_size=V, hidden_size=H)
    planned = logprob_head_bytes(model, 1, N, "grad-in-forward")[0]
    assert measured == pytest.approx(planned, rel=0.1), (measured / 2**20, planned / 2**20)
