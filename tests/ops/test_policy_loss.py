"""policy_loss (torch path) against a plain fp64 formula; layouts, data parallelism, bad input.

``naive_fp64`` below is DESIGN §3 transcribed literally, one Python loop per sequence and token,
differentiated by fp64 autograd; tests/ops/test_grpo_loss_triton.py reuses it for the Triton path.
"""
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1fast.ops._dispatch import ImplUnavailableError
from r1fast.ops.policy_loss import AGGREGATIONS, METRICS, PolicyLossConfig, policy_loss

# (loss, dual_clip) variants x TIS x KL x aggregation: the full grid of DESIGN §3
VARIANTS = [("ppo", None), ("ppo", 3.0), ("gspo", None), ("cispo", None)]
KLS = [None, "k1", "k2", "k3", "k3+"]
GRID = list(itertools.product(VARIANTS, [None, 2.0], KLS, AGGREGATIONS))
GRID_IDS = [f"{lo}{'-dual' if d else ''}-{'tis' if t else 'notis'}-{k}-{a}"
            for (lo, d), t, k, a in GRID]


def naive_fp64(logp, old, adv, mask, *, ref=None, roll=None, loss="ppo", clip_low=0.2,
               clip_high=0.2, dual_clip=None, kl=None, kl_coef=0.0, agg="token-mean",
               tis_cap=None, max_len=None, normalizer=None):
    """Padded [B, L] inputs -> (loss, d loss / d logp, metrics), all fp64 on the CPU."""
    lp = logp.detach().double().cpu().requires_grad_()
    old, adv, m = old.double().cpu(), adv.double().cpu(), mask.double().cpu()
    ref = None if ref is None else ref.double().cpu()
    roll = None if roll is None else roll.double().cpu()
    B, L = lp.shape
    lo, hi = 1 - clip_low, 1 + clip_high
    zero = torch.zeros((), dtype=torch.float64)
    total, pg_total, kl_total = zero, 0.0, 0.0
    n = clip = dual = ratio_sum = kl_raw = tis_sum = 0.0
    ratios = []
    for i in range(B):
        toks = [t for t in range(L) if m[i, t] != 0]
        w_i = sum(float(m[i, t]) for t in toks)
        if loss == "gspo" and toks:
            log_s = sum(m[i, t] * (lp[i, t] - old[i, t]) for t in toks) / w_i
            log_s = torch.clamp(log_s, -20, 20)
        seq, seq_pg, seq_kl = zero, 0.0, 0.0
        for t in toks:
            a = adv[i] if adv.dim() == 1 else adv[i, t]
            if loss == "gspo":
                ratio = torch.exp(log_s.detach() + lp[i, t] - lp[i, t].detach())
            else:
                ratio = torch.exp(torch.clamp(lp[i, t] - old[i, t], -20, 20))
            clipped = torch.clamp(ratio, lo, hi)
            if loss == "cispo":
                term = -clipped.detach() * a * lp[i, t]
            else:
                term = torch.max(-a * ratio, -a * clipped)
                if dual_clip is not None and a < 0:
                    term = torch.min(term, -dual_clip * a)
                    dual += float(m[i, t]) * float(ratio > dual_clip)
            if tis_cap is not None:
                w = min(math.exp(float(old[i, t] - roll[i, t])), tis_cap)
                term = term * w
                tis_sum += float(m[i, t]) * w
            seq_pg += float(m[i, t] * term.detach())
            if kl is not None:
                d = torch.clamp(ref[i, t] - lp[i, t], -20, 20)
                k2 = d * d / 2
                k3 = torch.clamp(torch.exp(d) - 1 - d, -10, 10)
                value = {"k1": -d, "k2": k2, "k3": k3,
                         "k3+": k3.detach() + k2 - k2.detach()}[kl]
                kl_raw += float(m[i, t] * value.detach())
                seq_kl += float(m[i, t] * kl_coef * value.detach())
                term = term + kl_coef * value
            seq = seq + m[i, t] * term
            n += float(m[i, t])
            r = float(ratio.detach())
            ratios.append(r)
            ratio_sum += float(m[i, t]) * r
            clip += float(m[i, t]) * float((a > 0 and r > hi) or (a < 0 and r < lo))
        if agg == "seq-mean-token-mean":
            if toks:
                seq, seq_pg, seq_kl = seq / w_i, seq_pg / w_i, seq_kl / w_i
            else:
                seq = zero
        total = total + seq
        pg_total += seq_pg
        kl_total += seq_kl
    if normalizer is None:
        normalizer = {"token-mean": n if n > 0 else 1.0, "seq-mean-token-sum": B,
                      "seq-mean-token-mean": B,
                      "seq-mean-token-sum-norm": B * (max_len or L)}[agg]
    value = total / normalizer
    if value.requires_grad:
        value.backward()
    grad = lp.grad if lp.grad is not None else torch.zeros_like(lp)  # no valid token at all
    avg = (lambda x: x / n) if n > 0 else (lambda x: 0.0)
    metrics = {"pg_loss": pg_total / normalizer, "kl_loss": kl_total / normalizer,
               "clip_frac": avg(clip), "dual_clip_frac": avg(dual), "kl_mean": avg(kl_raw),
               "ratio_min": min(ratios, default=1.0), "ratio_max": max(ratios, default=1.0),
               "ratio_mean": avg(ratio_sum) if n > 0 else 1.0,
               "tis_mean": (avg(tis_sum) if n > 0 else 1.0) if tis_cap is not None else 1.0,
               "num_tokens": n}
    return value.detach(), grad, metrics


