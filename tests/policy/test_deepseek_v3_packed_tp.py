"""Packed rows through MLA at TP2 (sequence parallel, duplicated down projections, megatron's
``thd`` packed-sequence RoPE on the gathered sequence): log-probs and every gradient equal the
one-rank model's on each sequence alone (1e-5, fp32). The packed row is one token longer than a
multiple of tp, so the policy's sequence-parallel pad (a tail with no real token) is in play."""
from __future__ import annotations

import os

import pytest
import torch

from r1fast.policy.config import ModelConfig, ParallelConfig
from tests.helpers.hf_parity import summed_logprob_loss
from tests.helpers.spawn import run_ranks

pytestmark = [
    pytest.mark.multiproc,
    pytest.mark.slow,  # ~50 s on 2 busy cores (2 gloo processes); `make test-slow` runs it
    pytest.mark.skipif(torch.cuda.is_available(), reason="gloo CPU layouts; GPU runs use NCCL"),
]

LENGTHS = (5, 9, 5)  # packed: 19 tokens, padded to 20 at tp=2
MODEL = ModelConfig(
    vocab_size=128, hidden_size=48, num_layers=2, num_attention_heads=4, ffn_hidden_size=96,
    attention="mla", q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
    v_head_dim=12, rope_type="yarn", rope_factor=4.0, rope_original_max_position=64,
    rope_mscale_all_dim=1.0, max_position_embeddings=256, num_experts=4,
    moe_ffn_hidden_size=16, moe_router_topk=2, dense_layers=(0,), shared_expert_size=16,
    router_score="sigmoid", router_expert_bias=True, router_bias_update_rate=0.0,
    router_scaling_factor=2.5)


def _rows():
    g = torch.Generator().manual_seed(11)
    rows = []
    for n in LENGTHS:
        t = torch.randint(0, MODEL.vocab_size, (1, n), generator=g)
        y = torch.roll(t, -1, dims=1)
        y[:, -1] = -100
        rows.append((t, y))
    cu = torch.tensor([[0, *torch.tensor(LENGTHS).cumsum(0).tolist()]])
    return rows, torch.cat([t for t, _ in rows], 1), torch.cat([y for _, y in rows], 1), cu


def _packed_run(policy):
    """(packed log-probs [1, T], every gradient of one packed micro-batch, by HF name)."""
    from r1fast.policy.hf_checkpoint import gather_hf_state_dict
    from r1fast.policy.optim import unshard_main_grads

    _, tokens, targets, cu = _rows()
    lp = policy.logprobs(tokens, targets, cu_seqlens=cu)
    n = float((targets != -100).sum())
    policy.forward_backward([{"tokens": tokens, "targets": targets, "cu_seqlens": cu}],
                            summed_logprob_loss(policy, n))
    unshard_main_grads(policy)  # the distributed optimizer left each rank its expert-DP shard
    grads = gather_hf_state_dict(policy, grads=True)  # on rank 0; None elsewhere
    return lp, None if grads is None else {k: v.clone() for k, v in grads.items()}


def _tp2_worker(rank: int, ckpt: str, out: str) -> None:
    from r1fast.policy.hf_checkpoint import load_hf_checkpoint
    from r1fast.policy.model import build_policy
    from r1fast.policy.parallel import destroy_parallel

    policy = build_policy(MODEL, ParallelConfig(tp=2))
    assert policy.sequence_parallel
    load_hf_checkpoint(policy, ckpt)
    lp, grads = _packed_run(policy)
    if rank == 0:
        torch.save({"logprobs": lp, "grads": grads}, out)
    destroy_parallel()


def test_packed_mla_at_tp2_equals_one_rank_alone(tmp_path):
    from r1fast.policy.hf_checkpoint import gather_hf_state_dict, save_hf_checkpoint
    from r1fast.policy.model import build_policy
    from r1fast.policy.parallel import destroy_parallel

    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "tp2.pt")
    policy = build_policy(MODEL, ParallelConfig(), seed=4)
    save_hf_checkpoint(policy, ckpt)
    rows, _, targets, cu = _rows()
    n = float((targets != -100).sum())
    alone_lp = torch.cat([policy.logprobs(t, y) for t, y in rows], 1)
    policy.forward_backward([{"tokens": t, "targets": y} for t, y in rows],
                            summed_logprob_loss(policy, n))
    alone = gather_hf_state_dict(policy, grads=True)
    destroy_parallel()
    run_ranks(2, _tp2_worker, ckpt, out)
    got = torch.load(out)
    assert os.path.getsize(out) > 0
    assert (got["logprobs"] - alone_lp).abs().max().item() < 1e-5
    assert set(got["grads"]) == set(alone)
    for k in alone:
        assert (got["grads"][k] - alone[k]).abs().max().item() < 1e-5, k
    assert max(v.abs().max().item() for v in alone.values()) > 1e-3
