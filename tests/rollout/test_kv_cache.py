"""KVCacheDecoder's shared-position steps against prefix recomputation (RecomputeDecoder) on the
tiny MoE policy: logits of prefill, one-token, multi-token and rewinding steps to 1e-5 on one
rank and at TP2 (sequence parallel, padded steps), EP2 and PP2 with two gloo processes; the
same completions from ``generate``; a decode step's only host reads (the expert counts, none
with the grouped expert kernels, which decode the same logits); the
NaN-poisoned cache never read before written; a foreign
core attention decoded through a local one; recomputation only when asked for; one test per
bad input. The ragged loop (left-padded prefill, dropped rows, R3) is tested in
tests/rollout/test_engine.py."""
from __future__ import annotations

import faulthandler
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r1fast.ops._dispatch import triton_missing
from r1fast.rollout.kv_cache import KVCacheDecoder, make_decoder
from r1fast.rollout.sampler import SamplingConfig, generate
from tests.helpers.spawn import run_ranks

MAX_LEN = 12
# (offset, n): prefill, one-token steps, a multi-token step after the prompt, rewinds
SCHEDULE = [(0, 5), (5, 1), (6, 1), (7, 3), (10, 1), (8, 2), (10, 2)]
PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 8, 31], [7, 7, 100, 12], [250, 3, 19, 60, 2]]
SEEDS = [11, 12, 13, 14]
TOL = 1e-5


def sharpen(policy, seed=5):
    """O(1) weights, so that routing and logits are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.gpt.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if "layernorm" in name
                    else 0.15 * torch.randn(p.shape, generator=g))
    return policy


def batch_tokens(seed: int, batch: int = 3, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, MAX_LEN), generator=torch.Generator().manual_seed(seed))


def run_schedule(decoder, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The logits [B, n, V] of each step of SCHEDULE."""
    decoder.reset(tokens.shape[0], MAX_LEN)
    return [decoder.step(tokens[:, o:o + n], o) for o, n in SCHEDULE]


def sample(decoder, eos: int):
    cfg = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=5)
    return generate(decoder, PROMPTS, cfg, eos_token_id=eos, row_seeds=SEEDS)


def ragged_prompts(dp_rank: int) -> list[list[int]]:
    """Rank 0's prompts fit one prefill forward of 64 tokens; rank 1's need four slices."""
    lens = [10, 12, 9, 11] if dp_rank == 0 else [60, 3, 40, 7]
    g = torch.Generator().manual_seed(dp_rank)
    return [torch.randint(2, 256, (n,), generator=g).tolist() for n in lens]


def sample_ragged(decoder, dp_rank: int, sync=None) -> list[list[int]]:
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=6)
    return generate(decoder, ragged_prompts(dp_rank), cfg, eos_token_id=256, sync=sync,
                    row_seeds=[10 * dp_rank + i for i in range(4)], check_every=2).completion_ids


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ----------------------------------------------------------------------------- one rank

@pytest.fixture(scope="module")
def policy():
    from r1fast.policy.config import ModelConfig, ParallelConfig
    from r1fast.policy.model import build_policy
    from r1fast.policy.parallel import destroy_parallel

    yield sharpen(build_policy(ModelConfig.preset("tiny-moe"), ParallelConfig(), seed=0,
                               trainable=False))
    destroy_parallel()


def test_steps_match_prefix_recomputation(policy):
    from r1fast.rollout.recompute import RecomputeDecoder

    tokens = batch_tokens(100)
    kv, ref = run_schedule(KVCacheDecoder(policy), tokens), run_schedule(RecomputeDecoder(policy),
                                                                         tokens)
    assert [x.shape for x in kv] == [(3, n, 256) for _, n in SCHEDULE]
    assert all(x.dtype == torch.float32 for x in kv)
    assert min(x.std().item() for x in ref) > 0.3  # logits far from uniform
    assert max_diff(kv, ref) <= TOL