def make_batch(B, L, *, seed=0, device="cpu", adv_per_token=False, empty_rows=(),
               float_mask=False, scale=0.4):
    """Random padded batch; a few tokens get large ratio offsets so every clip branch (and the
    dual clip at c=3) is taken."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, L, generator=g) * 4 - 0.05
    old = logp + torch.randn(B, L, generator=g) * scale
    big = torch.rand(B, L, generator=g) < 0.15
    old = torch.where(big, old - 1.6, old)  # ratio ~ e^1.6 ~ 5 > dual clip 3
    ref = logp + torch.randn(B, L, generator=g) * scale
    roll = old + torch.randn(B, L, generator=g) * scale
    adv = torch.randn((B, L) if adv_per_token else (B,), generator=g)
    if float_mask:
        mask = torch.rand(B, L, generator=g) * (torch.rand(B, L, generator=g) > 0.3)
    else:
        mask = torch.rand(B, L, generator=g) > 0.25
    for r in empty_rows:
        if r < B:
            mask[r] = 0
    out = dict(logp=logp, old=old, ref=ref, roll=roll, adv=adv, mask=mask)
    return {k: v.to(device) for k, v in out.items()}


def grid_kwargs(variant, tis, kl, agg, batch):
    loss, dual = variant
    return dict(loss=loss, dual_clip=dual, kl=kl, kl_coef=0.3 if kl else 0.0, agg=agg,
                tis_cap=tis, ref_logp=batch["ref"] if kl else None,
                rollout_logp=batch["roll"] if tis else None)


def run_op(batch, impl, **kw):
    """policy_loss on ``batch`` -> (loss, grad w.r.t. logp, metrics)."""
    logp = batch["logp"].clone().requires_grad_()
    value, metrics = policy_loss(logp, batch["old"], batch["adv"], batch["mask"], impl=impl, **kw)
    value.backward()
    return value.detach(), logp.grad, metrics


def run_naive(batch, **kw):
    kw = dict(kw)
    ref, roll = kw.pop("ref_logp", None), kw.pop("rollout_logp", None)
    kw["normalizer"] = kw.pop("global_normalizer", None)
    kw.pop("cu_seqlens", None)
    return naive_fp64(batch["logp"], batch["old"], batch["adv"], batch["mask"], ref=ref,
                      roll=roll, **kw)


def assert_matches(got, want, atol=1e-6, rtol=1e-6):
    value, grad, metrics = got
    w_value, w_grad, w_metrics = want
    torch.testing.assert_close(value.double().cpu(), w_value.double(), atol=atol, rtol=rtol)
    torch.testing.assert_close(grad.double().cpu(), w_grad.double().reshape(grad.shape),
                               atol=atol, rtol=rtol)
    assert set(metrics) == set(METRICS)
    for k in METRICS:
        w = w_metrics[k]
        w = torch.as_tensor(w, dtype=torch.float64)
        torch.testing.assert_close(metrics[k].double().cpu(), w, atol=atol, rtol=rtol,
                                   msg=lambda s, k=k: f"metric {k}: {s}")
        assert not metrics[k].requires_grad


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
    value, m = policy_loss(logp, old, adv, mask, dual_clip=3.0, impl="torch")
    # token losses: -1*min(2,1.2)=-1.2; 1*max(0.5,0.8)=0.8; -1; min(1*4, 3) = 3
    torch.testing.assert_close(value.cpu(), torch.tensor((-1.2 + 0.8 - 1 + 3) / 4))
    assert float(m["clip_frac"]) == 0.5  # tokens 0 (A>0, r>1.2) and 1 (A<0, r<0.8)
    assert float(m["dual_clip_frac"]) == 0.25  # token 3 (A<0, r>3)
    torch.testing.assert_close(m["ratio_min"].cpu(), torch.tensor(0.5))
    torch.testing.assert_close(m["ratio_max"].cpu(), torch.tensor(4.0))
    torch.testing.assert_close(m["ratio_mean"].cpu(), torch.tensor(7.5 / 4))


@st.composite
def random_cases(draw):
    """A random configuration on a random small batch (shapes, empty rows, mask kind)."""
    B, L = draw(st.integers(1, 5)), draw(st.integers(1, 12))
    variant = draw(st.sampled_from(VARIANTS))
    kw = dict(clip_low=draw(st.sampled_from([0.0, 0.2, 0.5])),
              clip_high=draw(st.sampled_from([0.0, 0.28, 1.0])))
    batch = make_batch(B, L, seed=draw(st.integers(0, 2**16)),
                       adv_per_token=draw(st.booleans()), float_mask=draw(st.booleans()),
                       empty_rows=draw(st.lists(st.integers(0, B - 1), max_size=2)))
    kw.update(grid_kwargs(variant, draw(st.sampled_from([None, 1.5])), draw(st.sampled_from(KLS)),
                          draw(st.sampled_from(AGGREGATIONS)), batch))
    return batch, kw


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

def to_packed(batch):
    """Drop the padding: keep each row's first len_i positions (len_i = its valid span)."""
    B, L = batch["mask"].shape
    g = torch.Generator().manual_seed(5)
    lens = torch.randint(0, L + 1, (B,), generator=g).tolist()
    lens[0] = 0  # an empty sequence in the packed layout too
    keep = torch.zeros(B, L, dtype=torch.bool)
    for i, n in enumerate(lens):
        keep[i, :n] = True
    keep = keep.to(batch["mask"].device)
    padded = dict(batch)
    padded["mask"] = batch["mask"] & keep if batch["mask"].dtype == torch.bool \
        else batch["mask"] * keep
    packed = {k: (v[keep] if v.dim() == 2 else v) for k, v in padded.items()}
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), device=keep.device)
    return padded, packed, cu, max(lens), keep


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


