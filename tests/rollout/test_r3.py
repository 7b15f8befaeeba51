"""True rollout routing replay (R3): the experts the decoder chose for every token while sampling
are the experts the training forward runs, token by token, in the padded and the packed update
layouts, at one rank, at TP2 (sequence parallel: each rank routes a slice of each step) and at
EP2 (x DP2). Training sees router weights moved after sampling (as after an optimizer step),
so without replay its routing differs on a good share of tokens (the control), and with replay
it must equal the decoder's exactly. The training side's choices are read from the routers'
own outputs (``routing_map`` of every R1fastRouter forward), not from the replay machinery.

Also: the recorded tables equal a post-hoc forward over the same sequences when the weights do
not move (the two captures agree), MLA's latent-cache decoding records too, and the tables
are compact (uint8)."""
from __future__ import annotations

import os

import pytest
import torch

from r1fast.rollout.sampler import SamplingConfig, generate
from tests.helpers.spawn import run_ranks

CFG = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=8,
                     stop_token_ids=tuple(range(0, 256, 11)))


def _prompts(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, 20, (n,), generator=g).tolist()
    return [torch.randint(0, 256, (k,), generator=g).tolist() for k in lens], \
        [1000 * seed + i for i in range(n)]


def _move_routers(policy, scale: float = 0.6) -> None:
    """Shift every router's gate weights (the same shift on every rank)."""
    with torch.no_grad():
        for r in policy._routers():
            g = torch.Generator().manual_seed(77 + r.layer_index)
            r.weight.add_(scale * torch.randn(r.weight.shape, generator=g).to(r.weight))


def _training_choices(policy, batches) -> list[dict[int, torch.Tensor]]:
    """The experts each router ran in ``policy.forward_backward(batches)``: per micro-batch,
    ``{layer: [b, L, k]}`` (sorted within k), from the routers' ``routing_map`` outputs."""
    k = policy.model_cfg.moe_router_topk
    seen: dict[int, list[torch.Tensor]] = {}

    def hook(router):
        def fn(module, args, output):
            routing_map = output[1]  # [T, E] bool, k experts per token
            seen.setdefault(router.layer_index, []).append(
                routing_map.nonzero()[:, 1].view(-1, k).detach())
        return fn

    handles = [r.register_forward_hook(hook(r)) for r in policy._routers()]
    try:
        policy.forward_backward(batches, lambda h, w, mb: ((h.float() ** 2).mean() * 1e-3, {}))
    finally:
        for h in handles:
            h.remove()
    out = []
    for i, mb in enumerate(batches):
        b, length = mb["tokens"].shape
        out.append({layer: policy.token_layout.from_router_order(calls[i], b, length)
                    for layer, calls in seen.items()})
    return out


def r3_mismatches(policy, seed: int) -> dict[str, int]:
    """Sample with routing capture, move the routers, train (padded and packed, with and
    without replay) and count tokens whose training experts differ from the decoder's."""
    from r1fast.rollout.kv_cache import make_decoder
    from r1fast.train.batch import build_update_batch
    from r1fast.train.packing import pack_routing
    from r1fast.train.packing import packed_micro_batches

    prompts, seeds = _prompts(seed)
    ro = generate(make_decoder(policy), prompts, CFG, eos_token_id=1, row_seeds=seeds,
                  record_routing=True, check_every=2)
    assert all(t.dtype == torch.uint8 for t in ro.routing.tables.values())
    n = len(prompts)
    batch = build_update_batch(ro.prompt_ids, ro.completion_ids, ro.logprobs, torch.zeros(n),
                               torch.ones(n, dtype=torch.bool), pad_id=0)
    L = batch.tokens.shape[1]
    decoder_experts = {k: v.sort(-1).values for k, v in ro.routing.padded(L).items()}
    valid = torch.arange(L)[None, :] < torch.tensor(ro.routing.lengths)[:, None]  # [N, L]
    _move_routers(policy)
    counts = {"tokens": int(valid.sum()) * len(decoder_experts)}
    mult = policy.info.tp if policy.sequence_parallel else 1
    packs = packed_micro_batches(batch.lengths.tolist(), 64, mult)
    for replay in (True, False):
        routing = ro.routing.padded(L) if replay else None
        padded = [{"tokens": batch.tokens, **({"routing": routing} if replay else {})}]
        packed = [{"tokens": p.pack(batch.tokens), "cu_seqlens": p.cu_seqlens(),
                   **({"routing": {k: pack_routing(p, v) for k, v in routing.items()}}
                      if replay else {})} for p in packs]
        for name, batches in (("padded", padded), ("packed", packed)):
            seen = _training_choices(policy, batches)
            if name == "packed":  # back to the [N, L, k] rows
                merged = {}
                for p, part in zip(packs, seen):
                    for layer, idx in part.items():
                        merged.setdefault(layer, torch.zeros(n, L, idx.shape[-1],
                                                             dtype=torch.long))
                        p.unpack(idx, merged[layer])
                seen = [merged]
            bad = sum(int(((seen[0][layer].sort(-1).values != want).any(-1) & valid).sum())
                      for layer, want in decoder_experts.items())
            counts[f"{name}_{'replay' if replay else 'free'}"] = bad
    _move_routers(policy, -0.6)
    return counts


