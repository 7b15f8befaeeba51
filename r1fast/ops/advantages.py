"""Group-relative advantages: GRPO's critic-free baseline (docs/DESIGN.md §3).

For each prompt the trainer samples a group of G completions and scores each with a scalar
reward. The advantage of completion i is its reward compared with the rest of its group:

* ``grpo``:   ``A_i = (r_i - mean_g) / (std_g + eps)``, unbiased std (divide by G-1);
* ``drgrpo``: ``A_i = r_i - mean_g`` (Dr.GRPO drops the std division, which biases towards
  easy/hard prompts);
* ``rloo``:   ``A_i = r_i - (sum_g - r_i) / (G - 1)`` (leave-one-out baseline).

A group of one, or a group whose rewards are all equal, has no signal: its advantages are
exactly 0 (never NaN). Groups are given either as ``group_size`` (the rewards are laid out
group after group, N divisible by G) or as ``group_index`` (any integer group id per reward,
groups of different sizes allowed, members anywhere).

Advantages are constants of the policy-gradient loss, so no gradient flows back to the rewards
(the output never requires grad). The reference computes in fp64 and returns fp32, so rewards of
any finite fp32 magnitude (1e20 included) give finite advantages; the Triton kernel accumulates
in fp32 and is used only while ``max |r| <= TRITON_MAX_ABS_REWARD`` (its squares cannot
overflow there), larger rewards take the reference. Rewards beyond ``MAX_ABS_REWARD`` (whose
drgrpo/rloo advantages would not fit fp32) and NaN/Inf raise ``ValueError``.

Implementations: :func:`group_advantages_reference` (pure PyTorch, any device) and the Triton
kernel in ``r1fast.kernels.group_advantages`` registered as ``torch.ops.r1fast.group_advantages``.
"""
from __future__ import annotations

import math

import torch

from r1fast.ops._dispatch import resolve_impl
from r1fast.ops._validate import (FLOAT_DTYPES, INDEX_DTYPES, check_choice, check_finite,
                                  check_range, check_tensor)

ESTIMATORS = ("grpo", "drgrpo", "rloo")
#: largest |reward| accepted: a spread of 2x this times G/(G-1) still fits fp32
MAX_ABS_REWARD = 8.0e37
#: largest |reward| the fp32 Triton kernel takes (G * (2r)^2 stays far below fp32's max)
TRITON_MAX_ABS_REWARD = 1.0e15

__all__ = ["group_advantages", "group_advantages_reference", "ESTIMATORS"]


# ----------------------------------------------------------------------------- reference

def group_advantages_reference(rewards: torch.Tensor, group_index: torch.Tensor,
                               estimator: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """Pure-PyTorch advantages for validated inputs: ``rewards [N]``, ``group_index [N]``.

    Computes in fp64 (rewards of 1e20 would overflow fp32 squares to Inf, then NaN) with two
    passes per group (mean, then squared deviations) on rewards shifted by their group's first
    member, and returns fp32.
    """
    cdt = torch.float64
    r = rewards.detach().to(cdt)  # [N]
    if r.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=r.device)
    _, inv = torch.unique(group_index, return_inverse=True)  # [N] dense group ids
    num_groups = int(inv.max()) + 1
    count = torch.zeros(num_groups, dtype=cdt, device=r.device).index_add_(
        0, inv, torch.ones_like(r))  # [G]
    # Shift each group by its first member so that rounding scales with the group's spread,
    # not with a (possibly large) common offset of the rewards.
    pos = torch.arange(r.numel(), device=r.device)
    first = torch.full((num_groups,), r.numel(), device=r.device).scatter_reduce(
        0, inv, pos, "amin")  # [G]
    r = r - r[first][inv]
    mean = torch.zeros(num_groups, dtype=cdt, device=r.device).index_add_(0, inv, r) / count
    gmin = torch.full((num_groups,), float("inf"), dtype=cdt, device=r.device).scatter_reduce(
        0, inv, r, "amin")
    gmax = torch.full((num_groups,), float("-inf"), dtype=cdt, device=r.device).scatter_reduce(
        0, inv, r, "amax")
    constant = (gmin == gmax)[inv]  # [N]; includes groups of one
    nm1 = (count - 1).clamp_min(1)[inv]  # [N]; only used where the group has > 1 member
    centered = r - mean[inv]
    if estimator == "grpo":
        ssd = torch.zeros(num_groups, dtype=cdt, device=r.device).index_add_(
            0, inv, centered * centered)
        std = torch.sqrt(ssd[inv] / nm1)
        denom = std + eps
        adv = centered / torch.where(denom > 0, denom, torch.ones_like(denom))
    elif estimator == "drgrpo":
        adv = centered
    else:  # rloo: r - (S - r)/(n-1) == n (r - mean)/(n-1); the centred form keeps precision
        adv = centered * (count[inv] / nm1)
    return torch.where(constant, torch.zeros_like(adv), adv).to(torch.float32)