def split_ranks(batch, rows):
    return {k: (v[rows] if v.shape[0] == batch["mask"].shape[0] else v)
            for k, v in batch.items()}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_global_normalizer_two_ranks(variant, agg, device, impl="torch"):
    check_two_ranks(variant, agg, device, impl)


def check_two_ranks(variant, agg, device, impl):
    """Split 5 sequences over two 'ranks' (3 + 2); with the global normaliser the summed losses
    and gradients equal the single-process ones."""
    batch = make_batch(5, 6, seed=11, device=device, empty_rows=(4,))
    kw = grid_kwargs(variant, 2.0, "k3", agg, batch)
    whole = run_op(batch, impl, **kw)
    norm = {"token-mean": float((batch["mask"] != 0).sum()), "seq-mean-token-sum": 5,
            "seq-mean-token-mean": 5, "seq-mean-token-sum-norm": 5 * 6}[agg]
    parts = []
    for rows in (slice(0, 3), slice(3, 5)):
        local = split_ranks(batch, rows)
        kw_local = grid_kwargs(variant, 2.0, "k3", agg, local)
        parts.append(run_op(local, impl, global_normalizer=norm, **kw_local))
    torch.testing.assert_close(parts[0][0] + parts[1][0], whole[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), whole[1], atol=1e-6,
                               rtol=1e-6)
    for k in ("pg_loss", "kl_loss"):
        torch.testing.assert_close(parts[0][2][k] + parts[1][2][k], whole[2][k], atol=1e-6,
                                   rtol=1e-6)
    # a tensor normaliser (e.g. an all-reduced count) gives the same local loss
    local = split_ranks(batch, slice(0, 3))
    t = run_op(local, impl, global_normalizer=torch.tensor(norm, device=device),
               **grid_kwargs(variant, 2.0, "k3", agg, local))
    torch.testing.assert_close(t[0], parts[0][0])


# ----------------------------------------------------------------------------- edge cases

@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("loss", ["ppo", "gspo", "cispo"])
def test_everything_masked(agg, loss, device, impl="torch"):
    check_everything_masked(agg, loss, device, impl)


def check_everything_masked(agg, loss, device, impl):
    batch = make_batch(2, 5, device=device, empty_rows=(0, 1))
    value, grad, metrics = run_op(batch, impl, loss=loss, agg=agg, kl="k3", kl_coef=0.1,
                                  ref_logp=batch["ref"])
    assert float(value) == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    assert all(torch.isfinite(v) for v in metrics.values())
    assert float(metrics["ratio_mean"]) == 1.0 and float(metrics["clip_frac"]) == 0.0


@pytest.mark.parametrize("variant", VARIANTS)
def test_junk_in_padding_is_ignored(variant, device, impl="torch"):
    check_junk_in_padding(variant, device, impl)


