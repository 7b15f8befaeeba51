"""fused_linear_policy_loss against fp64 full logits + the fp64 reference loss.

The reference here materialises ``[T, V]`` logits in fp64 (``log_softmax`` then gather), feeds
them to ``policy_loss`` on its fp64 torch path and backpropagates to fp64 copies of ``hidden``
and ``weight``. The fused op (fp32, torch and Triton paths) must match loss, metrics and both
gradients.
"""
from __future__ import annotations

import importlib
import math
import os
import re
import sys

import pytest
import torch
import torch.distributed as dist

from r1fast.ops._dispatch import triton_missing
from r1fast.ops.fused_linear_policy_loss import fused_linear_policy_loss
from r1fast.ops.policy_loss import METRICS, PolicyLossConfig, policy_loss
from tests.helpers.spawn import run_gloo

IMPLS = ["torch", "triton"]
CONFIGS = [
    PolicyLossConfig(loss="ppo", dual_clip=3.0, kl="k3", kl_coef=0.2, tis_cap=2.0),
    PolicyLossConfig(loss="gspo", clip_low=3e-4, clip_high=4e-4, agg="seq-mean-token-mean"),
    PolicyLossConfig(loss="cispo", clip_high=0.28, kl="k3+", kl_coef=0.1,
                     agg="seq-mean-token-sum-norm"),
]
TAU = 0.8


def make_inputs(B, L, H, V, *, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2.0 / math.sqrt(H))
    targets = torch.randint(0, V, (B, L), generator=g)
    mask = torch.rand(B, L, generator=g) > 0.2
    if B > 1:
        mask[1] = False  # an empty sequence
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T / TAU, -1).gather(-1, targets[..., None])[..., 0]
    old = logp + torch.randn(B, L, generator=g) * 0.3
    ref = logp + torch.randn(B, L, generator=g) * 0.3
    roll = old + torch.randn(B, L, generator=g) * 0.3
    adv = torch.randn(B, generator=g)
    targets = torch.where(mask, targets, torch.full_like(targets, -1))  # junk ids in padding
    out = dict(hidden=hidden.to(dtype), weight=weight.to(dtype), targets=targets, old=old,
               ref=ref, roll=roll, adv=adv, mask=mask)
    return {k: v.to(device) for k, v in out.items()}


def pack(inp, keep):
    """The per-token inputs of ``make_inputs(B, L, ...)`` packed to ``[T]``: the positions
    where ``keep [B, L]`` is True, row after row; weight and advantages as they are."""
    return {k: (v[keep] if k not in ("weight", "adv") else v) for k, v in inp.items()}


def _every_position_packed(inp):
    """``inp`` of ``make_inputs(3, 5, ...)`` with every position packed, and its cu_seqlens."""
    keep = torch.ones(3, 5, dtype=torch.bool, device=inp["mask"].device)
    return pack(inp, keep), torch.tensor([0, 5, 10, 15], device=keep.device)


def reference_fp64(inp, config, cu_seqlens=None, entropy=False, tau=TAU):
    """fp64 full logits -> logp (and entropy) -> fp64 reference loss; grads of hidden, weight.
    ``tau``: one float, or one per token (shaped like the targets)."""
    x = inp["hidden"].double().reshape(-1, inp["hidden"].shape[-1]).requires_grad_()
    w = inp["weight"].double().requires_grad_()
    if isinstance(tau, torch.Tensor):
        tau = tau.double().reshape(-1, 1)  # [T, 1]
    logits = x @ w.T / tau  # [T, V]
    logz = torch.log_softmax(logits, -1)
    tgt = inp["targets"].reshape(-1).clamp_min(0)  # padding ids are masked out below
    logp = logz.gather(-1, tgt[:, None])[:, 0].reshape(inp["targets"].shape)
    loss, metrics = policy_loss(
        logp, inp["old"].double(), inp["adv"].double(), inp["mask"], config,
        ref_logp=inp["ref"].double(),
        rollout_logp=inp["roll"].double() if config.tis_cap is not None else None,
        cu_seqlens=cu_seqlens, impl="torch")
    loss.backward()
    if entropy:
        ent = -(logz.exp() * logz).sum(-1).detach()
        m = inp["mask"].reshape(-1).double()
        metrics["entropy_mean"] = (m * ent).sum() / m.sum()
    return loss.detach(), x.grad, w.grad, metrics


