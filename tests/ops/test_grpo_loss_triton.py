"""policy_loss through the Triton kernels (interpreter on a CPU, native on a GPU).

Every case is checked against both the torch reference (``impl="torch"``) and the plain fp64
formula of tests/helpers/policy_loss_cases.py (shared with tests/ops/test_policy_loss.py, so
the two paths are checked against one formula).
Sizes are tiny: the interpreter is ~1000x slower than compiled code.
"""
import math

import pytest
import torch
from hypothesis import given, settings

pytest.importorskip("triton")

from r1fast.kernels import grpo_loss as K  # noqa: E402
from r1fast.ops.policy_loss import AGGREGATIONS, METRICS, PolicyLossConfig  # noqa: E402

import tests.helpers.policy_loss_cases as P  # noqa: E402


def assert_same_result(got, want, atol=1e-6, rtol=1e-6):
    torch.testing.assert_close(got[0], want[0].to(got[0].dtype), atol=atol, rtol=rtol)
    torch.testing.assert_close(got[1], want[1].to(got[1].dtype), atol=atol, rtol=rtol)
    for k in METRICS:
        torch.testing.assert_close(got[2][k], want[2][k].to(got[2][k].dtype), atol=atol,
                                   rtol=rtol, msg=lambda s, k=k: f"metric {k}: {s}")


@pytest.mark.parametrize("variant,tis,kl,agg", P.GRID, ids=P.GRID_IDS)
def test_grid(variant, tis, kl, agg, device):
    batch = P.make_batch(3, 7, seed=1, device=device, empty_rows=(1,))
    kw = P.grid_kwargs(variant, tis, kl, agg, batch)
    got = P.run_op(batch, "triton", **kw)
    P.assert_matches(got, P.run_naive(batch, **kw))
    assert_same_result(got, P.run_op(batch, "torch", **kw))


@pytest.mark.parametrize("B,L", [(1, 1), (1, 7), (7, 63), (3, 257)])
@pytest.mark.parametrize("variant", P.VARIANTS)
def test_odd_shapes(B, L, variant, device):
    batch = P.make_batch(B, L, seed=B * 1000 + L, device=device)
    kw = P.grid_kwargs(variant, 2.0, "k3", "seq-mean-token-mean", batch)
    got = P.run_op(batch, "triton", **kw)
    P.assert_matches(got, P.run_naive(batch, **kw), atol=2e-6)
    assert_same_result(got, P.run_op(batch, "torch", **kw), atol=2e-6)


