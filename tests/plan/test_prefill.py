"""The planner's prefill term (r1fast.plan.prefill) against the prefill it describes: the bytes
a KV-cache decoder's prefill really makes on the tiny models (GQA MoE and MLA with dense, shared
and routed experts), whole and in slices (the expanded and the absorbed MLA form), measured
with measure_peak_alloc_bytes; and how the plan and its report carry the term."""
from pathlib import Path

import pytest
import torch

from r1fast.ops._dispatch import triton_missing
from r1fast.plan import plan_memory
from r1fast.plan.measure import measure_peak_alloc_bytes
from r1fast.plan.prefill import prefill_bytes
from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.rollout.kv_cache import KVCacheDecoder, prefill_width
from r1fast.train.config import load_train_config

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
GiB = 2 ** 30


@pytest.fixture(scope="module", params=["tiny-moe", "tiny-dsv3-mla"])
def policy(request):
    from r1fast.policy.model import build_policy
    from r1fast.policy.parallel import destroy_parallel

    yield build_policy(ModelConfig.preset(request.param), ParallelConfig(), seed=0,
                       trainable=False)
    destroy_parallel()


def measured_prefill(policy, rows: int, prompt: int, prefill_tokens: int,
                     experts: str = "sequential") -> int:
    """Peak bytes a prefill makes, less its KV cache (the plan's kv_cache_bytes)."""
    dec = KVCacheDecoder(policy, prefill_tokens=prefill_tokens, experts=experts)
    g = torch.Generator().manual_seed(rows * prompt)
    tokens = torch.randint(3, policy.model_cfg.vocab_size, (rows, prompt), generator=g)
    pads = torch.randint(0, 4, (rows,), generator=g)
    with dec.session():
        _, peak, _ = measure_peak_alloc_bytes(lambda: dec.prefill(tokens, pads, prompt + 8))
    cache = sum(t.nbytes for v in dec.kv_buffers().values()
                for t in (v if isinstance(v, tuple) else (v,)))
    return peak - cache


# rows, prompt length, prefill_tokens: whole prefills; slices whose last one attends to more
# slots than it has queries (MLA: expanded); two-position slices (MLA: absorbed)
SHAPES = [(8, 32, 0), (32, 96, 0), (16, 200, 999), (8, 48, 16)]


@pytest.mark.parametrize("rows, prompt, prefill_tokens", SHAPES)
def test_planned_prefill_bounds_the_measured_one_closely(policy, rows, prompt, prefill_tokens):
    m = policy.model_cfg
    width = prefill_width(rows, prompt, prefill_tokens)
    planned = prefill_bytes(m, 1, 1, 4, (0, m.num_layers), rows, width, prompt, "local")
    planned += rows * 2 * m.vocab_size * 4  # the plan's sampling logits, [B, V] and a shard
    measured = measured_prefill(policy, rows, prompt, prefill_tokens)
    # an upper bound that is not a loose one
    assert measured <= planned <= 1.3 * measured, (planned / measured, width)


@pytest.mark.skipif(triton_missing(torch.device("cpu")) is not None,
                    reason="the grouped expert kernels need Triton's interpreter here")
def test_planned_prefill_with_grouped_experts_bounds_the_measured_one(policy):
    """The grouped kernels hold every routed slot's activation [k, F] at once."""
    m, rows, prompt = policy.model_cfg, 8, 40  # 8 rows: the interpreter's time halves
    planned = prefill_bytes(m, 1, 1, 4, (0, m.num_layers), rows, prompt, prompt, "local",
                            grouped_experts=True)
    planned += rows * 2 * m.vocab_size * 4
    measured = measured_prefill(policy, rows, prompt, 0, experts="grouped")
    assert measured <= planned <= 1.3 * measured, planned / measured


