"""Hostile inputs to the public ops: NaN where a range is required, a tensor normaliser of
0/NaN/negative/Inf, negative or non-finite mask weights, rewards whose fp32 squares overflow."""
import math

import pytest
import torch

from r1fast import ops
from r1fast.ops._validate import check_range

pytestmark = pytest.mark.reliability


@pytest.mark.parametrize("kw", [dict(lo=0.0), dict(hi=1.0), dict(lo=0.0, hi=1.0),
                                dict(lo=0.0, lo_open=True)])
def test_check_range_rejects_nan(kw):
    with pytest.raises(ValueError, match="x must be in .* got nan"):
        check_range("x", float("nan"), **kw)
    check_range("x", 0.5, **kw)


def _loss_inputs(B=2, L=5):
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(B, L, generator=g)
    return logp, logp + 0.01, torch.tensor([1.0, -1.0]), torch.ones(B, L)


@pytest.mark.parametrize("norm", [0.0, -1.0, float("nan"), float("inf"), float("-inf")])
def test_tensor_global_normalizer_must_be_finite_positive(norm):
    logp, old, adv, mask = _loss_inputs()
    cfg = ops.PolicyLossConfig(kl=None)
    with pytest.raises(ValueError, match="global_normalizer must be a finite number > 0"):
        ops.policy_loss(logp, old, adv, mask, cfg, global_normalizer=torch.tensor(norm),
                        impl="torch")
    with pytest.raises(ValueError, match="global_normalizer"):  # the number form too
        ops.policy_loss(logp, old, adv, mask, cfg, global_normalizer=norm, impl="torch")
    loss, _ = ops.policy_loss(logp, old, adv, mask, cfg, global_normalizer=torch.tensor(3.0),
                              impl="torch")
    assert math.isfinite(float(loss))


@pytest.mark.parametrize("bad", [-1.0, -1e-6, float("nan"), float("inf")])
def test_mask_weights_must_be_finite_and_non_negative(bad):
    logp, old, adv, mask = _loss_inputs()
    mask[1, 2] = bad
    with pytest.raises(ValueError, match="mask is a per-token weight"):
        ops.policy_loss(logp, old, adv, mask, ops.PolicyLossConfig(kl=None), impl="torch")


def test_fractional_and_bool_masks_still_work():
    logp, old, adv, mask = _loss_inputs()
    for m in (mask.bool(), mask * 0.5, mask * 2.0):
        loss, _ = ops.policy_loss(logp, old, adv, m, ops.PolicyLossConfig(kl=None), impl="torch")
        assert math.isfinite(float(loss))


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("scale", [1e20, 1e30, 3e37])
def test_huge_rewards_give_finite_advantages(estimator, scale):
    base = torch.tensor([0.0, 1.0, 0.5, 0.25, 1.0, 1.0, 0.0, 0.0])
    r = (base * scale).float()
    adv = ops.group_advantages(r, group_size=4, estimator=estimator, impl="torch")
    assert torch.isfinite(adv).all()
    small = ops.group_advantages(base, group_size=4, estimator=estimator, impl="torch")
    if estimator == "grpo":  # scale-free (eps is negligible against the std)
        torch.testing.assert_close(adv, small, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(adv / scale, small, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e38, -3e38])
def test_non_finite_or_overflowing_rewards_are_rejected(bad):
    r = torch.tensor([0.0, bad, 1.0, 0.0])
    with pytest.raises(ValueError, match="rewards"):
        ops.group_advantages(r, group_size=2, impl="torch")
