"""The kernels at the shapes they are built for (issue #18, "GPU tests at real shapes").

On a GPU: linear_logprob at T=16384, H=4096, V=151936 bf16 (T*V > 2^31, the tuned tiles,
several vocabulary splits), checked against fp64 on sampled rows (logp, entropy, dx) and sampled
vocabulary rows (dW), with its extra memory; the GRPO loss over 20480 sequences and 50 launches
(bitwise identical, the completion ticket back at 0); routing at T=16384, E=256, k=8 with the
softmax and DeepSeek-V3 settings; permutation at E=256, k=8, H=4096 and 7168; the grouped
experts' forward and backward over 16384 routed rows at Qwen3-30B-A3B's expert sizes. A few
seconds each. On a CPU the same code runs at small shapes under the Triton interpreter, so CI keeps it
working; scripts/gpu_check.py runs this file in its tests stage.
"""
from __future__ import annotations

import math

import pytest
import torch

from r1fast.ops._dispatch import triton_missing
from r1fast.ops.linear_logprob import linear_logprob
from r1fast.ops.moe_permute import moe_permute, moe_unpermute
from r1fast.ops.moe_route import moe_route
from r1fast.ops.policy_loss import PolicyLossConfig, policy_loss
from tests.helpers.moe_route_cases import rows_agree_up_to_ties, selection_key

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REAL = DEVICE.type == "cuda"
pytestmark = pytest.mark.skipif(triton_missing(DEVICE) is not None,
                                reason=str(triton_missing(DEVICE)))
# the CUDA extension is required on a GPU (a failed build fails these tests, loudly)
GPU_IMPLS = ["triton", "cuda"] if REAL else ["triton"]

# (T, H, V): Qwen-size LM head on a GPU; small, odd, several vocab splits in the interpreter
LOGPROB_SHAPE = (16384, 4096, 151936) if REAL else (48, 40, 300)
SAMPLED = 32 if REAL else 6  # rows (and vocabulary rows) checked against fp64
IGNORE = -100
TAU = 0.7


def _logprob_inputs():
    T, H, V = LOGPROB_SHAPE
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(T, H, device=DEVICE, generator=g).to(torch.bfloat16)
    # logits of standard deviation ~3: a peaked but not one-hot distribution, as in RL
    w = (torch.randn(V, H, device=DEVICE, generator=g) * (3.0 / math.sqrt(H))).to(torch.bfloat16)
    y = torch.randint(0, V, (T,), device=DEVICE, generator=g)
    y[torch.rand(T, device=DEVICE, generator=g) < 0.05] = IGNORE
    return x, w, y, torch.randn(T, device=DEVICE, generator=g), \
        torch.randn(T, device=DEVICE, generator=g)


def _fp64_rows(x, w64, y, rows):
    """fp64 logits of ``rows``, and their lse / logp / entropy."""
    z = (x[rows].double() @ w64.T) / TAU  # [R, V]
    lse = torch.logsumexp(z, -1)
    p = torch.exp(z - lse[:, None])
    ent = lse - (p * z).sum(-1)
    hit = y[rows] != IGNORE  # ignored rows: logp = entropy = 0 and no gradient
    zy = z.gather(1, y[rows].clamp_min(0)[:, None])[:, 0]
    zero = torch.zeros_like(lse)
    return z, lse, torch.where(hit, zy - lse, zero), torch.where(hit, ent, zero), hit


def _fp64_lse_ent(x, w64, y, chunk=1024):
    """lse and entropy (0 on ignored rows) of every row in fp64, chunk by chunk (the full
    [T, V] would not fit)."""
    lse, ent = [], []
    for t in range(0, x.shape[0], chunk):  # keeps no chunk's [chunk, V] logits
        _, chunk_lse, _, chunk_ent, _ = _fp64_rows(x, w64, y, slice(t, t + chunk))
        lse.append(chunk_lse)
        ent.append(chunk_ent)
    return torch.cat(lse), torch.cat(ent)


