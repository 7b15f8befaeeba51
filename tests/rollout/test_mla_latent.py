"""KV-cached decoding of MLA (r1fast.rollout.mla_latent): a latent cache and absorbed attention
against prefix recomputation through the policy's own forward (megatron's MLA, per-head keys and
values, r1fast's MLACoreAttention), on the tiny DeepSeek-V3 model: plain RoPE and YaRN, with
and without q LoRA; shared-position steps with rewinds, the ragged loop (left-padded prefill,
per-row RoPE positions, dropped rows) giving the recomputation's completions and log-probs;
the cache is the latent only (kv_lora + rope per token), NaN-poisoned until written; the
policy's modules are back in place after decoding; TP2 (sequence parallel) equals one rank."""
from __future__ import annotations

import os

import pytest
import torch

from r1fast.rollout.kv_cache import KVCacheDecoder
from r1fast.rollout.recompute import RecomputeDecoder
from r1fast.rollout.sampler import SamplingConfig, generate
from tests.helpers.spawn import run_ranks
from tests.rollout.test_kv_cache import (MAX_LEN, TOL, batch_tokens, max_diff, run_schedule,
                                         sharpen)

YARN = dict(rope_type="yarn", rope_factor=4.0, rope_original_max_position=8,
            rope_mscale=1.0, rope_mscale_all_dim=1.0)


def _build(**changes):
    from r1fast.policy.config import ModelConfig, ParallelConfig
    from r1fast.policy.model import build_policy

    cfg = ModelConfig.preset("tiny-dsv3-mla").replace(**changes)
    return sharpen(build_policy(cfg, ParallelConfig(), seed=0, trainable=False))


@pytest.fixture(scope="module", params=["rope", "yarn", "no-q-lora"])
def mla(request):
    from r1fast.policy.parallel import destroy_parallel

    changes = {"rope": {}, "yarn": YARN, "no-q-lora": dict(q_lora_rank=None)}[request.param]
    yield _build(**changes)
    destroy_parallel()


def test_steps_and_rewinds_match_recomputation(mla):
    tokens = batch_tokens(3)
    kv, ref = run_schedule(KVCacheDecoder(mla), tokens), run_schedule(RecomputeDecoder(mla), tokens)
    scale = max(x.abs().max().item() for x in ref)
    assert scale > 1.0  # logits far from uniform: a wrong attention would show
    assert max_diff(kv, ref) <= TOL * scale


@pytest.mark.parametrize("form", ["absorbed", "expanded"])
def test_each_form_matches_recomputation(mla, form, monkeypatch):
    """Forced for every forward (prefill, steps, rewinds), either form of the attention gives
    the recomputation's logits; "auto" (the other tests) expands prefills and absorbs steps."""
    from r1fast.rollout.mla_latent import LatentMLAAttention

    calls = []
    expands = LatentMLAAttention.expands

    def spy(self, queries, keys):
        calls.append(expands(self, queries, keys))
        return calls[-1]

    monkeypatch.setattr(LatentMLAAttention, "form", form)
    monkeypatch.setattr(LatentMLAAttention, "expands", spy)
    tokens = batch_tokens(3)
    kv, ref = run_schedule(KVCacheDecoder(mla), tokens), run_schedule(RecomputeDecoder(mla), tokens)
    assert calls and set(calls) == {form == "expanded"}
    assert max_diff(kv, ref) <= TOL * max(x.abs().max().item() for x in ref)


def test_auto_expands_prefills_and_absorbs_decode_steps(mla):
    from r1fast.rollout.mla_latent import LatentStore, latent_attentions

    attn = latent_attentions(mla, LatentStore())[0]
    assert attn.form == "auto"
    assert attn.expands(5, 5) and attn.expands(512, 512)
    assert not attn.expands(1, 6) and not attn.expands(1, 4096)


def test_ragged_loop_equals_recomputation(mla):
    """Prompts of 1..20 tokens, left-padded prefill with per-row RoPE, early stops dropping
    rows: the same completions and log-probs as the shared-position loop over recomputation."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (int(k),), generator=g).tolist()
               for k in torch.randint(1, 21, (8,), generator=g)]
    cfg = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=8,
                         stop_token_ids=tuple(range(0, 256, 9)))
    dec = KVCacheDecoder(mla)
    assert dec.ragged
    a = generate(dec, prompts, cfg, eos_token_id=1, row_seeds=list(range(8)), check_every=2)
    b = generate(RecomputeDecoder(mla), prompts, cfg, eos_token_id=1, row_seeds=list(range(8)))
    assert a.completion_ids == b.completion_ids
    assert min(map(len, a.completion_ids)) < max(map(len, a.completion_ids))
    for x, y in zip(a.logprobs, b.logprobs):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=0, atol=TOL)


def test_the_cache_is_the_latent_poisoned_until_written():
    from r1fast.policy.parallel import destroy_parallel
    from r1fast.rollout.mla_latent import LatentMLAAttention

    try:
        policy = _build()
        m = policy.model_cfg
        dec = KVCacheDecoder(policy)
        dec.reset(3, MAX_LEN)
        caches = dec.kv_buffers()
        assert sorted(caches) == [a.layer_number for a in dec.attentions]
        for latent in caches.values():  # one latent per token, not keys/values per head
            assert latent.shape == (MAX_LEN, 3, m.kv_lora_rank + m.qk_rope_head_dim)
            assert torch.isnan(latent).all()
        dec.step(batch_tokens(0)[:, :4], 0)
        for latent in caches.values():
            assert torch.isfinite(latent[:4]).all() and torch.isnan(latent[4:]).all()
        layers = policy.gpt.decoder.layers
        assert not any(isinstance(layer.self_attention, LatentMLAAttention) for layer in layers)
    finally:
        destroy_parallel()


def _tp2_worker(rank: int, ckpt: str, out_dir: str) -> None:
    from r1fast.policy.config import ParallelConfig
    from r1fast.policy.hf_checkpoint import load_hf_checkpoint, load_model_config
    from r1fast.policy.model import build_policy
    from r1fast.policy.parallel import destroy_parallel

    policy = build_policy(load_model_config(ckpt), ParallelConfig(tp=2, sequence_parallel=True),
                          seed=0, trainable=False)
    load_hf_checkpoint(policy, ckpt)
    tokens = batch_tokens(100)
    out = {"kv": run_schedule(KVCacheDecoder(policy), tokens), "sp": policy.sequence_parallel,
           "heads": policy.gpt.decoder.layers[0].self_attention.num_attention_heads_per_partition}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    destroy_parallel()


@pytest.mark.multiproc
def test_tp2_sequence_parallel_equals_one_rank(tmp_path):
    from r1fast.policy.hf_checkpoint import save_hf_checkpoint
    from r1fast.policy.parallel import destroy_parallel

    try:
        policy = _build(**YARN)
        ckpt = str(tmp_path / "ckpt")
        save_hf_checkpoint(policy, ckpt)
        ref = run_schedule(RecomputeDecoder(policy), batch_tokens(100))
    finally:
        destroy_parallel()
    run_ranks(2, _tp2_worker, ckpt, str(tmp_path))
    scale = max(x.abs().max().item() for x in ref)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert got["sp"] and got["heads"] == 2  # each rank holds half the heads of W_uk / W_uv
        assert max_diff(got["kv"], ref) <= TOL * scale, r
