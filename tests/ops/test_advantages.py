"""group_advantages: torch and Triton paths against a plain fp64 formula, properties, bad input.

The Triton path runs under the interpreter on a CPU (tests/conftest.py), natively on a GPU.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1fast.ops._dispatch import ImplUnavailableError
from r1fast.ops.advantages import ESTIMATORS, group_advantages

IMPLS = ["torch", "triton"]


def naive_fp64(rewards, group_ids, estimator, eps=1e-6):
    """docs/DESIGN.md §3 written out per group in Python floats (fp64)."""
    r = [float(x) for x in rewards.double().cpu()]
    ids = [int(g) for g in group_ids.cpu()]
    out = [0.0] * len(r)
    for g in set(ids):
        members = [i for i, x in enumerate(ids) if x == g]
        vals = [r[i] for i in members]
        n = len(vals)
        if n == 1 or max(vals) == min(vals):
            continue  # no signal: A = 0
        mean = sum(vals) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
        for i in members:
            if estimator == "grpo":
                out[i] = (r[i] - mean) / (std + eps)
            elif estimator == "drgrpo":
                out[i] = r[i] - mean
            else:
                out[i] = r[i] - (sum(vals) - r[i]) / (n - 1)
    return torch.tensor(out, dtype=torch.float64)


def _close(a, b, spread=1.0):
    """fp32 agreement; ``spread`` (the rewards' range) scales the absolute tolerance for the
    un-normalised estimators, whose rounding error is a few ulps of the group's spread."""
    torch.testing.assert_close(a.double().cpu(), b.double().cpu(), atol=1e-6 * max(1.0, spread),
                               rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("n,g", [(1, 1), (7, 7), (63, 7), (63, 9), (257, 257), (256, 16)])
def test_group_size_matches_fp64(impl, estimator, n, g, device):
    r = torch.randn(n, device=device) * 3 + 1
    a = group_advantages(r, group_size=g, estimator=estimator, impl=impl)
    assert a.dtype == torch.float32 and a.shape == (n,) and a.device == r.device
    _close(a, naive_fp64(r, torch.arange(n) // g, estimator))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("n", [1, 7, 63, 257])
def test_group_index_matches_fp64(impl, estimator, n, device):
    ids = torch.randint(-3, 11, (n,), device=device)  # any ids, any order, uneven sizes
    r = torch.randint(0, 3, (n,), device=device).float() * 0.5 + torch.randn(n, device=device)
    a = group_advantages(r, group_index=ids, estimator=estimator, impl=impl)
    _close(a, naive_fp64(r, ids, estimator))


@pytest.mark.parametrize("impl", IMPLS)
def test_binary_rewards_and_large_offset(impl, device):
    # 0/1 rewards (the usual verifiable-reward case) and a large common offset: the two-pass
    # std keeps full precision where a one-pass E[r^2] - E[r]^2 would not.
    r = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 1] * 4, device=device) + 1000.0
    for est in ESTIMATORS:
        _close(group_advantages(r, group_size=8, estimator=est, impl=impl),
               naive_fp64(r, torch.arange(32) // 8, est))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_input_dtypes(impl, dtype, device):
    r = torch.randn(63, device=device).to(dtype)
    a = group_advantages(r, group_size=9, impl=impl)
    assert a.dtype == torch.float32
    _close(a, naive_fp64(r, torch.arange(63) // 9, "grpo"))


@pytest.mark.parametrize("impl", IMPLS)
def test_group_index_equals_group_size_after_permutation(impl, device):
    r = torch.randn(48, device=device)
    ids = torch.arange(48, device=device) // 6
    perm = torch.randperm(48, device=device)
    a = group_advantages(r, group_size=6, impl=impl)
    b = group_advantages(r[perm], group_index=ids[perm], impl=impl)
    _close(b, a[perm])


@pytest.mark.parametrize("impl", IMPLS)
def test_does_not_track_gradients(impl, device):
    r = torch.randn(8, device=device, requires_grad=True)
    a = group_advantages(r, group_size=4, impl=impl)
    assert not a.requires_grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_empty_input(impl, estimator, device):
    r = torch.zeros(0, device=device)
    assert group_advantages(r, group_size=4, estimator=estimator, impl=impl).shape == (0,)
    ids = torch.zeros(0, dtype=torch.int64, device=device)
    assert group_advantages(r, group_index=ids, estimator=estimator, impl=impl).shape == (0,)


# ----------------------------------------------------------------------------- properties

group_sizes = st.integers(1, 9)
reward_values = st.one_of(st.sampled_from([0.0, 1.0, 0.1, -2.5]),
                          st.floats(-100, 100, allow_nan=False, width=32))


@st.composite
def grouped_rewards(draw):
    g = draw(group_sizes)
    num_groups = draw(st.integers(1, 5))
    vals = draw(st.lists(reward_values, min_size=g * num_groups, max_size=g * num_groups))
    return torch.tensor(vals, dtype=torch.float32), g


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@settings(max_examples=25, deadline=None)
@given(data=grouped_rewards())
def test_zero_mean_per_group(impl, estimator, data):
    r, g = data
    a = group_advantages(r, group_size=g, estimator=estimator, impl=impl).double()
    assert torch.isfinite(a).all()
    groups = a.view(-1, g)
    scale = 1.0 if estimator == "grpo" else max(1.0, float(r.abs().max()))
    assert groups.sum(1).abs().max() <= 1e-5 * g * scale
    spread = 1.0 if estimator == "grpo" else float(r.max() - r.min())
    _close(a, naive_fp64(r, torch.arange(r.numel()) // g, estimator), spread)


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=25, deadline=None)
@given(data=grouped_rewards())
def test_grpo_unit_std_per_group(impl, data):
    r, g = data
    a = group_advantages(r, group_size=g, impl=impl).double().view(-1, g)
    groups = r.double().view(-1, g)
    for row, raw in zip(a, groups):
        sd = float(raw.std()) if g > 1 else 0.0
        if sd > 1e-2:  # eps negligible: A has unbiased std 1
            assert abs(float(row.std()) - sd / (sd + 1e-6)) < 1e-4


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@settings(max_examples=20, deadline=None)
@given(value=reward_values, g=group_sizes, num_groups=st.integers(1, 4))
def test_all_equal_group_is_zero(impl, estimator, value, g, num_groups):
    r = torch.full((g * num_groups,), value)
    a = group_advantages(r, group_size=g, estimator=estimator, impl=impl, eps=0.0)
    assert torch.equal(a, torch.zeros_like(a))  # exactly 0: no NaN, no rounding residue


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_group_of_one_is_zero(impl, estimator, device):
    r = torch.tensor([3.0, 1.0, 2.0, 7.0], device=device)
    ids = torch.tensor([0, 1, 1, 2], device=device)  # groups of one: 0 and 2
    a = group_advantages(r, group_index=ids, estimator=estimator, impl=impl)
    assert a[0] == 0 and a[3] == 0 and torch.isfinite(a).all()
    assert a[1] < 0 < a[2]
    assert torch.equal(group_advantages(r, group_size=1, estimator=estimator, impl=impl),
                       torch.zeros(4, device=device))


# ----------------------------------------------------------------------------- kernel

def test_kernel_writes_every_output(device):
    pytest.importorskip("triton")
    from r1fast.kernels.group_advantages import group_advantages_fwd

    r = torch.randn(63, device=device)
    for kwargs in ({"group_size": 7}, {"perm": torch.randperm(63, device=device),
                                        # empty groups (a direct launch may pass them;
                                        # compute-sanitizer checks they read nothing)
                                        "offsets": torch.tensor([0, 5, 5, 6, 40, 63, 63],
                                                                device=device)}):
        for est in ESTIMATORS:
            out = torch.full((63,), float("nan"), device=device)  # poison
            res = group_advantages_fwd(r, estimator=est, eps=1e-6, out=out, block=16, **kwargs)
            assert res is out and torch.isfinite(out).all()


def test_custom_op_registration(device):
    pytest.importorskip("triton")
    from r1fast.ops.advantages import _group_advantages_op

    r = torch.randn(21, device=device)
    torch.library.opcheck(_group_advantages_op, (r, 7, None, "grpo", 1e-6),
                          test_utils=("test_schema", "test_faketensor"))
    ids = torch.randint(0, 4, (21,), device=device)
    torch.library.opcheck(_group_advantages_op, (r, 0, ids, "rloo", 1e-6),
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("bad,match", [
    (float("nan"), "rewards contains NaN or Inf"),
    (float("inf"), "rewards contains NaN or Inf"),
])
def test_non_finite_rewards(bad, match):
    r = torch.zeros(4)
    r[2] = bad
    with pytest.raises(ValueError, match=match):
        group_advantages(r, group_size=2)


@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one of group_size and group_index"),
    ({"group_size": 2, "group_index": torch.zeros(4, dtype=torch.long)},
     "exactly one of group_size and group_index"),
    ({"group_size": 3}, r"group_size must divide the number of rewards: N=4"),
    ({"group_size": 0}, r"group_size must be in \[1, inf\], got 0"),
    ({"group_size": 2.0}, "group_size must be an int, got float"),
    ({"group_index": torch.zeros(3, dtype=torch.long)}, r"group_index must have shape \[4\]"),
    ({"group_index": torch.zeros(4)}, "group_index must have dtype in"),
    ({"group_size": 2, "estimator": "ppo"}, "estimator must be one of"),
    ({"group_size": 2, "eps": -1.0}, r"eps must be in \[0.0, inf\]"),
    ({"group_size": 2, "eps": float("nan")}, "eps must be a finite float"),
    ({"group_size": 2, "impl": "fast"}, "impl must be one of"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(torch.zeros(4), **kwargs)


def test_bad_rewards_tensor():
    with pytest.raises(ValueError, match=r"rewards must be 1-D, got shape \(2, 2\)"):
        group_advantages(torch.zeros(2, 2), group_size=2)
    with pytest.raises(ValueError, match="rewards must have dtype in"):
        group_advantages(torch.zeros(4, dtype=torch.long), group_size=2)
    with pytest.raises(ValueError, match="rewards must be a torch.Tensor"):
        group_advantages([0.0, 1.0], group_size=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal of impl='cuda'")
def test_unavailable_impl():
    with pytest.raises(ImplUnavailableError, match="group_advantages: impl='cuda'"):
        group_advantages(torch.zeros(4), group_size=2, impl="cuda")