def test_steps_match_an_independent_fp64_attention(policy):
    """Swap each layer's core attention for an fp64 causal softmax that knows nothing of the
    cache: the decoder's logits at every step must equal those of plain recomputation with
    that attention, which checks the mask and RoPE positions independently of megatron's
    DotProductAttention."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from r1fast.rollout.recompute import RecomputeDecoder

    class Fp64Causal(DotProductAttention):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None, **kw):
            sq, sk = query.shape[0], key.shape[0]
            rep = query.shape[2] // key.shape[2]  # grouped-query heads
            q = query.double().permute(1, 2, 0, 3)  # [B, heads, sq, d]
            k = key.double().repeat_interleave(rep, 2).permute(1, 2, 0, 3)
            v = value.double().repeat_interleave(rep, 2).permute(1, 2, 0, 3)
            scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # [B, heads, sq, sk]
            # query i sits at absolute position sk - sq + i (the cache ends at the last query)
            future = torch.arange(sk)[None, :] > (sk - sq + torch.arange(sq))[:, None]
            out = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
            return out.permute(2, 0, 1, 3).reshape(sq, query.shape[1], -1).to(query.dtype)

    cores = [layer.self_attention.core_attention for layer in policy.gpt.decoder.layers]
    try:
        for core in cores:
            core.__class__ = Fp64Causal
        tokens = batch_tokens(101)
        prefix = [(0, 5), (5, 1), (6, 3), (9, 1)]  # contiguous: sq at the cache's end
        kv, ref = KVCacheDecoder(policy), RecomputeDecoder(policy)
        for d in (kv, ref):
            d.reset(3, MAX_LEN)
        for o, n in prefix:
            a, b = kv.step(tokens[:, o:o + n], o), ref.step(tokens[:, o:o + n], o)
            assert (a - b).abs().max().item() <= TOL, (o, n)
    finally:
        for core in cores:
            core.__class__ = DotProductAttention


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 3)), min_size=1, max_size=6),
       st.integers(1, 3))
def test_any_schedule_of_steps_and_rewinds_matches_recomputation(policy, moves, batch):
    """Property: for any sequence of steps (each rewinding 0-2 positions and feeding 1-3
    tokens), every step's logits equal those of recomputing the whole prefix."""
    from r1fast.rollout.recompute import RecomputeDecoder

    tokens = batch_tokens(103, batch=batch)
    kv, ref = KVCacheDecoder(policy), RecomputeDecoder(policy)
    for d in (kv, ref):
        d.reset(batch, MAX_LEN)
    filled = 0
    for back, n in moves:
        offset = min(max(0, filled - back), MAX_LEN - 1)
        n = min(n, MAX_LEN - offset)
        a, b = kv.step(tokens[:, offset:offset + n], offset), ref.step(
            tokens[:, offset:offset + n], offset)
        assert (a - b).abs().max().item() <= TOL, (offset, n)
        filled = offset + n


def test_generate_gives_the_same_completions(policy):
    from r1fast.rollout.recompute import RecomputeDecoder

    for eos in (3, 256):  # an id the random model emits (early stops), one it never emits
        a, b = sample(KVCacheDecoder(policy), eos), sample(RecomputeDecoder(policy), eos)
        assert a.completion_ids == b.completion_ids and a.truncated == b.truncated
        assert any(len(c) > 0 for c in a.completion_ids)
        for x, y in zip(a.logprobs, b.logprobs):
            torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=0, atol=TOL)


