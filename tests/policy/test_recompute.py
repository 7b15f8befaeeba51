"""Activation recompute (``ParallelConfig.recompute``): "selective" and "full" give the same
loss and gradients as "none" and save fewer activation bytes in the forward (measured with
autograd's saved-tensor hooks), for a Qwen3-MoE-like and an MLA DeepSeek-V3-like model."""
from __future__ import annotations

import pytest
import torch

from r1fast.ops.linear_logprob import linear_logprob
from r1fast.plan.memory import measure_saved_bytes
from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.hf_checkpoint import gather_hf_state_dict
from r1fast.policy.model import build_policy
from r1fast.policy.parallel import destroy_parallel


@pytest.fixture(autouse=True)
def _single_rank():
    yield
    destroy_parallel()


def _run(preset: str, recompute: str, tokens, targets):
    policy = build_policy(ModelConfig.preset(preset), ParallelConfig(recompute=recompute),
                          seed=3)
    policy.module.train()
    params = list(policy.gpt.parameters())
    _, saved = measure_saved_bytes(lambda: policy.hidden_states(tokens), exclude=params)
    n = float((targets != -100).sum())
    losses = []

    def loss_fn(hidden, weight, mb):
        lp = linear_logprob(hidden.reshape(-1, hidden.shape[-1]), weight,
                            mb["targets"].reshape(-1))
        losses.append(-lp.sum().detach() / n)
        return -lp.sum() / n, {}

    policy.forward_backward([{"tokens": tokens, "targets": targets}], loss_fn)
    grads = gather_hf_state_dict(policy, grads=True)
    destroy_parallel()
    return losses[0], grads, saved


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dsv3-mla"])
def test_recompute_is_exact_and_saves_memory(preset):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 48), generator=g)
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = -100
    ref_loss, ref_grads, ref_saved = _run(preset, "none", tokens, targets)
    saved = {}
    for mode in ("selective", "full"):
        loss, grads, saved[mode] = _run(preset, mode, tokens, targets)
        assert abs(loss.item() - ref_loss.item()) < 1e-6
        assert set(grads) == set(ref_grads)
        for k in ref_grads:
            assert (grads[k] - ref_grads[k]).abs().max().item() < 1e-6, (mode, k)
    assert saved["full"] < saved["selective"] < ref_saved, (saved, ref_saved)


def test_bad_recompute_names_the_field():
    with pytest.raises(ValueError, match="recompute must be one of"):
        ParallelConfig(recompute="some", world_size=1).validate()