@pytest.mark.parametrize("tiles", ["fused", "gemm"])
def test_linear_logprob_at_the_real_shape_against_fp64(tiles):
    x, w, y, g_logp, g_ent = _logprob_inputs()
    T, H, V = LOGPROB_SHAPE
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    if REAL:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    logp, ent = linear_logprob(xr, wr, y, TAU, True, IGNORE, impl="triton", tiles=tiles)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    if REAL:  # inputs, outputs and gradients aside, the op keeps its workspace under 2 GiB
        grads = xr.grad.numel() * xr.grad.element_size() + wr.grad.numel() * 2
        extra = torch.cuda.max_memory_allocated() - base - grads
        assert extra < 2 * 1024**3, f"{extra / 2**30:.2f} GiB extra"
    gen = torch.Generator(device="cpu").manual_seed(1)
    rows = torch.randperm(T, generator=gen)[:SAMPLED].to(DEVICE)
    w64 = w.double()  # [V, H]: 5 GB at the real shape
    z, lse, logp64, ent64, hit = _fp64_rows(x, w64, y, rows)
    assert (logp[rows].double() - logp64).abs().max() <= 1e-4  # the logp bound
    assert (ent[rows].double() - ent64).abs().max() <= 1e-3
    # dz = g (1[j = y] - p) - h p (z - lse + H), then dx = dz W / tau
    p = torch.exp(z - lse[:, None])
    onehot = torch.zeros_like(z).scatter_(1, y[rows].clamp_min(0)[:, None], hit[:, None].double())
    gl, ge = g_logp[rows].double()[:, None], g_ent[rows].double()[:, None]
    dz = hit[:, None] * (gl * (onehot - p) - ge * p * (z - lse[:, None] + ent64[:, None]))
    dx64 = dz @ w64 / TAU
    _assert_rel(xr.grad[rows], dx64, 1e-2, "dx")  # bf16 output: 2^-8 relative rounding
    # dW on sampled vocabulary rows needs every token's lse and entropy
    cols = torch.randperm(V, generator=gen)[:SAMPLED].to(DEVICE)
    lse_all, ent_all = _fp64_lse_ent(x, w64, y)  # ignored rows are zeroed by hit_all below
    zc = (x.double() @ w64[cols].T) / TAU  # [T, C]
    pc = torch.exp(zc - lse_all[:, None])
    hit_all = (y != IGNORE).double()[:, None]
    yc = (y[:, None] == cols[None, :]).double()
    dzc = hit_all * (g_logp.double()[:, None] * (yc - pc)
                     - g_ent.double()[:, None] * pc * (zc - lse_all[:, None] + ent_all[:, None]))
    _assert_rel(wr.grad[cols], dzc.T @ x.double() / TAU, 1e-2, "dW")


def test_fused_policy_loss_grad_in_forward_at_the_real_shape():
    """The gradients computed in the forward (6THV) against the recompute path (8THV) at the
    real shape: the same loss, and gradients one bf16 rounding apart."""
    from r1fast.ops.fused_linear_policy_loss import fused_linear_policy_loss

    x, w, y, _, _ = _logprob_inputs()
    T = x.shape[0]
    gen = torch.Generator().manual_seed(5)
    old = (-torch.rand(T, generator=gen) * 3).to(DEVICE)
    mask = y != IGNORE
    per_seq = min(T, 1024)
    cu = torch.arange(0, T + 1, per_seq, device=DEVICE)
    adv = torch.randn(cu.numel() - 1, generator=gen).to(DEVICE)
    cfg = PolicyLossConfig(kl="k3", kl_coef=0.01)
    out = []
    for in_forward in (False, True):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss, _ = fused_linear_policy_loss(xr, wr, y.clamp_min(0), old, adv, mask, old + 0.1,
                                           cfg, cu_seqlens=cu, temperature=TAU,
                                           impl="triton", grad_in_forward=in_forward)
        loss.backward()
        out.append((loss.detach(), xr.grad, wr.grad))
    (l0, gx0, gw0), (l1, gx1, gw1) = out
    assert abs(l0.item() - l1.item()) <= 1e-5 * max(1.0, abs(l0.item()))
    _assert_rel(gx1, gx0.double(), 2e-2, "dx")
    _assert_rel(gw1, gw0.double(), 2e-2, "dW")