def test_a_decode_step_reads_the_host_only_for_the_expert_counts(policy, monkeypatch):
    """A one-token step (rollout's inner loop, per layer per token) reaches the host once per
    MoE layer: the sequential experts' split sizes, from megatron's planned copy of the counts.
    (Before r1fast's permutation, megatron's added two masked_selects per MoE layer.)"""
    from tests.helpers.host_sync import SyncRecorder

    moe_layers = sum(hasattr(l.mlp, "token_dispatcher") for l in policy.gpt.decoder.layers)
    dec = make_decoder(policy, experts="sequential")  # "auto" is the grouped kernels on a GPU
    tokens = batch_tokens(7)
    with dec.session(), torch.no_grad():
        dec.reset(tokens.shape[0], MAX_LEN)
        dec.step(tokens[:, :4], 0)
        with SyncRecorder(monkeypatch) as rec:
            dec.step(tokens[:, 4:5], 4)
    assert moe_layers and rec.calls == ["Tensor.tolist"] * moe_layers


@pytest.mark.skipif(triton_missing(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
                    is not None, reason="the grouped expert kernels need Triton")
def test_grouped_experts_decode_the_same_logits_without_host_reads(policy, monkeypatch):
    """experts='grouped': the steps' logits equal the loop's (fp32, to 1e-5), and a one-token
    step does not reach the host at all."""
    from tests.helpers.host_sync import SyncRecorder

    tokens = batch_tokens(8)
    loop = make_decoder(policy, experts="sequential")
    grouped = make_decoder(policy, experts="grouped")
    with loop.session():
        want = run_schedule(loop, tokens)
    with grouped.session():
        got = run_schedule(grouped, tokens)
        with SyncRecorder(monkeypatch) as rec:
            grouped.step(tokens[:, 9:10], 9)
    assert max_diff(got, want) < TOL and rec.calls == []


def test_experts_setting_is_checked(policy):
    with pytest.raises(ValueError, match=r"experts must be one of \('auto', 'grouped', "
                       r"'sequential'\), got 'fused'"):
        make_decoder(policy, experts="fused")
    with pytest.raises(ValueError, match="experts='grouped' is a setting of the KV-cache "
                       "decoder"):
        make_decoder(policy, recompute=True, experts="grouped")


def test_cache_is_poisoned_and_only_written_slots_are_read(policy):
    dec = KVCacheDecoder(policy)
    dec.reset(2, 8)
    caches = dec.kv_buffers()
    assert len(caches) == policy.model_cfg.num_layers
    for keys, values in caches.values():
        assert keys.shape[:2] == (8, 2) and torch.isnan(keys).all() and torch.isnan(values).all()
    out = dec.step(batch_tokens(102, batch=2)[:, :5], 0)
    assert torch.isfinite(out).all()
    for keys, values in caches.values():
        assert torch.isfinite(keys[:5]).all() and torch.isfinite(values[:5]).all()
        assert torch.isnan(keys[5:]).all() and torch.isnan(values[5:]).all()
    dec.reset(2, 8)  # same shape: the memory is reused and poisoned again
    assert all(torch.isnan(k).all() for k, _ in dec.kv_buffers().values())


def test_restores_the_callers_train_mode(policy):
    dec = KVCacheDecoder(policy)
    dec.reset(1, 4)
    policy.module.train()
    try:
        assert torch.isfinite(dec.step(torch.tensor([[1, 2]]), 0)).all()
        assert policy.module.training
    finally:
        policy.module.eval()


def test_make_decoder_is_the_kv_cache_and_recomputation_is_opt_in(policy, caplog):
    from r1fast.rollout.recompute import RecomputeDecoder

    assert isinstance(make_decoder(policy), KVCacheDecoder)
    with caplog.at_level("WARNING", logger="r1fast.rollout"):
        assert isinstance(make_decoder(policy, recompute=True), RecomputeDecoder)
    assert "PREFIX RECOMPUTATION (asked for)" in caplog.text
    policy.config.window_size = (16, 0)  # a sliding window: the cache cannot serve it
    try:
        with pytest.raises(ValueError, match=r"full causal attention.*window_size=\(16, 0\).*"
                                             r"make_decoder\(policy, recompute=True\)"):
            make_decoder(policy)
    finally:
        policy.config.window_size = None


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dsv3-mla"])
def test_a_sliced_prefill_equals_one_forward(policy, preset):
    """prefill_tokens: the prompts go through in slices of positions, each attending to the
    cache of the slices before it; the logits, every cache slot, the completions and the
    recorded routing equal one forward's (left pads ending inside a later slice too)."""
    from r1fast.policy.config import ModelConfig, ParallelConfig
    from r1fast.policy.model import build_policy
    from r1fast.rollout.engine import left_pad

    if preset != "tiny-moe":
        policy = sharpen(build_policy(ModelConfig.preset(preset), ParallelConfig(), seed=0,
                                      trainable=False))
    prompts = [[5, 17, 3], [9, 1, 44, 2, 8, 31, 6, 90, 4, 11, 3], [7, 7, 100, 12, 1, 2, 5]]
    tokens, pads = left_pad(prompts, policy.device)  # [3, 11]
    whole, sliced = KVCacheDecoder(policy), KVCacheDecoder(policy, prefill_tokens=3 * 4)
    calls = []
    real = sliced._forward
    sliced._forward = lambda t, o, d, last_only: calls.append((o, t.shape[1])) or real(
        t, o, d, last_only)
    with whole.session():
        want = whole.prefill(tokens, pads, 16)
        got = sliced.prefill(tokens, pads, 16)
    assert calls == [(0, 4), (4, 4), (8, 3)]  # 12 tokens per forward: 4 positions of 3 rows
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    for k, buf in whole.kv_buffers().items():
        for a, b in zip(*(x if isinstance(x, tuple) else (x,) for x in
                          (buf, sliced.kv_buffers()[k]))):
            torch.testing.assert_close(a[:11], b[:11], rtol=0, atol=TOL, equal_nan=True)
    cfg = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=5)
    runs = [generate(dec, prompts, cfg, eos_token_id=1, row_seeds=[1, 2, 3],
                     record_routing=True) for dec in (KVCacheDecoder(policy),
                                                      KVCacheDecoder(policy, prefill_tokens=8))]
    assert runs[0].completion_ids == runs[1].completion_ids
    assert runs[0].routing.tables.keys() == runs[1].routing.tables.keys()
    for layer, table in runs[0].routing.tables.items():
        assert torch.equal(table, runs[1].routing.tables[layer]), layer


