"""The planner on DeepSeek-V3's architecture: MLA parameters counted exactly as the policy
builds them (q LoRA or plain q; down projections whole on every TP rank), uneven pipeline
splits as ParallelConfig.stage_layers gives them, and the real recipe's totals."""
from __future__ import annotations

import pytest

from r1fast.plan.memory import stage_layers, stage_params, total_params
from r1fast.policy.config import ModelConfig, ParallelConfig

MLA = ModelConfig(
    vocab_size=128, hidden_size=48, num_layers=3, num_attention_heads=4, ffn_hidden_size=96,
    attention="mla", q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
    v_head_dim=12, num_experts=8, moe_ffn_hidden_size=16, moe_router_topk=4, dense_layers=(0,),
    shared_expert_size=16, router_score="sigmoid", router_n_groups=4, router_topk_groups=2,
    router_expert_bias=True, max_position_embeddings=256)


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_mla_params_equal_the_built_policy(q_lora_rank):
    from r1fast.policy.model import build_policy
    from r1fast.policy.parallel import destroy_parallel

    m = MLA.replace(q_lora_rank=q_lora_rank)
    try:
        policy = build_policy(m, ParallelConfig(), trainable=False)
        assert policy.num_parameters() == total_params(m)
    finally:
        destroy_parallel()


def test_uneven_split_is_the_parallel_config_split():
    m = MLA.replace(num_layers=61, dense_layers=(0, 1, 2))
    split = ParallelConfig(pp=4, pp_first_stage_layers=16).stage_layers(61)
    assert split == [16, 15, 15, 15]
    assert [stage_layers(m, 4, s, split) for s in range(4)] == [(0, 16), (16, 31), (31, 46),
                                                                (46, 61)]
    per_stage = [sum(stage_params(m, 1, 4, 1, s, split)) for s in range(4)]
    assert sum(per_stage) == total_params(m)


def test_deepseek_v3_recipe_plan():
    from r1fast.plan.memory import plan_memory
    from r1fast.train.config import load_train_config

    cfg = load_train_config("recipes/deepseek_v3.toml")
    assert cfg.model.is_mla and cfg.parallel.pp_first_stage_layers == 16
    assert round(total_params(cfg.model) / 1e9) == 671
    plan = plan_memory(cfg, gpu_mem_gib=80.0)
    assert [s.layers for s in plan.stages] == [(0, 16), (16, 31), (31, 46), (46, 61)]
    assert max(s.train_peak for s in plan.stages) < 80 * 2**30
    # the rollout's MLA cache is the latent (512 + 64 per token and layer): the plan fits
    worst = max(plan.stages, key=lambda s: s.rollout_peak)
    assert plan.fits and worst.rollout_peak < 80 * 2**30
    assert plan.stages[0].kv_cache_bytes == 16 * (512 + 64) * 128 * 4608 * 2


def test_kv_cache_bytes_are_the_decoders_buffers():
    """The planner's rollout cache equals what KVCacheDecoder allocates (MLA: the latent)."""
    from r1fast.plan.memory import kv_cache_bytes
    from r1fast.policy.model import build_policy
    from r1fast.policy.parallel import destroy_parallel
    from r1fast.rollout.kv_cache import KVCacheDecoder

    for m in (MLA, ModelConfig.preset("tiny-moe")):
        try:
            dec = KVCacheDecoder(build_policy(m, ParallelConfig(), trainable=False))
            dec.reset(5, 40)
            buffers = [t for v in dec.kv_buffers().values()
                       for t in (v if isinstance(v, tuple) else (v,))]
            assert sum(t.nbytes for t in buffers) == kv_cache_bytes(m, 1, m.num_layers, 5, 40)
        finally:
            destroy_parallel()