def test_slicing_bounds_the_prefill_and_the_plan_carries_it():
    cfg = load_train_config(RECIPES / "deepseek_v3.toml", [])
    whole = plan_memory(cfg)
    cfg.rollout.prefill_tokens = 8192
    sliced = plan_memory(cfg)
    for a, b in zip(whole.stages, sliced.stages):
        assert a.prefill_tokens == 128 * 512 and b.prefill_tokens == 128 * 64  # 64 positions
        assert b.prefill_bytes < a.prefill_bytes / 3  # 8x fewer queries, MLA's L x L terms stay
        # every other rollout term is unchanged: the peak moves by the prefill alone
        assert a.rollout_peak - a.prefill_bytes == b.rollout_peak - b.prefill_bytes
    assert any("rollout.prefill_tokens slices it" in n for n in whole.notes)
    assert not any("prefill" in n for n in sliced.notes)
    # DeepSeek-V3 at TP8 with sequence parallelism: routed copies of 64k tokens / 8 per rank
    assert 5 * GiB < whole.worst.prefill_bytes < 10 * GiB


def measured_decode_step(policy, rows: int, prompt: int, new: int) -> int:
    """Peak bytes of the last of ``new`` decode steps after a prefill (the step attends to
    ``prompt + new`` slots), with its logits."""
    dec = KVCacheDecoder(policy, experts="sequential")
    g = torch.Generator().manual_seed(rows)
    V = policy.model_cfg.vocab_size
    tokens, tok = torch.randint(3, V, (rows, prompt), generator=g), torch.randint(3, V, (rows,))
    with dec.session():
        dec.prefill(tokens, torch.randint(0, 4, (rows,), generator=g), prompt + new)
        for _ in range(new - 1):
            dec.decode(tok)
        _, peak, _ = measure_peak_alloc_bytes(lambda: dec.decode(tok))
    return peak


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_planned_decode_step_bounds_the_measured_one(policy, dtype):
    """The plan's decode-step term (one query per row over the longest cache: MLA attends over
    an fp32 copy of a layer's latent cache) plus the step's logits bound what a decode step
    makes. GQA in bf16 on a CPU is left out: there SDPA's math path upcasts (unmodelled)."""
    import dataclasses

    from r1fast.policy.model import build_policy

    m = policy.model_cfg
    if dtype == "bfloat16":
        if not m.is_mla:
            pytest.skip("GQA decode in bf16 on a CPU: SDPA's math path (module doc)")
        m = dataclasses.replace(m, params_dtype=dtype)
        policy = build_policy(m, ParallelConfig(), seed=0, trainable=False)
    rows, prompt, new = 16, 40, 24
    planned = prefill_bytes(m, 1, 1, 2 if dtype == "bfloat16" else 4, (0, m.num_layers), rows,
                            1, prompt + new, "local") + rows * m.vocab_size * 4
    measured = measured_decode_step(policy, rows, prompt, new)
    assert measured <= planned <= 1.5 * measured, planned / measured


def test_the_plan_counts_the_largest_rollout_transient():
    """Sliced prefills of DeepSeek-V3 leave a decode step as the largest rollout transient
    (1.4 GiB: an fp32 copy of a layer's latent cache per step): the peak counts it."""
    cfg = load_train_config(RECIPES / "deepseek_v3.toml", ["--rollout.prefill_tokens=4096"])
    w = plan_memory(cfg).worst
    assert w.decode_bytes > w.prefill_bytes > 0
    assert w.rollout_peak == (w.resident_bytes + w.kv_cache_bytes + w.rollout_logits_bytes
                              + max(w.decode_bytes, w.sampling_bytes) + 2 * GiB)


def test_no_prefill_term_for_the_recomputing_decoder():
    cfg = load_train_config(RECIPES / "tiny.toml", [])
    assert plan_memory(cfg, decoder="recompute").worst.prefill_bytes == 0
    assert plan_memory(cfg).worst.prefill_bytes > 0


def test_prefill_width_is_the_decoders_slicing():
    assert prefill_width(4, 10, 0) == 10  # 0: one forward
    assert prefill_width(4, 10, 40) == 10  # fits
    assert prefill_width(4, 10, 39) == 9
    assert prefill_width(4, 10, 3) == 1  # at least one position
    assert prefill_width(4, 10, 24, multiple=4) == 4  # a multiple of the TP size under SP
