"""The Policy API on one process: shapes, log-probs/entropy against an independent fp64 formula
from the hidden states, forward_backward gradients against plain autograd (and invariance to
the microbatch split), KV-cache decoding against prefix recomputation, routing record/replay,
and one test per bad input."""
from __future__ import annotations

import pytest
import torch

from r1fast.ops.linear_logprob import linear_logprob
from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.model import build_policy
from r1fast.policy.parallel import destroy_parallel


@pytest.fixture(scope="module", autouse=True)
def _single_rank():
    yield
    destroy_parallel()


def sharpen(policy, seed=5):
    """O(1) weights so that routing and log-probs are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.gpt.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if "layernorm" in name
                    else 0.15 * torch.randn(p.shape, generator=g))
    return policy


@pytest.fixture(scope="module")
def moe():
    return sharpen(build_policy(ModelConfig.preset("tiny-moe").replace(aux_loss_coef=0.0),
                                ParallelConfig(), seed=0))


@pytest.fixture(scope="module")
def frozen():
    return sharpen(build_policy(ModelConfig.preset("tiny-dsv3"), ParallelConfig(), seed=1,
                                trainable=False))


def data(b=2, length=7, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, length), generator=g)
    targets = torch.roll(tokens, -1, 1)
    targets[:, -1] = -100
    return tokens, targets


def naive_logprobs(hidden, weight, targets, temperature=1.0):
    """fp64 log-softmax and entropy from hidden states and the output weight."""
    z = hidden.double() @ weight.double().t() / temperature  # [B, L, V]
    logp = torch.log_softmax(z, -1)
    lp = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    ent = -(logp.exp() * logp).sum(-1)
    ignored = targets == -100
    return torch.where(ignored, 0.0, lp), torch.where(ignored, 0.0, ent)


@pytest.mark.parametrize("length", [1, 7, 63])
def test_logprobs_and_entropy_match_fp64_formula(moe, length):
    tokens, targets = data(b=2, length=length)
    with torch.no_grad():
        hidden = moe.hidden_states(tokens)
    assert hidden.shape == (2, length, 64)
    for tau in (1.0, 0.7):
        lp, ent = moe.logprobs(tokens, targets, temperature=tau, return_entropy=True)
        ref_lp, ref_ent = naive_logprobs(hidden, moe.output_weight, targets, tau)
        assert lp.shape == ent.shape == (2, length) and lp.dtype == torch.float32
        assert (lp.double() - ref_lp).abs().max().item() < 1e-5
        assert (ent.double() - ref_ent).abs().max().item() < 1e-5


def test_logits_agree_with_logprobs_and_vocab_logits(moe):
    tokens, targets = data(b=3, length=5, seed=1)
    logits = moe.logits(tokens)
    assert logits.shape == (3, 5, 256)
    ref = torch.log_softmax(logits.double(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    lp = moe.logprobs(tokens, targets, micro_batch_size=1)
    assert (lp.double() - torch.where(targets == -100, 0.0, ref)).abs().max().item() < 1e-5
    # the public head the rollout decoders use: hidden states -> the same logits
    with torch.no_grad():
        head = moe.vocab_logits(moe.hidden_states(tokens))
    assert head.shape == (3, 5, 256) and head.dtype == torch.float32
    assert (head - logits).abs().max().item() < 1e-5


def test_num_parameters(moe):
    assert moe.num_parameters() == sum(p.numel() for p in moe.gpt.parameters())
    assert moe.output_weight.shape == (256, 64)
    assert moe.moe_layers() == [0, 1]


def _loss(policy, n):
    def loss_fn(hidden, weight, mb):
        lp = linear_logprob(hidden.reshape(-1, hidden.shape[-1]), weight,
                            mb["targets"].reshape(-1), tp_group=policy.tp_group)
        return -lp.sum() / n, {"tokens": (mb["targets"] != -100).sum()}
    return loss_fn


def _main_grads(policy):
    return {n: p.main_grad.detach().clone() for n, p in policy.gpt.named_parameters()}


def test_forward_backward_equals_autograd_and_is_split_invariant(moe):
    tokens, targets = data(b=4, length=6, seed=2)
    n = float((targets != -100).sum())
    whole = moe.forward_backward([{"tokens": tokens, "targets": targets}], _loss(moe, n))
    g_whole = _main_grads(moe)
    assert len(whole) == 1 and int(whole[0]["tokens"]) == int(n)
    micro = [{"tokens": tokens[i:i + 1], "targets": targets[i:i + 1]} for i in range(4)]
    metrics = moe.forward_backward(micro, _loss(moe, n))
    assert len(metrics) == 4
    g_micro = _main_grads(moe)
    # plain autograd through hidden_states (pp=1) and the fp64 formula
    moe.module.zero_grad_buffer()
    hidden = moe.hidden_states(tokens)
    lp, _ = naive_logprobs(hidden, moe.output_weight, targets)
    (-lp.sum() / n).float().backward()
    g_ref = _main_grads(moe)
    for name in g_ref:
        if ".experts." not in name:  # an expert may receive no token
            assert g_ref[name].abs().sum() > 0, name
        assert torch.allclose(g_whole[name], g_ref[name], atol=1e-6, rtol=1e-4), name
        assert torch.allclose(g_micro[name], g_ref[name], atol=1e-6, rtol=1e-4), name


def test_routing_record_and_replay(frozen):
    tokens, targets = data(b=3, length=5, seed=4)
    routing = frozen.record_routing(tokens, micro_batch_size=1)
    assert set(routing) == {0, 1}
    assert routing[0].shape == (3, 5, 2) and routing[0].dtype == torch.int64
    base = frozen.logprobs(tokens, targets)
    replayed = frozen.logprobs(tokens, targets, routing=routing)
    assert torch.equal(base, replayed)
    other = {layer: (idx + 1) % 8 for layer, idx in routing.items()}  # different experts
    moved = frozen.logprobs(tokens, targets, routing=other)
    assert (moved - base).abs().max().item() > 1e-3
    assert torch.equal(frozen.record_routing(tokens)[1], routing[1])  # one call, same experts


def test_replay_in_forward_backward_uses_the_given_experts(moe):
    tokens, targets = data(b=2, length=5, seed=6)
    n = float((targets != -100).sum())
    routing = moe.record_routing(tokens)
    moe.forward_backward([{"tokens": tokens, "targets": targets}], _loss(moe, n))
    plain = _main_grads(moe)
    moe.forward_backward([{"tokens": tokens, "targets": targets, "routing": routing}],
                         _loss(moe, n))
    assert all(torch.equal(plain[k], v) for k, v in _main_grads(moe).items())
    other = {layer: (idx + 3) % 8 for layer, idx in routing.items()}
    moe.forward_backward([{"tokens": tokens, "targets": targets, "routing": other}],
                         _loss(moe, n))
    assert any(not torch.allclose(plain[k], v) for k, v in _main_grads(moe).items())


def test_microbatches_of_different_shapes_without_pipeline(moe):
    """pp=1 runs microbatches one by one, so their shapes may differ (pp>1 requires equal)."""
    tokens, targets = data(b=3, length=6, seed=7)
    n = float((targets != -100).sum())
    moe.forward_backward([{"tokens": tokens, "targets": targets}], _loss(moe, n))
    whole = _main_grads(moe)
    rest = torch.cat([torch.full((1, 4), -100), targets[2:, 4:]], dim=1)
    micro = [{"tokens": tokens[:2], "targets": targets[:2]},
             {"tokens": tokens[2:, :4], "targets": targets[2:, :4]},  # row 2, positions 0..3
             {"tokens": tokens[2:], "targets": rest}]  # row 2, the remaining positions
    metrics = moe.forward_backward(micro, _loss(moe, n))
    assert len(metrics) == 3
    for k, v in _main_grads(moe).items():
        assert torch.allclose(v, whole[k], atol=1e-6, rtol=1e-4), k


@pytest.fixture(scope="module")
def balanced():
    """A MoE policy with both router losses on: pads would move their gradients."""
    cfg = ModelConfig.preset("tiny-moe").replace(aux_loss_coef=1e-2, z_loss_coef=1e-3)
    return sharpen(build_policy(cfg, ParallelConfig(), seed=3))


def test_pads_past_lengths_stay_out_of_router_losses_and_load(balanced):
    """Rows of 5 and 3 real tokens padded to 9 with ``lengths`` give the gradients and expert
    load of the same rows without pads (each row its own micro-batch, so the per-micro-batch
    aux loss sees the same tokens); a micro-batch of pads only moves nothing."""
    from r1fast.policy.router import expert_load

    tokens, targets = data(b=2, length=9, seed=11)
    real = torch.tensor([5, 3])
    targets[0, 5:] = targets[1, 3:] = -100
    n = float((targets != -100).sum())
    expert_load(balanced)  # start the counts from 0
    padded = [{"tokens": tokens[i:i + 1], "targets": targets[i:i + 1], "lengths": real[i:i + 1]}
              for i in range(2)]
    balanced.forward_backward(padded, _loss(balanced, n))
    g_padded, load_padded = _main_grads(balanced), expert_load(balanced)
    bare = [{"tokens": tokens[i:i + 1, :m], "targets": targets[i:i + 1, :m]}
            for i, m in enumerate(real.tolist())]
    balanced.forward_backward(bare, _loss(balanced, n))
    g_bare, load_bare = _main_grads(balanced), expert_load(balanced)
    for layer, counts in load_bare.items():
        assert counts.sum().item() == 8 * 2  # 8 real tokens, top-2
        assert torch.equal(load_padded[layer], counts), layer
    for name, g in g_bare.items():
        assert torch.allclose(g_padded[name], g, atol=1e-6, rtol=1e-4), name
    # without lengths the pads count: the load and the router gradients change
    balanced.forward_backward([{k: v for k, v in mb.items() if k != "lengths"} for mb in padded],
                              _loss(balanced, n))
    assert expert_load(balanced)[0].sum().item() == 18 * 2
    router = [k for k in g_bare if k.endswith("router.weight")]
    moved = max((balanced.gpt.get_parameter(k).main_grad - g_bare[k]).abs().max().item()
                for k in router)
    assert moved > 1e-4
    # pads only: no gradient anywhere, no load
    balanced.forward_backward([{"tokens": tokens[:1], "targets": torch.full_like(targets[:1], -100),
                                "lengths": torch.zeros(1, dtype=torch.long)}], _loss(balanced, n))
    assert all(g.abs().max().item() == 0.0 for g in _main_grads(balanced).values())
    assert all(c.sum().item() == 0 for c in expert_load(balanced).values())


def test_dp_shard_single_rank(moe):
    x = torch.arange(6).view(3, 2)
    assert torch.equal(moe.dp_shard(x), x)


# ------------------------------------------------------------------------- bad input messages

@pytest.mark.parametrize("call,msg", [
    (lambda p: p.logprobs(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long)),
     r"tokens must have dtype in \(int64, int32\), got float32"),
    (lambda p: p.logprobs(torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long)),
     r"tokens must be 2-D, got shape \(6,\)"),
    (lambda p: p.logprobs(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)),
     r"targets must have shape \[2, 3\], got \[2, 4\]"),
    (lambda p: p.logprobs(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long),
                          temperature=0.0),
     r"temperature must be in \(0.0, inf\], got 0.0"),
    (lambda p: p.logits(torch.zeros(1, 513, dtype=torch.long)),
     r"sequence length 513 exceeds max_position_embeddings=512"),
    (lambda p: p.logprobs(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long),
                          micro_batch_size=2),
     r"micro_batch_size \(2\) must divide the batch size 3"),
    (lambda p: p.hidden_states(torch.zeros(2, 3, dtype=torch.long),
                               position_ids=torch.zeros(2, 4, dtype=torch.long)),
     r"position_ids must have shape \[2, 3\], got \[2, 4\]"),
    (lambda p: p.logprobs(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long),
                          routing={0: torch.zeros(2, 3, 3, dtype=torch.long)}),
     r"routing\[0\] must have shape \[2, 3, 2\], got \[2, 3, 3\]"),
    (lambda p: p.forward_backward([], None), r"batches must hold at least one microbatch"),
    (lambda p: p.forward_backward([{"tokens": torch.zeros(2, 3, dtype=torch.long),
                                    "lengths": torch.tensor([3])}], None),
     r"batches\[0\]\['lengths'\] must have shape \[2\], got \[1\]"),
    (lambda p: p.forward_backward([{"targets": torch.zeros(1, 2)}], None),
     r"batches\[0\] must have a 'tokens' entry"),
    (lambda p: p.forward_backward([{"tokens": torch.zeros(1, 2, dtype=torch.long)}],
                                  lambda h, w, mb: (h.sum(-1), {})),
     r"loss_fn must return \(scalar tensor loss, metrics dict\)"),
])
def test_bad_input_messages(moe, call, msg):
    with pytest.raises(ValueError, match=msg):
        call(moe)


def test_forward_backward_needs_a_trainable_policy(frozen):
    with pytest.raises(RuntimeError, match=r"needs a trainable policy"):
        frozen.forward_backward([{"tokens": torch.zeros(1, 2, dtype=torch.long)}], None)


def test_a_fractional_rope_base_is_exact_and_on_the_models_device():
    """megatron types rotary_base as int: a base like 12345.5 is rebuilt exactly, on the
    device megatron put its table (a plain attribute, which moving the model would not)."""
    cfg = ModelConfig.preset("tiny-moe").replace(rope_theta=12345.5)
    policy = build_policy(cfg, ParallelConfig(), seed=0, trainable=False)
    inv = policy.gpt.rotary_pos_emb.inv_freq
    dim = policy.config.kv_channels
    want = 1.0 / (12345.5 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    torch.testing.assert_close(inv.double().cpu(), want, rtol=1e-6, atol=0)
    assert inv.device == next(policy.gpt.parameters()).device