def _check(counts: dict[str, int]) -> None:
    assert counts["padded_replay"] == 0 and counts["packed_replay"] == 0, counts
    # the control: the moved routers choose differently on a good share of the tokens
    assert counts["padded_free"] >= 0.05 * counts["tokens"], counts
    assert counts["packed_free"] >= 0.05 * counts["tokens"], counts


# ----------------------------------------------------------------------------- one rank

@pytest.fixture(scope="module")
def policy():
    from r1fast.policy.config import ModelConfig, ParallelConfig
    from r1fast.policy.model import build_policy
    from r1fast.policy.parallel import destroy_parallel
    from tests.rollout.test_kv_cache import sharpen

    yield sharpen(build_policy(ModelConfig.preset("tiny-moe"), ParallelConfig(), seed=0))
    destroy_parallel()


def test_training_runs_the_decoders_experts(policy):
    _check(r3_mismatches(policy, seed=1))


def test_recorded_routing_equals_a_post_hoc_forward_when_weights_stay(policy, monkeypatch):
    """Same weights: the decoder's recorded experts equal those of a separate forward over the
    finished sequences (Policy.record_routing), in order, for every real token; padding
    positions hold experts 0..k-1. Recording does not walk the model's modules per forward
    (that cost ~3 ms per decode forward at 48 layers of 16 experts)."""
    from r1fast.rollout.kv_cache import make_decoder

    prompts, seeds = _prompts(2)
    policy._routers()  # the one walk, at first use
    walks = []
    monkeypatch.setattr(policy.gpt, "modules", lambda: walks.append(1) or iter(()))
    ro = generate(make_decoder(policy), prompts, CFG, eos_token_id=1, row_seeds=seeds,
                  record_routing=True)
    monkeypatch.undo()
    assert len(walks) <= 1, len(walks)  # the session's choice of expert kernels, not per step
    L = max(len(p) + len(c) for p, c in zip(ro.prompt_ids, ro.completion_ids)) - 1 + 3
    tokens = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, (p, c) in enumerate(zip(ro.prompt_ids, ro.completion_ids)):
        tokens[i, :len(p) + len(c) - 1] = torch.tensor((p + c)[:-1])
    post, rec = policy.record_routing(tokens), ro.routing.padded(L)
    assert sorted(post) == sorted(rec) == policy.moe_layers()
    for i, n in enumerate(ro.routing.lengths):
        assert n == len(ro.prompt_ids[i]) + len(ro.completion_ids[i]) - 1
        for layer in post:
            assert torch.equal(rec[layer][i, :n], post[layer][i, :n]), (i, layer)
            assert torch.equal(rec[layer][i, n:], torch.arange(2).expand(L - n, 2))


def test_mla_latent_cache_records_routing_too():
    """Under MLA the KV cache decodes through the latent attention (r1fast.rollout.mla_latent),
    ragged prompts included; it records the same experts as a post-hoc forward."""
    from r1fast.policy.config import ModelConfig, ParallelConfig
    from r1fast.policy.model import build_policy
    from r1fast.policy.parallel import destroy_parallel
    from r1fast.rollout.kv_cache import KVCacheDecoder
    from tests.rollout.test_kv_cache import sharpen

    try:
        mla = sharpen(build_policy(ModelConfig.preset("tiny-dsv3-mla"), ParallelConfig(), seed=0,
                                   trainable=False))
        dec = KVCacheDecoder(mla)
        assert dec.ragged
        prompts, seeds = _prompts(3, n=4)
        ro = generate(dec, prompts, CFG, eos_token_id=1, row_seeds=seeds, record_routing=True)
        L = max(ro.routing.lengths)
        tokens = torch.zeros(len(prompts), L, dtype=torch.long)
        for i, (p, c) in enumerate(zip(ro.prompt_ids, ro.completion_ids)):
            tokens[i, :len(p) + len(c) - 1] = torch.tensor((p + c)[:-1])
        post, rec = mla.record_routing(tokens), ro.routing.padded(L)
        assert sorted(rec) == sorted(post) and len(rec) == mla.model_cfg.num_layers - 1
        for i, n in enumerate(ro.routing.lengths):
            for layer in post:
                assert torch.equal(rec[layer][i, :n], post[layer][i, :n]), (i, layer)
    finally:
        destroy_parallel()


# ----------------------------------------------------------------------------- two ranks

def _worker(rank: int, out_dir: str) -> None:
    from r1fast.policy.config import ModelConfig, ParallelConfig
    from r1fast.policy.model import build_policy
    from r1fast.policy.parallel import destroy_parallel
    from tests.rollout.test_kv_cache import sharpen

    out = {}
    for name, layout in (("tp2", ParallelConfig(tp=2)), ("ep2", ParallelConfig(ep=2))):
        policy = sharpen(build_policy(ModelConfig.preset("tiny-moe"), layout, seed=0))
        out[name] = {"sp": policy.sequence_parallel,
                     **r3_mismatches(policy, seed=10 + policy.info.dp_rank)}
        destroy_parallel(destroy_process_group=False)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    destroy_parallel()


@pytest.mark.multiproc
def test_training_runs_the_decoders_experts_at_tp2_and_ep2(tmp_path):
    run_ranks(2, _worker, str(tmp_path))
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert res["tp2"]["sp"] and not res["ep2"]["sp"]
        for name in ("tp2", "ep2"):
            _check(res[name])
