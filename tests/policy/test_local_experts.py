"""LeanSequentialMLP (r1fast.policy.local_experts) against megatron's own SequentialMLP forward on
the same module: outputs and the gradients of tokens, probabilities and every expert weight,
with experts that get no token; and the configurations that must fall back to megatron's."""
from __future__ import annotations

import copy

import pytest
import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.local_experts import LeanSequentialMLP


@pytest.fixture(scope="module")
def experts():
    from r1fast.policy.model import build_policy
    from r1fast.policy.parallel import destroy_parallel

    policy = build_policy(ModelConfig.preset("tiny-moe"), ParallelConfig(), seed=1)
    yield [m for m in policy.gpt.modules() if isinstance(m, SequentialMLP)]
    destroy_parallel()


def _run(module, forward, x, counts, probs):
    x, probs = x.clone().requires_grad_(), probs.clone().requires_grad_()
    out, bias = forward(module, x, counts, probs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad((out * w).sum(), [x, probs, *params])
    return out.detach(), bias, grads


def test_lean_experts_equal_megatron_sequential_mlp(experts):
    assert len(experts) == 2 and all(type(e) is LeanSequentialMLP for e in experts)
    e = experts[0]
    assert e._lean()
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 0, 7, 2, 4])  # two experts with no token
    n, h = int(counts.sum()), e.config.hidden_size
    x = torch.randn(n, h, generator=g)
    probs = torch.rand(n, generator=g)
    got = _run(e, LeanSequentialMLP.forward, x, counts, probs)
    want = _run(e, SequentialMLP.forward, x, counts, probs)  # megatron's, on the same weights
    assert got[1] is None and want[1] is None
    assert (got[0] - want[0]).abs().max().item() < 1e-6
    assert want[0].abs().max().item() > 1e-3
    for a, b in zip(got[2], want[2]):
        assert (a - b).abs().max().item() < 1e-6


@pytest.mark.parametrize("field,value", [
    ("add_bias_linear", True), ("moe_apply_probs_on_input", True),
    ("activation_func_clamp_value", 7.0), ("recompute_granularity", "selective"),
])
def test_other_configurations_run_megatrons_forward(experts, field, value):
    e = copy.copy(experts[0])  # a shallow copy: same weights, its own config object
    e.config = copy.copy(e.config)
    setattr(e.config, field, value)
    if field == "recompute_granularity":
        e.config.recompute_modules = ["moe_act"]
    assert not e._lean()
