"""r1fast's policy loss against the formulas of the trainers its users come from.

Each reference below is written here from the peer's documented definition (verl's
``core_algos``: ``agg_loss``, ``compute_policy_loss_vanilla``, ``kl_penalty``; TRL's
``GRPOTrainer`` loss types; Liger's fused GRPO loss), in fp64, independently of r1fast: the
value AND the gradient with respect to the log-probs must agree. The names that differ are
pinned here as the module docstring of :mod:`r1fast.ops.policy_loss` states them (verl's
``seq-mean-token-sum-norm`` is B times r1fast's / TRL's Dr.GRPO loss).
"""
import pytest
import torch

from r1fast.ops import PolicyLossConfig, policy_loss

B, L = 5, 9


def _batch(seed: int = 0):
    """Log-probs near the old ones (some ratios clipped on either side), mixed-sign advantages,
    ragged masks and one empty sequence."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, L, generator=g, dtype=torch.float64) * 3
    logp = (old + 0.6 * torch.randn(B, L, generator=g, dtype=torch.float64)).clamp(max=0)
    ref = old + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.3, -0.7, 0.4, -1.9, 0.8], dtype=torch.float64)
    lengths = torch.tensor([9, 4, 0, 7, 2])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    return logp, old, ref, adv, mask


def _ours(cfg: PolicyLossConfig, logp, old, ref, adv, mask, **kw):
    x = logp.clone().requires_grad_()
    loss, _ = policy_loss(x, old, adv, mask, cfg, ref_logp=ref if cfg.kl else None,
                          impl="torch", **kw)
    loss.backward()
    return loss.detach(), x.grad


def _theirs(per_token, logp, reduce):
    """(value, d value / d logp) of ``reduce(per_token(logp))``."""
    x = logp.clone().requires_grad_()
    loss = reduce(per_token(x))
    loss.backward()
    return loss.detach(), x.grad


def _ppo_tokens(old, adv, lo, hi, dual=None):
    """Per-token clipped surrogate as verl's vanilla loss writes it (its dual clip included)."""
    def per_token(x):
        ratio = torch.exp(torch.clamp(x - old, -20, 20))
        a = adv[:, None]
        clipped = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - lo, 1 + hi))
        if dual is None:
            return clipped
        return torch.where(a < 0, torch.minimum(-a * dual, clipped), clipped)
    return per_token


def _close(ours, theirs):
    assert torch.allclose(ours[0], theirs[0], rtol=1e-12, atol=1e-14), (ours[0], theirs[0])
    assert torch.allclose(ours[1], theirs[1], rtol=1e-12, atol=1e-14)


def test_trl_grpo_bnpo_and_dr_grpo():
    """TRL's grpo: mean over sequences of each one's token mean (an empty one counts, as 0);
    bnpo: masked token mean; dr_grpo: masked sum / (B * max_completion_length)."""
    logp, old, ref, adv, mask = _batch()
    m = mask.double()
    tokens = _ppo_tokens(old, adv, 0.2, 0.28)
    max_completion_length = 16
    trl = {
        "grpo": lambda t: ((t * m).sum(-1) / m.sum(-1).clamp(min=1)).mean(),
        "bnpo": lambda t: (t * m).sum() / m.sum().clamp(min=1),
        "dr_grpo": lambda t: (t * m).sum() / (t.shape[0] * max_completion_length),
    }
    ours = {"grpo": ("seq-mean-token-mean", {}), "bnpo": ("token-mean", {}),
            "dr_grpo": ("seq-mean-token-sum-norm", {"max_len": max_completion_length})}
    for name, reduce in trl.items():
        agg, kw = ours[name]
        cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.28, agg=agg)
        _close(_ours(cfg, logp, old, ref, adv, mask, **kw), _theirs(tokens, logp, reduce))


def test_verl_token_sum_norm_is_b_times_ours():
    """verl's seq-mean-token-sum-norm: the summed sequence losses over L alone (no 1/B)."""
    logp, old, ref, adv, mask = _batch(1)
    m = mask.double()
    verl = _theirs(_ppo_tokens(old, adv, 0.2, 0.2), logp, lambda t: (t * m).sum(-1).sum() / L)
    loss, grad = _ours(PolicyLossConfig(agg="seq-mean-token-sum-norm"), logp, old, ref, adv, mask)
    _close((loss * B, grad * B), verl)


