"""policy_loss (torch path) against a plain fp64 formula; layouts, data parallelism, bad input.

The fp64 formula, batches and shared case bodies live in tests/helpers/policy_loss_cases.py
(tests/ops/test_grpo_loss_triton.py runs the same cases on the Triton path).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1fast.ops._dispatch import ImplUnavailableError
from r1fast.ops.policy_loss import (AGGREGATIONS, METRICS, PolicyLossConfig, loss_denominator,
                                    policy_loss)
from tests.helpers.policy_loss_cases import (GRID, GRID_IDS, VARIANTS, assert_matches,
                                             call_policy_loss, check_clamps,
                                             check_everything_masked, check_junk_in_padding,
                                             check_nan_on_a_real_token_is_not_hidden,
                                             check_two_ranks, grid_kwargs, make_batch,
                                             random_cases, run_naive, run_op, split_ranks,
                                             to_packed)


# ----------------------------------------------------------------------------- the grid

@pytest.mark.parametrize("variant,tis,kl,agg", GRID, ids=GRID_IDS)
def test_grid_matches_fp64(variant, tis, kl, agg, device):
    batch = make_batch(3, 7, seed=1, device=device, empty_rows=(1,))
    kw = grid_kwargs(variant, tis, kl, agg, batch)
    assert_matches(run_op(batch, "torch", **kw), run_naive(batch, **kw))


@pytest.mark.parametrize("B,L", [(1, 1), (1, 7), (7, 63), (3, 257)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_odd_shapes(B, L, variant, device):
    batch = make_batch(B, L, seed=B * 1000 + L, device=device)
    kw = grid_kwargs(variant, 2.0, "k3", "seq-mean-token-mean", batch)
    assert_matches(run_op(batch, "torch", **kw), run_naive(batch, **kw), atol=2e-6)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_per_token_advantages_and_float_mask(variant, agg, device):
    batch = make_batch(4, 9, seed=7, device=device, adv_per_token=True, float_mask=True,
                       empty_rows=(2,))
    kw = grid_kwargs(variant, None, "k2", agg, batch)
    assert_matches(run_op(batch, "torch", **kw), run_naive(batch, **kw))


def test_metrics_by_hand(device):
    # One sequence, four tokens, clip 0.2: ratios 2, 0.5, 1, 4 with A = +1, -1, +1, -1.
    logp = torch.log(torch.tensor([[2.0, 0.5, 1.0, 4.0]], device=device))
    old = torch.zeros_like(logp)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]], device=device)
    mask = torch.ones_like(logp, dtype=torch.bool)
    value, m = call_policy_loss(logp, old, adv, mask, dual_clip=3.0, impl="torch")
    # token losses: -1*min(2,1.2)=-1.2; 1*max(0.5,0.8)=0.8; -1; min(1*4, 3) = 3
    torch.testing.assert_close(value.cpu(), torch.tensor((-1.2 + 0.8 - 1 + 3) / 4))
    assert float(m["clip_frac"]) == 0.5  # tokens 0 (A>0, r>1.2) and 1 (A<0, r<0.8)
    assert float(m["dual_clip_frac"]) == 0.25  # token 3 (A<0, r>3)
    torch.testing.assert_close(m["ratio_min"].cpu(), torch.tensor(0.5))
    torch.testing.assert_close(m["ratio_max"].cpu(), torch.tensor(4.0))
    torch.testing.assert_close(m["ratio_mean"].cpu(), torch.tensor(7.5 / 4))


def test_cispo_counts_every_truncated_weight(device):
    """CISPO truncates the IS weight of every token outside [lo, hi], whatever the sign of A:
    its clip_frac counted only PPO's clipped branch (about half of them)."""
    logp = torch.log(torch.tensor([[2.0, 0.5, 1.0, 4.0]], device=device))  # ratios, old = 0
    adv = torch.tensor([[-1.0, 1.0, 1.0, 1.0]], device=device)
    mask = torch.ones_like(logp, dtype=torch.bool)
    _, m = call_policy_loss(logp, torch.zeros_like(logp), adv, mask, loss="cispo",
                            impl="torch")
    assert float(m["clip_frac"]) == 0.75  # ratios 2, 0.5, 4 are truncated; 1 is not


@settings(max_examples=40, deadline=None)
@given(case=random_cases())
def test_random_cases_match_fp64(case):
    batch, kw = case
    assert_matches(run_op(batch, "torch", **kw), run_naive(batch, **kw), atol=2e-6)


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 4), L=st.integers(1, 9), seed=st.integers(0, 999),
       loss=st.sampled_from(["ppo", "gspo"]), agg=st.sampled_from(AGGREGATIONS))