def test_prefill_tokens_is_checked(policy):
    with pytest.raises(ValueError, match="prefill_tokens must be an int >= 0"):
        KVCacheDecoder(policy, prefill_tokens=-1)
    with pytest.raises(ValueError, match="prefill_tokens=8 is a setting of the KV-cache"):
        make_decoder(policy, recompute=True, prefill_tokens=8)
    with pytest.raises(ValueError, match="tokens: no prompt slots"):  # no empty loop
        KVCacheDecoder(policy, prefill_tokens=8).prefill(
            torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, dtype=torch.long), 8)


def test_a_foreign_core_attention_decodes_through_a_local_one(policy):
    """Whatever core attention the policy has (here a foreign one; on a GPU Transformer
    Engine's, which would ignore the decode mask), decoding runs r1fast's CachedAttention in
    its place, during decoding only: the logits equal recomputation through the foreign module,
    which is back in place afterwards."""
    from r1fast.rollout.attention import CachedAttention
    from r1fast.rollout.recompute import RecomputeDecoder

    class Foreign(torch.nn.Module):  # computes what the local one computes, but is not it
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, *args, **kw):
            self.calls += 1
            return self.inner(*args, **kw)

    attn = policy.gpt.decoder.layers[0].self_attention
    core = attn.core_attention
    attn.core_attention = foreign = Foreign(core)  # swapped by hand (see module doc)
    try:
        kv = KVCacheDecoder(policy)
        tokens = batch_tokens(104)
        a = run_schedule(kv, tokens)
        assert foreign.calls == 0 and attn.core_attention is foreign
        b = run_schedule(RecomputeDecoder(policy), tokens)
        assert foreign.calls > 0 and isinstance(kv._cores[0], CachedAttention)
        assert max_diff(a, b) <= TOL
    finally:
        attn.core_attention = core


