"""Shared cases of the policy-loss tests (torch path and Triton path use the same ones).

``naive_fp64`` is docs/DESIGN.md §3 transcribed literally, one Python loop per sequence and
token, differentiated by fp64 autograd; ``make_batch`` draws batches that reach every clip
branch; the ``check_*`` functions are case bodies that tests/ops/test_policy_loss.py runs on the
torch path and tests/ops/test_grpo_loss_triton.py on the Triton path.
"""
import dataclasses
import itertools
import math

import torch
from hypothesis import strategies as st

from r1fast.ops.policy_loss import AGGREGATIONS, METRICS, PolicyLossConfig, policy_loss

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(PolicyLossConfig)}


def call_policy_loss(*tensors, **kw):
    """``policy_loss`` with the config's fields given as keywords (the grid's form): they are
    gathered into the :class:`PolicyLossConfig` the op takes."""
    options = {k: kw.pop(k) for k in list(kw) if k in _CONFIG_FIELDS}
    return policy_loss(*tensors, PolicyLossConfig(**options), **kw)


# (loss, dual_clip) variants x TIS x KL x aggregation: the full grid of docs/DESIGN.md §3
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
            truncated = (r > hi or r < lo) if loss == "cispo" else \
                ((a > 0 and r > hi) or (a < 0 and r < lo))  # cispo: the weight, any sign of A
            clip += float(m[i, t]) * float(truncated)
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
    value, metrics = call_policy_loss(logp, batch["old"], batch["adv"], batch["mask"], impl=impl,
                                      **kw)
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


def split_ranks(batch, rows):
    return {k: (v[rows] if v.shape[0] == batch["mask"].shape[0] else v)
            for k, v in batch.items()}


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


def check_everything_masked(agg, loss, device, impl):
    batch = make_batch(2, 5, device=device, empty_rows=(0, 1))
    value, grad, metrics = run_op(batch, impl, loss=loss, agg=agg, kl="k3", kl_coef=0.1,
                                  ref_logp=batch["ref"])
    assert float(value) == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    assert all(torch.isfinite(v) for v in metrics.values())
    assert float(metrics["ratio_mean"]) == 1.0 and float(metrics["clip_frac"]) == 0.0


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


def check_nan_on_a_real_token_is_not_hidden(variant, device, impl):
    """A NaN log-prob (current, old, reference or rollout) on a token the mask counts makes
    the loss NaN on every path, so the trainer's non-finite guard sees a diverged policy (a
    clamp that drops NaN, as tl.maximum does by default, would turn it into a finite loss)."""
    batch = make_batch(2, 6, seed=3, device=device, adv_per_token=True)
    batch["mask"][:, :] = True
    for key in ("logp", "old", "ref", "roll"):
        bad = dict(batch)
        bad[key] = batch[key].clone()
        bad[key][1, 2] = float("nan")
        value, _, metrics = run_op(bad, impl, **grid_kwargs(variant, 2.0, "k3", "token-mean",
                                                           bad))
        assert value.isnan(), (key, float(value))
        if key in ("logp", "old") and variant[0] != "gspo":  # the token's own ratio
            assert math.isnan(float(metrics["ratio_min"])), key


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