def test_on_policy_property(B, L, seed, loss, agg):
    """old == logp: every ratio is 1, nothing is clipped, and d loss/d logp = -A m w / norm."""
    batch = make_batch(B, L, seed=seed, adv_per_token=True)
    batch["old"] = batch["logp"].clone()
    value, grad, metrics = run_op(batch, "torch", loss=loss, agg=agg)
    assert float(metrics["clip_frac"]) == 0.0
    if float(metrics["num_tokens"]) > 0:
        assert float(metrics["ratio_min"]) == float(metrics["ratio_max"]) == 1.0
    m = batch["mask"].double()
    cnt = m.sum(-1, keepdim=True)
    w = torch.where(cnt > 0, 1 / cnt.clamp_min(1), 0.0) if agg == "seq-mean-token-mean" \
        else torch.ones_like(cnt)
    norm = {"token-mean": max(float(m.sum()), 1.0), "seq-mean-token-sum": B,
            "seq-mean-token-mean": B, "seq-mean-token-sum-norm": B * L}[agg]
    want = -batch["adv"].double() * m * w / norm
    torch.testing.assert_close(grad.double(), want, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(value.double(), want.sum(), atol=1e-7, rtol=1e-6)


def test_auto_is_torch_on_cpu():
    batch = make_batch(2, 5)
    kw = grid_kwargs(("gspo", None), None, "k2", "token-mean", batch)
    a, b = run_op(batch, "auto", **kw), run_op(batch, "torch", **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("adv_per_token", [False, True])
def test_packed_equals_padded(variant, agg, adv_per_token, device):
    batch = make_batch(4, 11, seed=3, device=device, adv_per_token=adv_per_token)
    padded, packed, cu, longest, keep = to_packed(batch)
    kw = grid_kwargs(variant, 2.0, "k3+", agg, padded)
    want = run_op(padded, "torch", max_len=longest, **kw)
    kw_p = grid_kwargs(variant, 2.0, "k3+", agg, packed)
    got = run_op(packed, "torch", cu_seqlens=cu, **kw_p)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], want[1][keep], atol=1e-6, rtol=1e-6)
    for k in METRICS:
        torch.testing.assert_close(got[2][k], want[2][k], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_global_normalizer_two_ranks(variant, agg, device, impl="torch"):
    check_two_ranks(variant, agg, device, impl)


# ----------------------------------------------------------------------------- edge cases

@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("loss", ["ppo", "gspo", "cispo"])
def test_everything_masked(agg, loss, device, impl="torch"):
    check_everything_masked(agg, loss, device, impl)


@pytest.mark.parametrize("variant", VARIANTS)
def test_junk_in_padding_is_ignored(variant, device, impl="torch"):
    check_junk_in_padding(variant, device, impl)


@pytest.mark.parametrize("variant", VARIANTS)
def test_nan_on_a_real_token_is_not_hidden(variant, device, impl="torch"):
    check_nan_on_a_real_token_is_not_hidden(variant, device, impl)


def test_clamps_match_fp64(device, impl="torch"):
    check_clamps(device, impl)


def test_low_precision_inputs(device):
    batch = make_batch(3, 9, seed=4, device=device)
    low = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in batch.items()}
    kw = grid_kwargs(("ppo", 3.0), 2.0, "k3", "token-mean", low)
    value, grad, _ = run_op(low, "torch", **kw)
    assert value.dtype == torch.float32 and grad.dtype == torch.bfloat16
    w_value, w_grad, _ = run_naive(low, **kw)  # fp64 of the same bf16 values
    torch.testing.assert_close(value.double().cpu(), w_value, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad.double().cpu(), w_grad, atol=1e-2, rtol=1e-2)  # bf16 grad


# gspo, cispo and k3+ use stop-gradients on purpose: their autograd gradient is not the
# derivative of the loss value, so finite differences apply to the other forms only.
@pytest.mark.parametrize("variant", [("ppo", None), ("ppo", 3.0)])
@pytest.mark.parametrize("kl", [None, "k1", "k2", "k3"])
def test_gradcheck_fp64_reference(variant, kl):
    batch = make_batch(3, 5, seed=9, empty_rows=(2,))
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}
    kw = grid_kwargs(variant, 2.0, kl, "seq-mean-token-mean", batch)

    def f(lp):
        return call_policy_loss(lp, batch["old"], batch["adv"], batch["mask"], impl="torch",
                                **kw)[0]

    assert torch.autograd.gradcheck(f, (batch["logp"].clone().requires_grad_(),), eps=1e-6,
                                    atol=1e-7)