def test_long_sequences_span_many_blocks(device):
    # L = 300 with a 16-wide block: every program loops over 19 blocks (pre-pass and main pass)
    batch = P.make_batch(2, 300, seed=8, device=device, adv_per_token=True)
    for variant in (("gspo", 3.0), ("ppo", None)):
        kw = P.grid_kwargs(variant, 2.0, "k3", "seq-mean-token-mean", batch)
        want = P.run_op(batch, "torch", **kw)
        flat = [batch[k].reshape(-1) for k in ("logp", "old", "adv", "mask")]
        cu = torch.tensor([0, 300, 600], device=device)
        for layout in ({"cu_seqlens": cu}, {"cu_seqlens": None, "seq_len": 300}):
            totals, dlogp, _ = K.grpo_loss_fwd(
                *flat, ref_logp=batch["ref"].reshape(-1), rollout_logp=batch["roll"].reshape(-1),
                num_seqs=2, loss=variant[0], dual_clip=variant[1], kl="k3", kl_coef=0.3,
                tis_cap=2.0, agg="seq-mean-token-mean", norm_value=2.0, adv_per_token=True,
                block=16, **layout)
            torch.testing.assert_close(totals[K.T_LOSS], want[0], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(dlogp / 2, want[1].reshape(-1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", P.VARIANTS)
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_per_token_advantages_and_float_mask(variant, agg, device):
    batch = P.make_batch(4, 9, seed=7, device=device, adv_per_token=True, float_mask=True,
                         empty_rows=(2,))
    kw = P.grid_kwargs(variant, None, "k2", agg, batch)
    got = P.run_op(batch, "triton", **kw)
    P.assert_matches(got, P.run_naive(batch, **kw))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_input_dtypes(dtype, device):
    batch = P.make_batch(3, 9, seed=4, device=device)
    low = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}
    kw = P.grid_kwargs(("ppo", 3.0), 2.0, "k3", "token-mean", low)
    value, grad, _ = P.run_op(low, "triton", **kw)
    assert value.dtype == torch.float32 and grad.dtype == dtype
    w_value, w_grad, _ = P.run_naive(low, **kw)  # fp64 of the same rounded values
    torch.testing.assert_close(value.double().cpu(), w_value, atol=1e-6, rtol=1e-6)
    tol = 1e-6 if dtype == torch.float64 else 1e-2  # the gradient is stored in ``dtype``
    torch.testing.assert_close(grad.double().cpu(), w_grad, atol=tol, rtol=tol)


@settings(max_examples=15, deadline=None)
@given(case=P.random_cases())
def test_random_cases(case):
    batch, kw = case
    got = P.run_op(batch, "triton", **kw)
    P.assert_matches(got, P.run_naive(batch, **kw), atol=2e-6)
    assert_same_result(got, P.run_op(batch, "torch", **kw), atol=2e-6)


# ----------------------------------------------------------------------------- layouts, DP

@pytest.mark.parametrize("variant", P.VARIANTS)
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_packed_equals_padded(variant, agg, device):
    batch = P.make_batch(4, 11, seed=3, device=device, adv_per_token=variant[0] == "ppo")
    padded, packed, cu, longest, keep = P.to_packed(batch)
    want = P.run_op(padded, "triton", max_len=longest,
                    **P.grid_kwargs(variant, 2.0, "k3+", agg, padded))
    kw = P.grid_kwargs(variant, 2.0, "k3+", agg, packed)
    got = P.run_op(packed, "triton", cu_seqlens=cu, **kw)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], want[1][keep], atol=1e-6, rtol=1e-6)
    for k in METRICS:
        torch.testing.assert_close(got[2][k], want[2][k], atol=1e-6, rtol=1e-6)
    assert_same_result(got, P.run_op(packed, "torch", cu_seqlens=cu, **kw))


@pytest.mark.parametrize("variant", P.VARIANTS)
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_global_normalizer_two_ranks(variant, agg, device):
    P.check_two_ranks(variant, agg, device, "triton")


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("loss", ["ppo", "gspo", "cispo"])
def test_everything_masked(agg, loss, device):
    P.check_everything_masked(agg, loss, device, "triton")


@pytest.mark.parametrize("variant", P.VARIANTS)
def test_junk_in_padding_is_ignored(variant, device):
    P.check_junk_in_padding(variant, device, "triton")


@pytest.mark.parametrize("variant", P.VARIANTS)
def test_nan_on_a_real_token_is_not_hidden(variant, device):
    P.check_nan_on_a_real_token_is_not_hidden(variant, device, "triton")


def test_clamps_match_fp64(device):
    P.check_clamps(device, "triton")


def test_empty_batch(device):
    z = torch.zeros(0, 4, device=device, requires_grad=True)
    value, metrics = P.call_policy_loss(z, z.detach(), torch.zeros(0, device=device),
                                        torch.zeros(0, 4, dtype=torch.bool, device=device),
                                        impl="triton")
    value.backward()
    assert float(value.detach()) == 0.0 and z.grad.shape == (0, 4)


# ----------------------------------------------------------------------------- kernel contract