def test_verl_dual_clip_and_low_var_kl():
    """verl's vanilla loss with clip_ratio_c = 3 and its low_var_kl (k3) penalty, aggregated by
    its token-mean: r1fast's dual_clip=3.0, kl='k3'."""
    logp, old, ref, adv, mask = _batch(2)
    logp = logp.clone()
    logp[3, :3] = old[3, :3] + 1.6  # ratios near 5 with A < 0: the dual clip binds
    m = mask.double()
    beta = 0.05
    ppo = _ppo_tokens(old, adv, 0.2, 0.28, dual=3.0)

    def per_token(x):
        kl = torch.clamp(ref - x, -20, 20)
        low_var_kl = torch.clamp(torch.exp(kl) - kl - 1, -10, 10)
        return ppo(x) + beta * low_var_kl

    verl = _theirs(per_token, logp, lambda t: (t * m).sum() / m.sum())
    cfg = PolicyLossConfig(clip_high=0.28, dual_clip=3.0, kl="k3", kl_coef=beta)
    _close(_ours(cfg, logp, old, ref, adv, mask), verl)


@pytest.mark.parametrize("epsilon_high", [5.0, 1.5])
def test_trl_and_liger_cispo(epsilon_high):
    """TRL's and Liger's cispo: -sg(min(ratio, epsilon_high)) * A * logp, no lower bound."""
    logp, old, ref, adv, mask = _batch(3)
    m = mask.double()

    def per_token(x):
        coef = torch.clamp(torch.exp(x - old), max=epsilon_high).detach()
        return -coef * adv[:, None] * x

    theirs = _theirs(per_token, logp, lambda t: (t * m).sum() / m.sum())
    cfg = PolicyLossConfig(loss="cispo", clip_low=1.0, clip_high=epsilon_high - 1)
    _close(_ours(cfg, logp, old, ref, adv, mask), theirs)


def test_trl_two_sided_delta_is_our_dual_clip():
    """TRL's two-sided GRPO (``delta``): the unclipped ratio is capped at delta before the
    min, which bounds a negative-advantage token's loss at delta * |A|: r1fast's dual_clip.
    (A positive advantage never reaches the cap: its min takes the clipped term first.)"""
    logp, old, ref, adv, mask = _batch(4)
    logp = logp.clone()
    logp[1, :3] = old[1, :3] + 1.6  # ratios near 5 with A < 0: the cap binds
    logp[0, :2] = old[0, :2] + 1.6  # and with A > 0, where it must not matter
    m = mask.double()
    delta = 3.0

    def per_token(x):
        ratio = torch.exp(x - old)
        a = adv[:, None]
        capped = torch.clamp(ratio, max=delta)
        return -torch.minimum(capped * a, torch.clamp(ratio, 1 - 0.2, 1 + 0.28) * a)

    theirs = _theirs(per_token, logp, lambda t: ((t * m).sum(-1) / m.sum(-1).clamp(min=1)).mean())
    cfg = PolicyLossConfig(clip_high=0.28, dual_clip=delta, agg="seq-mean-token-mean")
    _close(_ours(cfg, logp, old, ref, adv, mask), theirs)


def test_trl_vllm_importance_sampling_correction_is_our_tis():
    """TRL's vllm_importance_sampling_correction (token level, cap C): the surrogate of each
    token times min(exp(old - sampler), C), the KL term not weighed: r1fast's tis_cap=C with
    the sampler's log-probs as rollout_logp."""
    logp, old, ref, adv, mask = _batch(5)
    g = torch.Generator().manual_seed(6)
    sampler = old + 0.5 * torch.randn(old.shape, generator=g, dtype=torch.float64)
    m = mask.double()
    cap, beta = 2.0, 0.04
    ppo = _ppo_tokens(old, adv, 0.2, 0.28)
    weight = torch.clamp(torch.exp(old - sampler), max=cap)
    assert (weight == cap).any() and (weight < 1).any()  # the cap binds somewhere

    def per_token(x):
        kl = torch.exp(ref - x) - (ref - x) - 1  # TRL's k3
        return ppo(x) * weight + beta * kl

    theirs = _theirs(per_token, logp, lambda t: ((t * m).sum(-1) / m.sum(-1).clamp(min=1)).mean())
    cfg = PolicyLossConfig(clip_high=0.28, kl="k3", kl_coef=beta, tis_cap=cap,
                           agg="seq-mean-token-mean")
    _close(_ours(cfg, logp, old, ref, adv, mask, rollout_logp=sampler), theirs)
