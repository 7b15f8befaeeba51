"""CachedAttention, the decoder's core attention, alone: grouped-query heads laid out as more
queries of their group (no ``enable_gqa``, no key copies) against an fp64 attention that repeats
the keys and values to every head, for several heads-per-group ratios, steps and masks. On a GPU
(``make gpu-check``) the same, and proof that the layout and MLA's expanded prefill reach one of
SDPA's fused kernels under the decoder's mask, not its math fallback."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

from r1fast.rollout.attention import CachedAttention, KVStore


def fp64_attention(q, k, v, hidden, scale):
    """q [n, B, h, d], k/v [end, B, g, d] -> [n, B, h * dv], heads sharing group h // rep."""
    rep = q.shape[2] // k.shape[2]
    q, k, v = (x.double().permute(1, 2, 0, 3) for x in (q, k, v))  # [B, heads|groups, len, d]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale  # [B, h, n, end]
    p = torch.softmax(s.masked_fill(hidden, float("-inf")), dim=-1)
    out = p @ v  # [B, h, n, dv]
    return out.permute(2, 0, 1, 3).reshape(q.shape[2], q.shape[0], -1)


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_steps(heads, groups, batch, steps, d=8, dv=8, seed=0, dtype=torch.float32):
    """Feed ``steps`` (slots per forward) through one CachedAttention; every output against
    the fp64 attention over the cache so far, under a causal mask with random left pads."""
    g = torch.Generator().manual_seed(seed)
    total = sum(steps)
    store = KVStore()
    keys = torch.full((total, batch, groups, d), float("nan"), dtype=dtype, device=DEVICE)
    values = torch.full((total, batch, groups, dv), float("nan"), dtype=dtype, device=DEVICE)
    store.buffers[1] = (keys, values)
    attn = CachedAttention(store, 1, 1 / math.sqrt(d))
    pads = torch.randint(0, 3, (batch,), generator=g).to(DEVICE)
    all_k = torch.randn(total, batch, groups, d, generator=g).to(DEVICE, dtype)
    all_v = torch.randn(total, batch, groups, dv, generator=g).to(DEVICE, dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    offset = 0
    for n in steps:
        end = offset + n
        q = torch.randn(n, batch, heads, d, generator=g).to(DEVICE, dtype)
        slots, query = torch.arange(end, device=DEVICE), torch.arange(offset, end, device=DEVICE)
        hidden = slots[None, :] > query[:, None]  # [n, end] causal
        left = (slots[None, :] < pads[:, None])[:, None, :] & (slots[None, :] != query[:, None])
        mask = (hidden[None] | left)[:, None]  # [B, 1, n, end]
        store.offset = offset
        got = attn(q, all_k[offset:end], all_v[offset:end], mask)
        want = fp64_attention(q, all_k[:end], all_v[:end], mask, 1 / math.sqrt(d))
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        offset = end


@pytest.mark.parametrize("heads, groups", [(4, 4), (4, 2), (8, 1), (6, 3)])
def test_grouped_heads_match_repeated_keys(heads, groups):
    run_steps(heads, groups, batch=3, steps=[5, 1, 1, 3])


@settings(max_examples=20, deadline=None)
@given(groups=st.integers(1, 3), rep=st.integers(1, 4), batch=st.integers(1, 4),
       steps=st.lists(st.integers(1, 6), min_size=1, max_size=4), seed=st.integers(0, 99))
def test_property_any_step_schedule(groups, rep, batch, steps, seed):
    run_steps(groups * rep, groups, batch, steps, seed=seed)


def test_a_shared_mask_broadcasts_over_rows():
    # without pads the decoder passes one [1, 1, n, end] mask for every row
    store = KVStore()
    k, v = torch.randn(4, 2, 2, 8, device=DEVICE), torch.randn(4, 2, 2, 8, device=DEVICE)
    store.buffers[1] = (k.clone(), v.clone())
    q = torch.randn(4, 2, 4, 8, device=DEVICE)
    causal = torch.arange(4, device=DEVICE)
    hidden = (causal[None, :] > causal[:, None])[None, None]  # [1, 1, 4, 4]
    got = CachedAttention(store, 1, 0.3)(q, k, v, hidden)
    torch.testing.assert_close(got.double(), fp64_attention(q, k, v, hidden, 0.3),
                               rtol=1e-5, atol=1e-5)


FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SDPA's fused kernels need CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_layout_runs_in_a_fused_kernel(dtype):
    # with the math kernel excluded SDPA raises rather than fall back: the decoder's masked
    # GQA steps (a prefill, then one-token decodes) are taken by a fused kernel
    with sdpa_kernel(FUSED):
        run_steps(32, 4, batch=3, steps=[40, 1, 1], d=128, dv=128, dtype=dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SDPA's fused kernels need CUDA")
def test_mla_expanded_prefill_runs_in_a_fused_kernel():
    # DeepSeek-V3's head sizes per rank: q/k 192, v 128, latent 512 + 64; fp32, masked
    from r1fast.rollout.mla_latent import attend_expanded

    b, h, n, c, rope, nope, dv = 2, 4, 48, 512, 64, 128, 128
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(*shape, generator=g).to(DEVICE) for shape in
            ((b, h, n, nope), (b, h, n, rope), (b, n, c + rope))]
    w_uk = torch.randn(h, nope, c, generator=g).to(DEVICE) / c ** 0.5
    w_uv = torch.randn(h, dv, c, generator=g).to(DEVICE) / c ** 0.5
    causal = torch.arange(n, device=DEVICE)
    hidden = (causal[None, :] > causal[:, None])[None, None]  # [1, 1, n, n]
    want = attend_expanded(*args, hidden, w_uk, w_uv, 0.1)
    with sdpa_kernel(FUSED):
        got = attend_expanded(*args, hidden, w_uk, w_uv, 0.1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