# ----------------------------------------------------------------------------- bad input

@pytest.fixture
def dec(policy):
    d = KVCacheDecoder(policy)
    d.reset(2, 6)
    d.step(torch.zeros(2, 3, dtype=torch.long), 0)
    return d


def test_step_before_reset(policy):
    with pytest.raises(ValueError, match=r"call reset\(batch_size, max_len\) before step"):
        KVCacheDecoder(policy).step(torch.zeros(1, 1, dtype=torch.long), 0)


def test_tokens_not_2d(dec):
    with pytest.raises(ValueError, match=r"tokens must be 2-D, got shape \(2,\)"):
        dec.step(torch.zeros(2, dtype=torch.long), 3)


def test_tokens_float(dec):
    with pytest.raises(ValueError,
                       match=r"tokens must have dtype in \(int64, int32\), got float32"):
        dec.step(torch.zeros(2, 1), 3)


def test_tokens_wrong_batch(dec):
    with pytest.raises(ValueError, match=r"tokens must be \[batch_size=2, n >= 1\], got \[3, 1\]"):
        dec.step(torch.zeros(3, 1, dtype=torch.long), 3)


def test_tokens_empty(dec):
    with pytest.raises(ValueError, match=r"tokens must be \[batch_size=2, n >= 1\], got \[2, 0\]"):
        dec.step(torch.zeros(2, 0, dtype=torch.long), 3)


def test_offset_past_the_cache(dec):
    with pytest.raises(ValueError, match=r"offset must be an int in \[0, 3\].*got 4"):
        dec.step(torch.zeros(2, 1, dtype=torch.long), 4)


def test_offset_negative(dec):
    with pytest.raises(ValueError, match=r"offset must be an int in \[0, 3\].*got -1"):
        dec.step(torch.zeros(2, 1, dtype=torch.long), -1)


def test_step_beyond_max_len(dec):
    with pytest.raises(ValueError, match=r"positions 3\.\.6 exceed max_len=6"):
        dec.step(torch.zeros(2, 4, dtype=torch.long), 3)


def test_reset_bad_batch_size(policy):
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1, got 0"):
        KVCacheDecoder(policy).reset(0, 4)


def test_reset_bad_max_len(policy):
    with pytest.raises(ValueError, match=r"max_len must be an int in \[1, "
                                         r"max_position_embeddings=512\], got 513"):
        KVCacheDecoder(policy).reset(1, 513)


# ----------------------------------------------------------------------------- two ranks