def run_fused(inp, config, impl, cu_seqlens=None, tau=TAU, **kw):
    x = inp["hidden"].clone().requires_grad_()
    w = inp["weight"].clone().requires_grad_()
    loss, metrics = fused_linear_policy_loss(
        x, w, inp["targets"], inp["old"], inp["adv"], inp["mask"], inp["ref"], config,
        rollout_logp=inp["roll"] if config.tis_cap is not None else None, temperature=tau,
        cu_seqlens=cu_seqlens, impl=impl, **kw)
    loss.backward()
    return loss.detach(), x.grad.reshape(-1, x.shape[-1]), w.grad, metrics


def assert_close_to_reference(got, want, atol=1e-5):
    torch.testing.assert_close(got[0].double(), want[0], atol=atol, rtol=1e-5)
    for name, a, b in (("d hidden", got[1], want[1]), ("d weight", got[2], want[2])):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double(), b, atol=atol * scale, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")
    for k in want[3]:
        torch.testing.assert_close(got[3][k].double(), want[3][k].double(), atol=atol,
                                   rtol=1e-5, msg=lambda m, k=k: f"metric {k}: {m}")


def _skip_if_no_triton(impl, device):
    if impl == "triton" and triton_missing(device) is not None:
        pytest.skip(str(triton_missing(device)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("config", CONFIGS, ids=["ppo-dual-k3-tis", "gspo-smtm", "cispo-k3+"])
def test_padded_matches_fp64(impl, config, device):
    _skip_if_no_triton(impl, device)
    inp = make_inputs(3, 5, 16, 37, seed=1, device=device)
    got = run_fused(inp, config, impl, return_entropy=True)
    want = reference_fp64(inp, config, entropy=True)
    assert set(got[3]) == set(METRICS) | {"entropy_mean"}
    assert_close_to_reference(got, want)


@pytest.mark.parametrize("impl", IMPLS)
def test_an_ignore_index_target_is_masked_whatever_the_mask(impl, device):
    """HF labels keep -100 where nothing is scored; with a mask taken from the attention mask
    those tokens used to count in the loss and its metrics with logp 0."""
    _skip_if_no_triton(impl, device)
    inp = make_inputs(3, 5, 16, 37, seed=1, device=device)
    hf = dict(inp, targets=torch.where(inp["mask"], inp["targets"], -100),
              mask=torch.ones_like(inp["mask"]))  # every token "attended"
    got, want = run_fused(hf, CONFIGS[0], impl), run_fused(inp, CONFIGS[0], impl)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    for k in want[3]:
        torch.testing.assert_close(got[3][k], want[3][k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_matches_fp64_and_padded(impl, device):
    _skip_if_no_triton(impl, device)
    config = CONFIGS[0]
    inp = make_inputs(3, 5, 16, 37, seed=2, device=device)
    lens = [5, 0, 3]
    keep = torch.arange(5, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
    packed = pack(inp, keep)
    cu = torch.tensor([0, 5, 5, 8], device=device)
    got = run_fused(packed, config, impl, cu_seqlens=cu)
    assert_close_to_reference(got, reference_fp64(packed, config, cu_seqlens=cu))
    padded = dict(inp, mask=inp["mask"] & keep)
    want = run_fused(padded, config, impl)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], want[1][keep.reshape(-1)], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[2], want[2], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_global_normalizer_two_ranks(impl, device):
    """Two data-parallel 'ranks' with the global normaliser: summed losses and gradients equal
    the single-process ones."""
    _skip_if_no_triton(impl, device)
    config = PolicyLossConfig(kl="k3", kl_coef=0.1)
    inp = make_inputs(4, 5, 8, 29, seed=3, device=device)
    whole = run_fused(inp, config, impl)
    n = float(inp["mask"].sum())
    parts = [run_fused({k: (v[rows] if k not in ("weight",) else v) for k, v in inp.items()},
                       config, impl, global_normalizer=n)
             for rows in (slice(0, 1), slice(1, 4))]
    torch.testing.assert_close(parts[0][0] + parts[1][0], whole[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), whole[1], atol=1e-6,
                               rtol=1e-5)
    torch.testing.assert_close(parts[0][2] + parts[1][2], whole[2], atol=1e-6, rtol=1e-5)


def test_low_precision_hidden(device):
    inp = make_inputs(2, 4, 16, 33, seed=4, device=device, dtype=torch.bfloat16)
    got = run_fused(inp, CONFIGS[0], "torch")
    assert got[0].dtype == torch.float32
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    want = reference_fp64(inp, CONFIGS[0])  # fp64 of the same bf16 values
    torch.testing.assert_close(got[0].double(), want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2].double(), want[2], atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------- active rows

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_active_rows_skip_masked_rows_with_the_same_result(impl, packed, device, monkeypatch):
    """Only the N rows with a nonzero mask reach the LM head; loss, metrics (entropy too) and
    both gradients are those of the full computation, and masked rows get no gradient."""
    flpl = sys.modules[fused_linear_policy_loss.__module__]  # r1fast.ops re-exports the name
    _skip_if_no_triton(impl, device)
    inp = make_inputs(3, 5, 16, 37, seed=5, device=device)
    kw = {}
    if packed:
        inp, kw["cu_seqlens"] = _every_position_packed(inp)
    config = CONFIGS[0]
    want = run_fused(inp, config, impl, return_entropy=True, **kw)
    rows_seen = []
    real = flpl.linear_logprob
    monkeypatch.setattr(flpl, "linear_logprob",
                        lambda h, *a, **k: rows_seen.append(h.shape[0]) or real(h, *a, **k))
    rows = inp["mask"].reshape(-1).nonzero().squeeze(1)
    got = run_fused(inp, config, impl, return_entropy=True, active_rows=rows, **kw)
    assert rows_seen == [rows.numel()] and 0 < rows.numel() < 15
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[2], want[2], atol=1e-6, rtol=1e-6)
    for k in want[3]:
        torch.testing.assert_close(got[3][k], want[3][k], atol=1e-6, rtol=1e-6)
    masked = ~inp["mask"].reshape(-1)
    assert got[1][masked].abs().max() == 0


def test_active_rows_that_are_not_the_mask_are_refused(device):
    inp = make_inputs(2, 3, 8, 11, device=device)
    args = (inp["hidden"], inp["weight"], inp["targets"], inp["old"], inp["adv"], inp["mask"])
    rows = inp["mask"].reshape(-1).nonzero().squeeze(1)
    with pytest.raises(ValueError, match="active_rows must be the .* increasing flat indices"):
        fused_linear_policy_loss(*args, active_rows=rows[:-1])
    with pytest.raises(ValueError, match="active_rows must be the .* increasing flat indices"):
        fused_linear_policy_loss(*args, active_rows=rows.flip(0))
    with pytest.raises(ValueError, match="active_rows must have dtype in"):
        fused_linear_policy_loss(*args, active_rows=rows.float())


# ----------------------------------------------------------------------------- grad in forward

@pytest.fixture
def small_chunks(monkeypatch):
    """A workspace of 4 x 37 logits and 4 x 37 dz elements: the in-forward gradient runs in
    chunks of 2 rows, and takes one dx and one dW GEMM per group of 4 rows (2 chunks)."""
    import dataclasses

    grad_mod = sys.modules["r1fast.ops.fused_linear_policy_grad"]
    monkeypatch.setattr(grad_mod, "DEFAULT_CHUNKS", dataclasses.replace(
        grad_mod.DEFAULT_CHUNKS, triton_workspace=4 * 37, grad_in_forward_dz=4 * 37))


@pytest.mark.parametrize("config", CONFIGS[:1] + CONFIGS[2:] + [
    PolicyLossConfig(loss="ppo", kl="k1", kl_coef=0.3, agg="seq-mean-token-mean")],
    ids=["ppo-dual-k3-tis", "cispo-k3+-drgrpo", "ppo-k1-smtm"])
@pytest.mark.parametrize("layout", ["padded", "packed", "active-rows"])
def test_grad_in_forward_equals_the_recompute_path(config, layout, device, small_chunks):
    """Same loss, metrics (entropy too) and gradients as the logits recomputed in the
    backward, and both within fp64's; chunks of 2 rows, so a chunk's gradient is taken while
    later rows still hold placeholders."""
    _skip_if_no_triton("triton", device)
    inp = make_inputs(3, 5, 16, 37, seed=6, device=device)
    kw = dict(return_entropy=True)
    if layout != "padded":
        inp, kw["cu_seqlens"] = _every_position_packed(inp)
    if layout == "active-rows":
        kw["active_rows"] = inp["mask"].reshape(-1).nonzero().squeeze(1)
    want = run_fused(inp, config, "triton", **kw)
    got = run_fused(inp, config, "triton", grad_in_forward=True, **kw)
    for a, b, name in zip(got[:3], want[:3], ("loss", "d hidden", "d weight")):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    for k in want[3]:
        torch.testing.assert_close(got[3][k], want[3][k], atol=1e-6, rtol=1e-5)
    ref = reference_fp64(inp, config, cu_seqlens=kw.get("cu_seqlens"), entropy=True)
    assert_close_to_reference(got, ref)


@pytest.mark.parametrize("impl,in_forward", [("torch", False), ("triton", False),
                                              ("triton", True)])
@pytest.mark.parametrize("layout", ["padded", "active-rows"])
def test_per_sample_temperature_matches_fp64(impl, in_forward, layout, device, small_chunks):
    """One temperature per sample, repeated over its tokens; 0 (invalid) on masked positions,
    which must not matter. Loss, metrics (entropy too) and both gradients against fp64; the
    in-forward gradient runs chunks of 2 rows, each with its own slice of temperatures."""
    _skip_if_no_triton(impl, device)
    config = CONFIGS[0]
    inp = make_inputs(3, 5, 16, 37, seed=8, device=device)
    tau = torch.tensor([0.6, 1.0, 1.7], device=device)[:, None].expand(3, 5)  # [B, L]
    kw = dict(return_entropy=True, grad_in_forward=in_forward)
    if layout == "active-rows":
        kw["active_rows"] = inp["mask"].reshape(-1).nonzero().squeeze(1)
    got = run_fused(inp, config, impl, tau=torch.where(inp["mask"], tau, 0.0), **kw)
    assert_close_to_reference(got, reference_fp64(inp, config, entropy=True, tau=tau))


def test_a_temperature_tensor_must_be_shaped_like_the_targets(device):
    inp = make_inputs(2, 3, 8, 11, device=device)
    args = (inp["hidden"], inp["weight"], inp["targets"], inp["old"], inp["adv"], inp["mask"])
    with pytest.raises(ValueError, match=r"temperature must have shape \[2, 3\], got \[2\]"):
        fused_linear_policy_loss(*args, temperature=torch.ones(2, device=device))
    with pytest.raises(ValueError, match=r"temperature must have dtype in \(float32"):
        fused_linear_policy_loss(*args, temperature=torch.ones(2, 3, dtype=torch.int64,
                                                               device=device))


@pytest.mark.parametrize("in_forward", [False, True], ids=["recompute", "grad-in-forward"])
def test_a_zero_temperature_on_a_scored_token_is_named_in_debug_mode(in_forward, device,
                                                                      monkeypatch):
    _skip_if_no_triton("triton", device)
    monkeypatch.setenv("R1FAST_DEBUG_CHECKS", "1")
    inp = make_inputs(2, 3, 8, 11, device=device)
    inp["mask"] = torch.ones_like(inp["mask"])
    tau = torch.ones(2, 3, device=device)
    tau[0, 1] = 0.0
    with pytest.raises(ValueError, match=r"finite and > 0 .*temperature\[1\] = 0.0"):
        run_fused(inp, CONFIGS[0], "triton", tau=tau, grad_in_forward=in_forward)


def test_grad_in_forward_takes_one_dw_gemm_per_group(device, small_chunks, monkeypatch):
    """dW is accumulated once per group of chunks, not once per chunk (each accumulation
    re-reads and re-writes the fp32 [V, H] buffer): 15 rows in groups of 4 rows are 4 dW
    GEMMs, each over a group's rows, where chunks of 2 rows would be 8."""
    _skip_if_no_triton("triton", device)
    grad_mod = sys.modules["r1fast.ops.fused_linear_policy_grad"]
    assert (grad_mod.chunk_rows(15, 37), grad_mod.group_rows(15, 37)) == (2, 4)
    calls = []
    real = grad_mod._mm_fp32
    monkeypatch.setattr(grad_mod, "_mm_fp32",
                        lambda a, b: calls.append((tuple(a.shape), tuple(b.shape))) or real(a, b))
    inp = make_inputs(3, 5, 16, 37, seed=6, device=device)
    run_fused(inp, CONFIGS[0], "triton", grad_in_forward=True)
    dw_rows = [a[1] for a, b in calls if a[0] == 37]  # dz^T [V, rows] @ x [rows, H]
    dx_rows = [a[0] for a, b in calls if b == (37, 16)]  # dz [rows, V] @ W [V, H]
    assert dw_rows == [4, 4, 4, 3] and dx_rows == [4, 4, 4, 3]


def test_grad_in_forward_scales_with_the_upstream_gradient_and_takes_bf16(device, small_chunks):
    _skip_if_no_triton("triton", device)
    config = CONFIGS[0]
    inp = make_inputs(2, 4, 16, 37, seed=7, device=device, dtype=torch.bfloat16)
    grads = []
    for in_forward in (False, True):
        x = inp["hidden"].clone().requires_grad_()
        w = inp["weight"].clone().requires_grad_()
        loss, _ = fused_linear_policy_loss(x, w, inp["targets"], inp["old"], inp["adv"],
                                           inp["mask"], inp["ref"], config,
                                           rollout_logp=inp["roll"], temperature=TAU,
                                           impl="triton", grad_in_forward=in_forward)
        (loss * 3.0).backward()
        assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
        grads.append((x.grad.float(), w.grad.float()))
    for a, b in zip(*grads):  # one bf16 rounding each, of the same fp32 values x 3
        torch.testing.assert_close(a, b, atol=2e-2 * b.abs().max().item(), rtol=2e-2)


def test_grad_in_forward_refuses_what_it_cannot_do(device):
    inp = make_inputs(2, 3, 8, 11, device=device)
    args = (inp["hidden"], inp["weight"], inp["targets"], inp["old"], inp["adv"], inp["mask"])
    with pytest.raises(ValueError, match="grad_in_forward needs a token-level loss"):
        fused_linear_policy_loss(*args, None, PolicyLossConfig(loss="gspo"),
                                 grad_in_forward=True, impl="torch")
    with pytest.raises(ValueError, match="grad_in_forward runs on Triton row kernels"):
        fused_linear_policy_loss(*args, grad_in_forward=True, impl="torch")
    with pytest.raises(ValueError, match="tiles='fused' with grad_in_forward=True"):
        fused_linear_policy_loss(*args, tiles="fused", grad_in_forward=True, impl="triton")


@pytest.mark.parametrize("layout", ["padded", "active-rows"])
def test_gemm_tiles_match_fp64(layout, device, monkeypatch):
    """``tiles="gemm"`` reaches linear_logprob (a spy sees it) and gives the fp64 loss and
    gradients; torch has no such arrangement and says so."""
    _skip_if_no_triton("triton", device)
    # the package re-exports the function under the module's name: fetch the module itself
    op_module = importlib.import_module("r1fast.ops.fused_linear_policy_loss")
    inner, seen = op_module.linear_logprob, []

    def spy(*args, **kw):
        seen.append(kw["tiles"])
        return inner(*args, **kw)

    monkeypatch.setattr(op_module, "linear_logprob", spy)
    config = CONFIGS[0]
    inp = make_inputs(3, 5, 16, 37, seed=8, device=device)
    kw = dict(return_entropy=True)
    if layout == "active-rows":
        kw["active_rows"] = inp["mask"].reshape(-1).nonzero().squeeze(1)
    got = run_fused(inp, config, "triton", tiles="gemm", **kw)
    assert seen == ["gemm"]
    assert_close_to_reference(got, reference_fp64(inp, config, entropy=True))
    with pytest.raises(ValueError, match="tiles='gemm' is a way of running impl='triton'"):
        run_fused(inp, config, "torch", tiles="gemm")


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs(device, monkeypatch):
    monkeypatch.setenv("R1FAST_DEBUG_CHECKS", "1")  # the target-range check is debug-only
    inp = make_inputs(2, 3, 8, 11, device=device)
    args = (inp["hidden"], inp["weight"], inp["targets"], inp["old"], inp["adv"], inp["mask"])
    with pytest.raises(ValueError, match="config must be a PolicyLossConfig, got dict"):
        fused_linear_policy_loss(*args, None, {"loss": "ppo"})
    with pytest.raises(ValueError, match=r"hidden must be 2-D or 3-D, got shape \(8,\)"):
        fused_linear_policy_loss(inp["hidden"][0, 0], *args[1:])
    with pytest.raises(ValueError, match="cu_seqlens must be None when hidden is padded"):
        fused_linear_policy_loss(*args, cu_seqlens=torch.tensor([0, 3, 6], device=device))
    flat = [a.reshape(-1, *a.shape[2:]) if a.dim() >= 2 else a for a in args]
    with pytest.raises(ValueError, match=r"cu_seqlens \[B\+1\] is required when hidden is packed"):
        fused_linear_policy_loss(*flat)
    with pytest.raises(ValueError, match=r"targets must have shape \[2, 3\], got \[2, 2\]"):
        fused_linear_policy_loss(args[0], args[1], args[2][:, :2], *args[3:])
    with pytest.raises(ValueError, match="targets must have dtype in"):
        fused_linear_policy_loss(args[0], args[1], args[2].float(), *args[3:])
    with pytest.raises(ValueError, match=r"mask must have shape \[2, 3\]"):
        fused_linear_policy_loss(*args[:5], args[5][:1])
    with pytest.raises(ValueError, match=r"old_logp must have shape \[2, 3\]"):
        fused_linear_policy_loss(args[0], args[1], args[2], args[3][:, :1], *args[4:])
    with pytest.raises(ValueError, match="ref_logp is required when kl='k3'"):
        fused_linear_policy_loss(*args, None, PolicyLossConfig(kl="k3"))
    bad_targets = args[2].clone()
    bad_targets[0, 0] = 11  # a valid (masked-in) token outside the vocabulary
    mask = args[5].clone()
    mask[0, 0] = True
    with pytest.raises(ValueError, match=r"targets must be in \[0, 11\)"):
        fused_linear_policy_loss(args[0], args[1], bad_targets, *args[3:5], mask)


# ----------------------------------------------------------------------------- vocab parallel

WORLD = 2


def _tp_worker(rank: int, impl: str, in_forward: bool) -> None:
    if in_forward:  # chunks of 2 rows in groups of 4: dx all-reduced per group, dW added
        import dataclasses

        grad_mod = sys.modules["r1fast.ops.fused_linear_policy_grad"]
        grad_mod.DEFAULT_CHUNKS = dataclasses.replace(
            grad_mod.DEFAULT_CHUNKS, triton_workspace=4 * 17, grad_in_forward_dz=4 * 17)
    inp = make_inputs(3, 4, 8, 2 * 17, seed=5)  # same on every rank
    config = CONFIGS[0]
    full = run_fused(inp, config, impl, return_entropy=True)
    rows = slice(rank * 17, (rank + 1) * 17)
    shard = run_fused(dict(inp, weight=inp["weight"][rows].contiguous()), config, impl,
                      tp_group=dist.group.WORLD, return_entropy=True,
                      grad_in_forward=in_forward)
    torch.testing.assert_close(shard[0], full[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(shard[1], full[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shard[2], full[2][rows], atol=1e-5, rtol=1e-5)
    for k in full[3]:
        torch.testing.assert_close(shard[3][k], full[3][k], atol=1e-6, rtol=1e-6)
    # shards of unequal size used to score targets against the wrong rows, without a word
    uneven = inp["weight"][:17] if rank == 0 else inp["weight"][17:33]
    with pytest.raises(ValueError, match=re.escape("got [17, 16] rows per rank")):
        run_fused(dict(inp, weight=uneven.contiguous(), targets=inp["targets"].clamp(max=31)),
                  config, impl, tp_group=dist.group.WORLD, grad_in_forward=in_forward)


@pytest.mark.slow  # ~25 s: two spawned gloo processes, each importing torch
@pytest.mark.multiproc
@pytest.mark.parametrize("impl,in_forward", [("torch", False), ("triton", False),
                                             ("triton", True)])
def test_vocab_parallel_matches_unsharded(impl, in_forward, tmp_path):
    _skip_if_no_triton(impl, torch.device("cpu"))
    assert impl == "torch" or os.environ.get("TRITON_INTERPRET") == "1"
    run_gloo(WORLD, str(tmp_path / "store"), _tp_worker, impl, in_forward)