def _assert_rel(got, want, tol, name):
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= tol * scale, f"{name}: max |err| {err:.3g} > {tol} x max |ref| {scale:.3g}"


def test_grpo_loss_is_bitwise_stable_over_many_sequences_and_launches():
    """20480 packed sequences (one program each, all finishing concurrently through the
    completion ticket), 50 launches: identical loss, metrics and gradient every time, and the
    ticket is 0 after each launch."""
    from r1fast.kernels import grpo_loss as K

    B, launches = (20480, 50) if REAL else (40, 3)
    gen = torch.Generator().manual_seed(2)
    lens = torch.randint(1, 33, (B,), generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(DEVICE)
    N = int(lens.sum())
    logp0 = (-torch.rand(N, generator=gen) * 3).to(DEVICE)
    old = logp0 + (torch.randn(N, generator=gen) * 0.1).to(DEVICE)
    ref = logp0 + (torch.randn(N, generator=gen) * 0.1).to(DEVICE)
    adv = torch.randn(B, generator=gen).to(DEVICE)
    mask = (torch.rand(N, generator=gen) > 0.1).to(DEVICE)
    cfg = PolicyLossConfig(kl="k3", kl_coef=0.01, agg="seq-mean-token-mean")
    first = None
    for _ in range(launches):
        logp = logp0.clone().requires_grad_()
        loss, metrics = policy_loss(logp, old, adv, mask, cfg, ref_logp=ref, cu_seqlens=cu,
                                    impl="triton")
        loss.backward()
        assert int(K._ticket(logp.device)) == 0
        got = (loss.detach(), {k: v.detach() for k, v in metrics.items()}, logp.grad)
        if first is None:
            first = got
            want_loss, _ = policy_loss(logp0.double(), old.double(), adv.double(), mask, cfg,
                                       ref_logp=ref.double(), cu_seqlens=cu, impl="torch")
            assert abs(loss.item() - want_loss.item()) <= 1e-5 * max(1.0, abs(want_loss.item()))
            continue
        assert torch.equal(got[0], first[0]) and torch.equal(got[2], first[2])
        assert all(torch.equal(got[1][k], first[1][k]) for k in first[1])


ROUTE_T = 16384 if REAL else 64


@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("setting", ["softmax", "dsv3"])
def test_routing_at_e256_k8_against_the_torch_reference(impl, setting):
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(ROUTE_T, 256, generator=gen) * 2).to(DEVICE).requires_grad_()
    kw = dict(score="softmax") if setting == "softmax" else dict(
        score="sigmoid", n_groups=8, topk_groups=4, scaling_factor=2.5,
        expert_bias=(torch.randn(256, generator=gen) * 0.05).to(DEVICE))
    g = torch.randn(ROUTE_T, 8, generator=gen).to(DEVICE)
    out = {}
    for which in (impl, "torch"):
        r = moe_route(logits, 8, impl=which, **kw)
        (grad,) = torch.autograd.grad((r.weights * g).sum(), logits)
        out[which] = (r, grad)
    (r, grad), (rt, gt) = out[impl], out["torch"]
    key = selection_key(logits, kw["score"], kw.get("expert_bias"))
    groups = (8, 4) if setting == "dsv3" else None
    same = rows_agree_up_to_ties(r.indices, rt.indices, key, topk=8, groups=groups).to(DEVICE)
    assert int((~same).sum()) <= max(8, ROUTE_T // 1000)
    torch.testing.assert_close(r.weights[same], rt.weights[same], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad[same], gt[same], atol=1e-6, rtol=1e-5)
    assert torch.equal(r.tokens_per_expert,
                       torch.bincount(r.indices.reshape(-1), minlength=256))


@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("H", [4096, 7168] if REAL else [72])
def test_permutation_at_e256_k8(impl, H):
    """Permute is a copy: bitwise equal to the torch path; unpermute sums k fp32 products in
    slot order on both paths; gradients of both."""
    T = 16384 if REAL else 40
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(T, H, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    idx = torch.stack([torch.randperm(256, generator=gen)[:8] for _ in range(T)]).to(DEVICE)
    w = torch.rand(T, 8, generator=gen).to(DEVICE).requires_grad_()
    gy = torch.randn(T, H, generator=gen).to(DEVICE, torch.bfloat16)
    out = {}
    for which in (impl, "torch"):
        p = moe_permute(x, idx, 256, impl=which)
        y = moe_unpermute(p.permuted * 2, p.row_map, w, impl=which)
        grads = torch.autograd.grad((y.float() * gy.float()).sum(), (x, w))
        out[which] = (p, y, grads)
    (p, y, (gx, gw)), (pt, yt, (gxt, gwt)) = out[impl], out["torch"]
    assert torch.equal(p.row_map, pt.row_map) and torch.equal(p.permuted, pt.permuted)
    assert torch.equal(p.tokens_per_expert, pt.tokens_per_expert)
    torch.testing.assert_close(y, yt, atol=0, rtol=2**-7)  # fused multiply-adds may round apart
    _assert_rel(gx, gxt.double(), 2**-7, "dx")  # bf16 sums of k products: ulps apart
    torch.testing.assert_close(gw, gwt, atol=1e-4, rtol=1e-4)


def test_grouped_experts_training_at_qwen3_30b_sizes():
    """The grouped experts' forward and backward at Qwen3-30B-A3B's expert sizes (E=128,
    H=2048, F=768) over a training micro-batch (16384 routed rows, bf16, two experts with no
    rows): the output and every gradient of three sampled experts (the busiest among them)
    against fp64 autograd of their rows, exact zeros for the empty ones, and a second backward
    bitwise equal (no atomics)."""
    from r1fast.ops.moe_experts import ExpertTable, moe_grouped_swiglu

    E, H, F, n = (128, 2048, 768, 16384) if REAL else (6, 40, 24, 70)
    gen = torch.Generator().manual_seed(5)
    counts = torch.multinomial(torch.ones(E), n, replacement=True, generator=gen).bincount(
        minlength=E)
    counts[1] += counts[0] + counts[2]  # experts 0 and 2 get no rows
    counts[0] = counts[2] = 0
    leaves = [(torch.randn(n, H, generator=gen)).to(DEVICE, torch.bfloat16),
              torch.rand(n, generator=gen).to(DEVICE)]
    leaves += [(torch.randn(2 * F, H, generator=gen) / H ** 0.5).to(DEVICE, torch.bfloat16)
               for _ in range(E)]
    leaves += [(torch.randn(H, F, generator=gen) / F ** 0.5).to(DEVICE, torch.bfloat16)
               for _ in range(E)]
    leaves = [t.requires_grad_() for t in leaves]
    dy = torch.randn(n, H, generator=gen).to(DEVICE, torch.bfloat16)
    table = ExpertTable(leaves[2:2 + E], leaves[2 + E:])
    runs = []
    for _ in range(2):
        y = moe_grouped_swiglu(leaves[0], counts.to(DEVICE), table, leaves[1], impl="triton")
        runs.append([y.detach()] + list(torch.autograd.grad(y, leaves, dy)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    y, gx, gp = runs[0][:3]
    gw1, gw2 = runs[0][3:3 + E], runs[0][3 + E:]
    assert not gw1[0].any() and not gw2[2].any()
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    for e in (1, E // 2, E - 1):
        rows = slice(int(starts[e]), int(starts[e + 1]))
        x64, p64 = (leaves[0][rows].double().detach().requires_grad_(),
                    leaves[1][rows].double().detach().requires_grad_())
        w1, w2 = (table.fc1[e].double().detach().requires_grad_(),
                  table.fc2[e].double().detach().requires_grad_())
        gate, up = (x64 @ w1.T).chunk(2, dim=-1)
        want = (gate * torch.sigmoid(gate) * up * p64[:, None]) @ w2.T
        wants = torch.autograd.grad(want, (x64, p64, w1, w2), dy[rows].double())
        _assert_rel(y[rows], want.detach(), 3e-2, f"y of expert {e}")
        for name, got, w in zip(("dx", "dprobs", "dW1", "dW2"),
                                (gx[rows], gp[rows], gw1[e], gw2[e]), wants):
            _assert_rel(got, w, 3e-2, f"{name} of expert {e}")