# ----------------------------------------------------------------------------- triton op

@torch.library.custom_op("r1fast::group_advantages", mutates_args=())
def _group_advantages_op(rewards: torch.Tensor, group_size: int,
                         group_index: torch.Tensor | None, estimator: str,
                         eps: float) -> torch.Tensor:
    """Triton path. ``group_size > 0`` selects contiguous groups, else ``group_index`` is used."""
    from r1fast.kernels.group_advantages import group_advantages_fwd  # lazy: needs triton

    rewards = rewards.contiguous()
    if group_size > 0:
        return group_advantages_fwd(rewards, estimator=estimator, eps=eps, group_size=group_size)
    # Sort by group id (stable, so members keep their order and sums are reproducible), then
    # each group is one contiguous segment of the permutation.
    perm = torch.argsort(group_index, stable=True)  # [N]
    _, counts = torch.unique_consecutive(group_index[perm], return_counts=True)  # [G]
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=rewards.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return group_advantages_fwd(rewards, estimator=estimator, eps=eps, perm=perm,
                                offsets=offsets)


@_group_advantages_op.register_fake
def _(rewards, group_size, group_index, estimator, eps):
    return torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)


# ----------------------------------------------------------------------------- public op

def group_advantages(
    rewards: torch.Tensor,
    group_size: int | None = None,
    group_index: torch.Tensor | None = None,
    estimator: str = "grpo",
    eps: float = 1e-6,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Advantages ``[N]`` fp32 of ``rewards [N]`` relative to their groups.

    Args:
        rewards: ``[N]`` float rewards, finite (NaN/Inf raise ``ValueError``).
        group_size: G when the rewards are laid out as N/G consecutive groups of G.
        group_index: ``[N]`` integer group id of each reward (any values, any order).
            Exactly one of ``group_size`` and ``group_index`` must be given.
        estimator: ``"grpo"`` | ``"drgrpo"`` | ``"rloo"`` (see the module docstring).
        eps: added to the std in ``grpo`` (>= 0).
        impl: ``"auto"`` | ``"torch"`` | ``"triton"`` (see ``r1fast.ops._dispatch``).

    Returns:
        ``[N]`` float32 advantages; 0 for groups of one and for groups of equal rewards.
    """
    check_tensor("rewards", rewards, ndim=1, dtypes=FLOAT_DTYPES)
    n = rewards.shape[0]
    # one host sync for both value checks: NaN/Inf and magnitude
    amax = float(rewards.detach().abs().max().double()) if n else 0.0
    if not math.isfinite(amax):
        check_finite("rewards", rewards)  # names NaN or Inf
    if amax > MAX_ABS_REWARD:
        raise ValueError(f"rewards must be finite with |r| <= {MAX_ABS_REWARD:g} (their "
                         f"advantages must fit fp32), got max |r| = {amax:g}")
    if (group_size is None) == (group_index is None):
        raise ValueError("exactly one of group_size and group_index must be given, got "
                         f"group_size={group_size!r} and group_index="
                         f"{'None' if group_index is None else 'a tensor'}")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise ValueError(f"group_size must be an int, got {type(group_size).__name__}")
        check_range("group_size", group_size, 1)
        if n % group_size != 0:
            raise ValueError(f"group_size must divide the number of rewards: N={n} is not "
                             f"divisible by group_size={group_size}")
    else:
        check_tensor("group_index", group_index, ndim=1, dtypes=INDEX_DTYPES, shape=(n,),
                     device=rewards.device)
    check_choice("estimator", estimator, ESTIMATORS)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise ValueError(f"eps must be a float, got {type(eps).__name__}")
    if not math.isfinite(eps):
        raise ValueError(f"eps must be a finite float >= 0, got {eps}")
    check_range("eps", float(eps), 0.0)

    chosen = resolve_impl("group_advantages", impl, rewards.device,
                          supported=("torch", "triton"))
    rewards = rewards.detach()
    if chosen == "triton" and amax <= TRITON_MAX_ABS_REWARD:
        return _group_advantages_op(rewards, group_size or 0, group_index, estimator,
                                    float(eps))
    if group_index is None:
        group_index = torch.arange(n, device=rewards.device) // group_size
    return group_advantages_reference(rewards, group_index, estimator, float(eps))