def check_junk_in_padding(variant, device, impl):
    batch = make_batch(3, 8, seed=2, device=device, adv_per_token=True, empty_rows=(1,))
    kw = grid_kwargs(variant, 2.0, "k3", "token-mean", batch)
    clean = run_op(batch, impl, **kw)
    dirty = dict(batch)
    pad = batch["mask"] == 0
    for k, junk in (("logp", float("-inf")), ("old", float("nan")), ("ref", float("inf")),
                    ("roll", float("nan")), ("adv", float("nan"))):
        dirty[k] = batch[k].masked_fill(pad, junk)
    got = run_op(dirty, impl, **grid_kwargs(variant, 2.0, "k3", "token-mean", dirty))
    assert torch.equal(got[0], clean[0]) and torch.equal(got[1], clean[1])
    assert torch.equal(got[1][pad], torch.zeros_like(got[1][pad]))


def test_clamps_match_fp64(device, impl="torch"):
    check_clamps(device, impl)


def check_clamps(device, impl):
    """|logp - old| > 20 (ratio clamp, zero gradient) and |ref - logp| > 20 / k3 > 10."""
    logp = torch.tensor([[-1.0, -30.0, -2.0, -0.5, -25.0, -3.0]], device=device)
    old = torch.tensor([[-25.0, -1.0, -2.5, -0.4, -24.0, -3.1]], device=device)
    ref = torch.tensor([[-30.0, -1.0, 1.0, -0.5, -2.0, -3.0]], device=device)
    adv = torch.tensor([[-0.5, -1.0, 0.7, 1.0, 2.0, -0.3]], device=device)
    batch = dict(logp=logp, old=old, ref=ref, roll=old, adv=adv,
                 mask=torch.ones_like(logp, dtype=torch.bool))
    for kl in ("k1", "k2", "k3", "k3+"):
        for loss in ("ppo", "cispo"):
            kw = dict(loss=loss, kl=kl, kl_coef=0.5, ref_logp=ref, clip_high=1e9)
            got = run_op(batch, impl, **kw)
            want = run_naive(batch, **kw)
            assert_matches(got, want, rtol=1e-6, atol=1e-6 * max(1.0, float(want[0].abs())))


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
        return policy_loss(lp, batch["old"], batch["adv"], batch["mask"], impl="torch", **kw)[0]

    assert torch.autograd.gradcheck(f, (batch["logp"].clone().requires_grad_(),), eps=1e-6,
                                    atol=1e-7)


def test_only_logp_gets_gradients():
    batch = make_batch(2, 4)
    leaves = {k: batch[k].clone().requires_grad_() for k in ("old", "ref", "roll", "adv")}
    logp = batch["logp"].clone().requires_grad_()
    value, _ = policy_loss(logp, leaves["old"], leaves["adv"], batch["mask"],
                           ref_logp=leaves["ref"], rollout_logp=leaves["roll"], tis_cap=2.0,
                           kl="k3", kl_coef=0.1, impl="torch")
    value.backward()
    assert logp.grad is not None and all(v.grad is None for v in leaves.values())


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,match", [
    ({"loss": "grpo"}, "loss must be one of"),
    ({"clip_low": 1.0}, r"clip_low must be in \[0.0, 1.0\)"),
    ({"clip_low": -0.1}, r"clip_low must be in \[0.0, 1.0\)"),
    ({"clip_high": -0.1}, r"clip_high must be in \[0.0, inf\]"),
    ({"clip_high": float("nan")}, "clip_high must be a finite float"),
    ({"dual_clip": 1.0}, r"dual_clip must be in \(1.0, inf\]"),
    ({"dual_clip": 3.0, "loss": "cispo"}, "dual_clip applies to loss='ppo' or 'gspo'"),
    ({"kl": "k4"}, "kl must be one of"),
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
        policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"], **kwargs)


def _bad_cases():
    b = make_batch(2, 3)
    lp, old, adv, mask = b["logp"], b["old"], b["adv"], b["mask"]
    packed_cu = torch.tensor([0, 2, 6])
    flat = lp.reshape(-1)
    return [
        ((lp[0, 0], old, adv, mask), {}, r"logp must be 1-D or 2-D, got shape \(\)"),
        ((lp.long(), old, adv, mask), {}, "logp must have dtype in"),
        ((lp, old[:, :2], adv, mask), {}, r"old_logp must have shape \[2, 3\], got \[2, 2\]"),
        ((lp, old, adv, mask.long()), {}, "mask must have dtype in"),
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


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs(case):
    args, kwargs, match = _bad_cases()[case]
    with pytest.raises(ValueError, match=match):
        policy_loss(*args, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal of impl='cuda'")
def test_unavailable_impl():
    b = make_batch(2, 3)
    with pytest.raises(ImplUnavailableError, match="policy_loss: impl='cuda'"):
        policy_loss(b["logp"], b["old"], b["adv"], b["mask"], impl="cuda")
