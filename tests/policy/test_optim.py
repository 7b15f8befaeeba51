"""Optimizer plumbing: the learning-rate schedule (warmup, cosine/linear/constant decay), an
exact checkpoint round trip of megatron's distributed optimizer (a restored step equals the
uninterrupted one), gradient clipping, and the validation messages."""
from __future__ import annotations

import math

import pytest
import torch

from r1fast.ops.linear_logprob import linear_logprob
from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.model import build_policy
from r1fast.policy.optim import (OptimConfig, build_optimizer, current_lr,
                                 load_optim_state_dict, optim_state_dict, unshard_main_grads)
from r1fast.policy.parallel import destroy_parallel


@pytest.fixture(scope="module", autouse=True)
def _single_rank():
    yield
    destroy_parallel()


@pytest.fixture(scope="module")
def policy():
    return build_policy(ModelConfig.preset("tiny-moe"), ParallelConfig(), seed=0)


def train_step(policy, opt, sched, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (2, 6), generator=g)
    targets = torch.roll(tokens, -1, 1)

    def loss_fn(hidden, weight, mb):
        lp = linear_logprob(hidden.reshape(-1, hidden.shape[-1]), weight,
                            mb["targets"].reshape(-1), tp_group=policy.tp_group)
        return -lp.mean(), {}

    policy.forward_backward([{"tokens": tokens, "targets": targets}], loss_fn)
    out = opt.step()
    sched.step(1)
    return out


def weights(policy):
    return {n: p.detach().clone() for n, p in policy.gpt.named_parameters()}


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
def test_lr_schedule(policy, style):
    cfg = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=4, total_steps=20, lr_decay_style=style)
    opt, sched = build_optimizer(policy, cfg)
    seen = []
    for _ in range(25):
        seen.append(current_lr(opt))
        sched.step(1)
    for i, lr in enumerate(seen):
        if i <= 4:
            want = 1e-2 * i / 4  # linear warmup from 0: optimizer step i uses lr(i)
        elif style == "constant":
            want = 1e-2
        elif i > 20:
            want = 1e-3
        else:
            frac = (i - 4) / 16
            coeff = 0.5 * (math.cos(math.pi * frac) + 1.0) if style == "cosine" else 1.0 - frac
            want = 1e-3 + coeff * (1e-2 - 1e-3)
        assert lr == pytest.approx(want, rel=1e-9, abs=1e-12), (i, lr, want)


def test_checkpoint_round_trip_is_exact(policy):
    opt, sched = build_optimizer(policy, OptimConfig(lr=1e-2, warmup_steps=1, total_steps=10,
                                                     lr_decay_style="cosine"))
    train_step(policy, opt, sched, seed=0)
    train_step(policy, opt, sched, seed=1)  # Adam moments and step count are non-trivial now
    state, w1 = optim_state_dict(opt, sched), weights(policy)
    ok, norm, _ = train_step(policy, opt, sched, seed=2)
    assert ok and norm > 0
    w2 = weights(policy)
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)
    with torch.no_grad():  # back to the checkpoint, with the same optimizer object ...
        for n, p in policy.gpt.named_parameters():
            p.copy_(w1[n])
    load_optim_state_dict(opt, sched, state)
    assert sched.num_steps == 2
    train_step(policy, opt, sched, seed=2)
    assert all(torch.equal(p, w2[n]) for n, p in policy.gpt.named_parameters())
    # ... and into a freshly built optimizer
    with torch.no_grad():
        for n, p in policy.gpt.named_parameters():
            p.copy_(w1[n])
    opt2, sched2 = build_optimizer(policy, OptimConfig(lr=1e-2, warmup_steps=1, total_steps=10,
                                                       lr_decay_style="cosine"))
    load_optim_state_dict(opt2, sched2, state)
    train_step(policy, opt2, sched2, seed=2)
    assert all(torch.equal(p, w2[n]) for n, p in policy.gpt.named_parameters())


def test_gradient_clipping(policy):
    opt, sched = build_optimizer(policy, OptimConfig(lr=1.0, clip_grad=1e-3))
    before = weights(policy)
    ok, norm, _ = train_step(policy, opt, sched)
    assert ok and norm > 1e-3
    unshard_main_grads(policy)  # a no-op at dp=1
    # Adam's first step is ~lr*sign(g) whatever the scale; clipping shows in the grad buffers
    total = math.sqrt(sum(float(p.main_grad.double().square().sum())
                          for p in policy.gpt.parameters()))
    assert total == pytest.approx(1e-3, rel=1e-3)
    assert any(not torch.equal(before[n], p) for n, p in policy.gpt.named_parameters())


@pytest.mark.parametrize("changes,msg", [
    (dict(optimizer="lion"), r"optimizer must be one of \('adam', 'sgd'\), got 'lion'"),
    (dict(lr_decay_style="step"), r"lr_decay_style must be one of"),
    (dict(lr=0.0), r"lr must be > 0, got 0.0"),
    (dict(min_lr=1.0), r"min_lr must be in \[0, lr=1e-06\], got 1.0"),
    (dict(clip_grad=-1.0), r"clip_grad and weight_decay must be >= 0"),
    (dict(warmup_steps=10, total_steps=10), r"warmup_steps must be in \[0, total_steps=10\)"),
    (dict(optimizer="sgd"), r"distributed optimizer supports adam only"),
])
def test_config_messages(changes, msg):
    with pytest.raises(ValueError, match=msg):
        OptimConfig(**changes).validate()


def test_needs_a_trainable_policy():
    frozen = build_policy(ModelConfig.preset("tiny-dense"), ParallelConfig(), trainable=False)
    with pytest.raises(ValueError, match="the policy must be trainable"):
        build_optimizer(frozen, OptimConfig())


def test_bad_state(policy):
    opt, sched = build_optimizer(policy, OptimConfig())
    with pytest.raises(ValueError, match="state must be a dict from optim_state_dict"):
        load_optim_state_dict(opt, sched, {"optimizer": {}})