def _worker(rank: int, ckpt: str, out_dir: str) -> None:
    """Each layout in turn on this rank: TP2 (sequence parallel), EP2 (x DP2; also with the
    grouped expert kernels, and a sliced prefill of other prompt lengths per DP rank), PP2."""
    from r1fast.policy.config import ParallelConfig
    from r1fast.policy.hf_checkpoint import load_hf_checkpoint, load_model_config
    from r1fast.policy.model import build_policy
    from r1fast.policy.parallel import destroy_parallel
    from r1fast.rollout.recompute import RecomputeDecoder
    from r1fast.train.batch import all_ranks_int

    cfg = load_model_config(ckpt)
    out = {}
    for name, layout in (("tp2", ParallelConfig(tp=2)), ("ep2", ParallelConfig(ep=2)),
                         ("pp2", ParallelConfig(pp=2))):
        policy = build_policy(cfg, layout, seed=0, trainable=False)
        load_hf_checkpoint(policy, ckpt)
        tokens = batch_tokens(100 + policy.info.dp_rank)  # each DP rank its own batch
        kv = run_schedule(KVCacheDecoder(policy), tokens)
        ref = run_schedule(RecomputeDecoder(policy), tokens)
        a, b = sample(KVCacheDecoder(policy), 256), sample(RecomputeDecoder(policy), 256)
        grouped = grouped_training = ragged = None
        if name == "ep2":  # DP ranks whose prompts need 1 and 4 prefill slices (this hung)
            faulthandler.dump_traceback_later(300, exit=True)  # a hang fails, with stacks
            ragged = [sample_ragged(KVCacheDecoder(policy, prefill_tokens=n), policy.info.dp_rank,
                                    sync=all_ranks_int) for n in (0, 64)]
            faulthandler.cancel_dump_traceback_later()
        if name == "ep2" and triton_missing(torch.device("cpu")) is None:
            dec = KVCacheDecoder(policy, experts="grouped")  # device counts across EP ranks
            with dec.session():
                grouped = run_schedule(dec, tokens)
            grouped_training = _grouped_training_diff(policy)
        out[name] = {"kv": kv, "ref": ref, "grouped": grouped, "dp_rank": policy.info.dp_rank,
                     "grouped_training": grouped_training, "ragged": ragged,
                     "sp": policy.sequence_parallel, "kv_completions": a.completion_ids,
                     "ref_completions": b.completion_ids,
                     "decoder": type(make_decoder(policy)).__name__}
        destroy_parallel(destroy_process_group=False)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    destroy_parallel()


def _grouped_training_diff(policy) -> float:
    """Largest relative difference (max |a - b| / max |b| per tensor) between a MoE layer's
    forward and backward (output, input and parameter gradients) through the grouped kernels
    and through the loop, on this rank."""
    from r1fast.policy.local_experts import use_grouped_experts
    from tests.helpers.moe_layer import first_moe_layer, layer_forward_backward

    layer = first_moe_layer(policy)
    runs = []
    for mode in ("grouped", "sequential"):
        impl = use_grouped_experts(policy.gpt, mode)
        assert layer.experts.grouped_impl == impl == ("triton" if mode == "grouped" else None)
        out, dx, grads = layer_forward_backward(layer)
        runs.append([out, dx, *(grads[k] for k in sorted(grads))])
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
               for a, b in zip(*runs))


@pytest.mark.multiproc
def test_tp2_ep2_pp2_match_recomputation_and_one_rank(policy, tmp_path):
    from r1fast.policy.hf_checkpoint import save_hf_checkpoint
    from r1fast.rollout.recompute import RecomputeDecoder

    ckpt = str(tmp_path / "ckpt")
    save_hf_checkpoint(policy, ckpt)
    run_ranks(2, _worker, ckpt, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    one_rank = {dp: run_schedule(RecomputeDecoder(policy), batch_tokens(100 + dp)) for dp in (0, 1)}
    completions = sample(RecomputeDecoder(policy), 256).completion_ids
    for r, res in enumerate(ranks):
        assert res["tp2"]["sp"] and not res["ep2"]["sp"]
        for name in ("tp2", "ep2", "pp2"):  # pp2: a cache per stage, sends between stages
            got = res[name]
            assert got["decoder"] == "KVCacheDecoder"
            assert max_diff(got["kv"], got["ref"]) <= TOL, (r, name)
            assert max_diff(got["kv"], one_rank[got["dp_rank"]]) <= TOL, (r, name)
            assert got["kv_completions"] == got["ref_completions"] == completions, (r, name)
        dp = res["ep2"]["dp_rank"]  # a sliced prefill, other prompt lengths on each DP rank
        assert res["ep2"]["ragged"] == [sample_ragged(KVCacheDecoder(policy), dp)] * 2, r
        if triton_missing(torch.device("cpu")) is None:  # the grouped experts at EP2
            assert max_diff(res["ep2"]["grouped"], res["ep2"]["kv"]) <= TOL, r
            assert res["ep2"]["grouped_training"] <= 1e-5, r  # forward + backward, fp32