def test_only_logp_gets_gradients():
    batch = make_batch(2, 4)
    leaves = {k: batch[k].clone().requires_grad_() for k in ("old", "ref", "roll", "adv")}
    logp = batch["logp"].clone().requires_grad_()
    value, _ = call_policy_loss(logp, leaves["old"], leaves["adv"], batch["mask"],
                           ref_logp=leaves["ref"], rollout_logp=leaves["roll"], tis_cap=2.0,
                           kl="k3", kl_coef=0.1, impl="torch")
    value.backward()
    assert logp.grad is not None and all(v.grad is None for v in leaves.values())


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,match", [
    ({"loss": "grpo"}, "loss must be one of"),
    ({"clip_low": 1.5}, r"clip_low must be in \[0.0, 1.0\]"),
    ({"clip_low": -0.1}, r"clip_low must be in \[0.0, 1.0\]"),
    ({"clip_high": -0.1}, r"clip_high must be in \[0.0, inf\]"),
    ({"clip_high": float("nan")}, "clip_high must be a finite float"),
    ({"dual_clip": 1.0}, r"dual_clip must be in \(1.0, inf\]"),
    ({"dual_clip": 3.0, "loss": "cispo"}, "dual_clip applies to loss='ppo' or 'gspo'"),
    ({"kl": "k4"}, "kl must be one of"),
    ({"kl": "low_var_kl"}, "kl='low_var_kl' is verl's name: here it is kl='k3'"),
    ({"kl_coef": -1.0, "kl": "k1"}, r"kl_coef must be in \[0.0, inf\]"),
    ({"kl_coef": 0.1}, "kl_coef=0.1 > 0 needs a KL estimator"),
    ({"agg": "mean"}, "agg must be one of"),
    ({"tis_cap": 0.0}, r"tis_cap must be in \(0.0, inf\]"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossConfig(**kwargs)
    batch = make_batch(2, 3)
    with pytest.raises(ValueError, match=match):
        call_policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"], **kwargs)


def _bad_cases():
    b = make_batch(2, 3)
    lp, old, adv, mask = b["logp"], b["old"], b["adv"], b["mask"]
    packed_cu = torch.tensor([0, 2, 6])
    flat = lp.reshape(-1)
    return [
        ((lp[0, 0], old, adv, mask), {}, r"logp must be 1-D or 2-D, got shape \(\)"),
        ((lp.long(), old, adv, mask), {}, "logp must have dtype in"),
        ((lp, old[:, :2], adv, mask), {}, r"old_logp must have shape \[2, 3\], got \[2, 2\]"),
        ((lp, old, adv, mask.to(torch.complex64)), {}, "mask must have dtype in"),  # (an
        # integer mask is taken as weights)
        ((lp, old, adv[:1], mask), {},
         r"advantages must have shape \[2\] \(one per sequence\) or \[2, 3\]"),
        ((lp, old, adv, mask), {"kl": "k3"}, "ref_logp is required when kl='k3'"),
        ((lp, old, adv, mask), {"kl": "k3", "ref_logp": old[:1]},
         r"ref_logp must have shape \[2, 3\]"),
        ((lp, old, adv, mask), {"rollout_logp": old}, "rollout_logp and tis_cap go together"),
        ((lp, old, adv, mask), {"tis_cap": 2.0}, "rollout_logp and tis_cap go together"),
        ((lp, old, adv, mask), {"tis_cap": 2.0, "rollout_logp": old.T},
         r"rollout_logp must have shape \[2, 3\]"),
        ((lp, old, adv, mask), {"cu_seqlens": packed_cu}, "cu_seqlens must be None for padded"),
        ((flat, flat, adv, flat > -1), {}, r"cu_seqlens \[B\+1\] is required"),
        ((flat, flat, adv, flat > -1), {"cu_seqlens": packed_cu.float()},
         "cu_seqlens must have dtype in"),
        ((flat, flat, adv, flat > -1), {"cu_seqlens": torch.tensor([0, 4, 2])},
         "cu_seqlens must be non-decreasing from 0 to N=6"),
        ((flat, flat, adv, flat > -1), {"cu_seqlens": torch.tensor([0, 2, 5])},
         "cu_seqlens must be non-decreasing from 0 to N=6"),
        ((flat, flat, adv, flat > -1), {"cu_seqlens": torch.tensor([1, 2, 6])},
         "cu_seqlens must be non-decreasing from 0 to N=6"),
        ((lp, old, adv, mask), {"max_len": 0}, r"max_len must be in \[1, inf\]"),
        ((lp, old, adv, mask), {"max_len": 2.5}, "max_len must be an int"),
        ((lp, old, adv, mask), {"global_normalizer": 0}, r"global_normalizer must be in \(0.0"),
        ((lp, old, adv, mask), {"global_normalizer": float("inf")},
         "global_normalizer must be a finite float"),
        ((lp, old, adv, mask), {"global_normalizer": torch.ones(2)},
         "global_normalizer must be a number or a 1-element tensor"),
        ((lp, old, adv, mask), {"impl": "fast"}, "impl must be one of"),
    ]


def test_config_is_an_object():
    b = make_batch(2, 3)
    with pytest.raises(ValueError, match="config must be a PolicyLossConfig, got dict"):
        policy_loss(b["logp"], b["old"], b["adv"], b["mask"], {"loss": "ppo"})
    with pytest.raises(TypeError):  # the options are no longer loose keywords
        policy_loss(b["logp"], b["old"], b["adv"], b["mask"], kl_coef=0.1)
    with pytest.raises(TypeError):  # kw_only: no positional construction
        PolicyLossConfig("ppo")


@pytest.mark.parametrize("agg,want", [("token-mean", 7.0), ("seq-mean-token-sum", 3),
                                      ("seq-mean-token-mean", 3),
                                      ("seq-mean-token-sum-norm", 15)])
def test_loss_denominator(agg, want):
    assert loss_denominator(agg, num_tokens=7.0, num_seqs=3, max_len=5) == want
    with pytest.raises(ValueError, match="agg must be one of"):
        loss_denominator("mean", num_tokens=7.0, num_seqs=3, max_len=5)


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs(case):
    args, kwargs, match = _bad_cases()[case]
    with pytest.raises(ValueError, match=match):
        call_policy_loss(*args, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal of impl='cuda'")
def test_unavailable_impl():
    b = make_batch(2, 3)
    with pytest.raises(ImplUnavailableError, match="policy_loss: impl='cuda'"):
        call_policy_loss(b["logp"], b["old"], b["adv"], b["mask"], impl="cuda")


def test_dr_grpo_on_packed_rows_under_compile_needs_its_lmax():
    """Under torch.compile, L_max cannot be read from cu_seqlens in the graph (a host sync),
    and the loss used to divide by B * 0 -> 1: 15x too large here, silently. Now the traced
    check raises: Dynamo runs that frame eagerly (right value), fullgraph=True is an error
    naming max_len, and with max_len the compiled loss equals the eager one."""
    cfg = PolicyLossConfig(agg="seq-mean-token-sum-norm")
    cu = torch.tensor([0, 3, 8, 10])
    lp = torch.randn(10, generator=torch.Generator().manual_seed(0)) - 2
    adv, mask = torch.tensor([1.0, -2.0, 0.5]), torch.ones(10)

    def loss(lp, max_len=None):
        return policy_loss(lp, lp.clone(), adv, mask, cfg, cu_seqlens=cu, max_len=max_len,
                           impl="torch")[0]

    want = -(3 * 1.0 + 5 * -2.0 + 2 * 0.5) / (3 * 5)
    assert float(loss(lp)) == pytest.approx(want)
    torch._dynamo.reset()
    assert float(torch.compile(loss, backend="aot_eager")(lp)) == pytest.approx(want)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="needs max_len"):
        torch.compile(loss, backend="aot_eager", fullgraph=True)(lp)
    torch._dynamo.reset()
    assert float(torch.compile(loss, backend="aot_eager")(lp, 5)) == pytest.approx(want)


def test_a_first_call_under_compile_traces_without_a_graph_break(monkeypatch):
    """The dispatch logs its choice once per op; inside a traced call that log line was a
    graph break (logging is not traceable): a compiled first call now traces in one graph."""
    from r1fast.ops import _dispatch

    monkeypatch.setattr(_dispatch, "_logged", set())  # as in a fresh process
    B, L = 3, 7
    lp = (torch.randn(B, L, generator=torch.Generator().manual_seed(0)) - 2).requires_grad_()
    adv, mask = torch.randn(B), torch.ones(B, L, dtype=torch.bool)
    cfg = PolicyLossConfig()

    def loss(lp):
        return policy_loss(lp, lp.detach() + 0.1, adv, mask, cfg, impl="auto")[0]

    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss)(lp)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