def _flat_inputs(device, B=4, L=9):
    batch = P.make_batch(B, L, seed=12, device=device, empty_rows=(2,))
    lens = [9, 0, 5, 3]  # packed: an empty sequence and uneven lengths, N = 17
    cu = torch.tensor([0, 9, 9, 14, 17], device=device)
    n = sum(lens)
    keep = torch.arange(L, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
    flat = {k: v[keep] for k, v in batch.items() if v.dim() == 2}
    return flat, batch["adv"], cu, n


@pytest.mark.parametrize("variant", P.VARIANTS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("packed", [True, False])
def test_kernel_writes_every_output(variant, agg, packed, device):
    if packed:
        flat, adv, cu, n = _flat_inputs(device)
        layout = dict(num_seqs=4)
    else:  # padded [4, 5]: the kernel derives the sequence bounds from seq_len
        batch = P.make_batch(4, 5, seed=15, device=device, empty_rows=(1,))
        flat = {k: v.reshape(-1) for k, v in batch.items() if v.dim() == 2}
        adv, cu, n = batch["adv"], None, 20
        layout = dict(num_seqs=4, seq_len=5)
    kw = dict(loss=variant[0], dual_clip=variant[1], kl="k3", kl_coef=0.2, tis_cap=2.0,
              agg=agg, adv_per_token=False, **layout)
    args = (flat["logp"], flat["old"], adv, flat["mask"], cu, flat["ref"], flat["roll"])
    nan = float("nan")
    stats = torch.full((K.NUM_STATS, 4), nan, device=device)  # poison every output
    dlogp = torch.full((n,), nan, device=device)
    totals = torch.full((K.NUM_TOTALS,), nan, device=device)
    out = K.grpo_loss_fwd(*args, stats=stats, dlogp=dlogp, totals=totals, block=16, **kw)
    assert out[0] is totals and out[1] is dlogp and out[2] is stats
    assert not torch.isnan(dlogp).any() and not torch.isnan(totals).any()
    assert not torch.isnan(stats).any()
    # the empty sequence reports +inf/-inf extremes (no token), everything else is finite
    assert torch.isfinite(stats[[K.S_PG, K.S_KL, K.S_CNT, K.S_CLIP, K.S_RATIO]]).all()
    fresh = K.grpo_loss_fwd(*args, **kw)
    assert torch.equal(fresh[0], totals) and torch.equal(fresh[1], dlogp)


def test_bitwise_deterministic(device):
    batch = P.make_batch(5, 40, seed=13, device=device)
    kw = P.grid_kwargs(("gspo", 3.0), 2.0, "k3", "seq-mean-token-mean", batch)
    a = P.run_op(batch, "triton", **kw)
    b = P.run_op(batch, "triton", **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(a[2][k], b[2][k]) for k in METRICS)


def test_expm1_kernel_helper_accuracy(device):
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, K._expm1(tl.load(x_ptr + offs)))

    x = torch.cat([torch.linspace(-20, 20, 200), torch.logspace(-8, 0, 56)]).to(device)
    y = torch.full_like(x, float("nan"))
    _probe[(1,)](x, y, BLOCK=256)
    want = torch.expm1(x.double())
    # the interpreter's exp is numpy's; a GPU's fast exp2 adds ~1 ulp of the scaled argument
    rel = 4e-7 if x.device.type == "cpu" else 2e-6
    assert ((y.double() - want).abs() <= rel * want.abs() + 1e-30).all()


def test_custom_op_registration(device):
    from r1fast.ops.policy_loss import _config_key, _grpo_loss_op

    flat, adv, cu, _ = _flat_inputs(device)
    logp = flat["logp"].clone().requires_grad_()
    ppo = _config_key(PolicyLossConfig(loss="ppo", clip_high=0.28, dual_clip=3.0, kl="k3",
                                       kl_coef=0.1, tis_cap=2.0, agg="seq-mean-token-mean"))
    for cu_seqlens, norm in ((cu, None), (cu, torch.tensor([9.0], device=device))):
        args = (logp, flat["old"], adv, flat["mask"], cu_seqlens, flat["ref"], flat["roll"],
                norm, 4, 0, 0.0, False, ppo)
        torch.library.opcheck(_grpo_loss_op, args)
    padded = P.make_batch(2, 5, device=device)
    args = (padded["logp"].reshape(-1).requires_grad_(), padded["old"].reshape(-1),
            padded["adv"], padded["mask"].reshape(-1), None, None, None, None, 2, 5, 0.0, False,
            _config_key(PolicyLossConfig(loss="gspo")))
    torch.library.opcheck(_grpo_loss_op, args)


def test_torch_compile_aot_eager(device):
    batch = P.make_batch(3, 7, seed=14, device=device)
    kw = P.grid_kwargs(("ppo", 3.0), 2.0, "k3", "token-mean", batch)

    def step(lp):
        value, metrics = P.call_policy_loss(lp, batch["old"], batch["adv"], batch["mask"],
                                            impl="triton", **kw)
        return value, metrics["clip_frac"]

    compiled = torch.compile(step, backend="aot_eager")
    lp = batch["logp"].clone().requires_grad_()
    value, clip = compiled(lp)
    value.backward()
    want = P.run_op(batch, "triton", **kw)
    torch.testing.assert_close(value.detach(), want[0])
    torch.testing.assert_close(lp.grad, want[1])
    assert math.isfinite(float(clip))


def test_forward_is_one_launch_and_leaves_the_ticket_at_zero(monkeypatch, device):
    """The last sequence program folds the totals: no separate reduce launch for B > 0, and
    the completion counter is back at 0 after it (each launch also resets it first)."""

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("the reduce kernel must not be launched when B > 0")

    monkeypatch.setattr(K, "_grpo_loss_reduce_kernel", NoLaunch())
    g = torch.Generator().manual_seed(5)
    logp = (-torch.rand(3, 7, generator=g)).to(device).requires_grad_(True)
    old = logp.detach() + 0.05 * torch.randn(3, 7, generator=g).to(device)
    adv, mask = torch.tensor([1.0, -1.0, 0.5], device=device), torch.ones(3, 7, device=device)
    losses = []
    for _ in range(2):
        loss, _ = P.call_policy_loss(logp, old, adv, mask, agg="seq-mean-token-mean",
                                     impl="triton")
        assert int(K._ticket(logp.device).item()) == 0
        losses.append(loss.item())
    ref, _ = P.call_policy_loss(logp, old, adv, mask, agg="seq-mean-token-mean", impl="torch")
    assert losses[0] == losses[1] and abs(losses[0] - ref.item()) < 1e-6


@pytest.mark.parametrize("poison", [2, 5, -1])
def test_a_ticket_left_non_zero_cannot_poison_the_next_call(poison, device):
    """An aborted launch (or a graph replay cut short) can leave the completion counter
    non-zero; every launch resets it first, so the next call is still right: with the ticket
    left at B-1 = 2 the first program to finish would otherwise fold partial sums, and at 5 or
    -1 no program would fold at all (totals left uninitialised)."""
    g = torch.Generator().manual_seed(9)
    logp = (-torch.rand(3, 7, generator=g)).to(device)
    old = logp + 0.05 * torch.randn(3, 7, generator=g).to(device)
    adv, mask = torch.tensor([1.0, -1.0, 0.5], device=device), torch.ones(3, 7, device=device)
    want, _ = P.call_policy_loss(logp, old, adv, mask, agg="seq-mean-token-mean", impl="torch")
    K.prepare(logp.device)
    for _ in range(2):
        K._ticket(logp.device).fill_(poison)
        got, metrics = P.call_policy_loss(logp, old, adv, mask, agg="seq-mean-token-mean",
                                          impl="triton")
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        assert int(metrics["num_tokens"]) == 21
        assert int(K._ticket(logp.device).item()) == 0


def test_ticket_is_allocated_eagerly_per_device(device):
    t = K.prepare(device)
    assert t.device.type == device.type and t.dtype == torch.int32 and t.numel() == 1
    assert K._ticket(device) is t and K.prepare(device) is t  # one per device, kept
    assert K.prepare() is K._ticket(device)  # default: the current CUDA device, else the CPU


def test_the_triton_path_traces_without_a_graph_break(device):
    """The config reached the custom op as json.dumps at every call, a graph break under
    torch.compile; it is made once with the config now."""
    from r1fast.ops import policy_loss

    batch = P.make_batch(3, 7, seed=1, device=device)
    cfg = PolicyLossConfig(kl="k3", kl_coef=0.01)

    def loss(logp):
        return policy_loss(logp, batch["old"], batch["adv"], batch["mask"], cfg,
                           ref_logp=batch["ref"], impl="triton")[0]

    logp = batch["logp"].clone().requires_grad_()
    loss(logp)  # the first call logs the dispatch choice, outside the traced one
    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss)(logp)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
