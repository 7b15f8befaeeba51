"""moe_grouped_swiglu (r1fast.ops.moe_experts): every expert's SwiGLU MLP over its rows in
grouped launches, against a row-by-row fp64 loop (forward) and fp64 autograd (the gradients of
x, probs and every expert's two weights): odd sizes, experts with no rows, one expert, no rows
at all, any split of the rows (hypothesis); every output and gradient element written (outputs
poisoned first); the address table rebuilt when a weight moves; a weight changed between
forward and backward refused; one test per bad input."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r1fast.ops._dispatch import triton_missing
from r1fast.ops.moe_experts import ExpertTable, moe_grouped_swiglu, naive_moe_grouped_swiglu

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NO_TRITON = triton_missing(DEVICE)
needs_triton = pytest.mark.skipif(NO_TRITON is not None, reason=str(NO_TRITON))
IMPLS = ["torch", pytest.param("triton", marks=needs_triton)]
#: max |y - fp64| / max |fp64|: fp32 accumulates exactly enough; 16-bit rows round h and y
TOL = {torch.float32: 2e-6, torch.bfloat16: 3e-2, torch.float16: 4e-3}
#: (rows per expert, H, F, dtype) of the forward and gradient tests
CASES = [
    ([3, 0, 5, 1], 24, 20, torch.float32),  # an expert with no rows
    ([40], 8, 8, torch.float32),  # one expert, several row tiles
    ([17, 2, 0, 0, 9], 33, 40, torch.bfloat16),  # odd H, F beyond one tile
    ([1, 1, 1, 1, 1, 1, 1], 17, 5, torch.float16),  # more experts than rows per expert
    ([0, 0, 0], 16, 16, torch.float32),  # no rows at all (and zero weight gradients)
    ([2, 3], 1, 1, torch.float32),  # H = F = 1: a compiled kernel gets them as constants
]


def _case(counts, H, F, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, E = sum(counts), len(counts)
    x = torch.randn(n, H, generator=g).to(DEVICE, dtype)
    fc1 = [(0.3 * torch.randn(2 * F, H, generator=g)).to(DEVICE, dtype) for _ in range(E)]
    fc2 = [(0.3 * torch.randn(H, F, generator=g)).to(DEVICE, dtype) for _ in range(E)]
    probs = torch.rand(n, generator=g).to(DEVICE)
    return x, torch.tensor(counts, device=DEVICE), fc1, fc2, probs


def _rel_err(y, exact):
    assert y.shape == exact.shape
    if not exact.numel():
        return 0.0
    return ((y.double().cpu() - exact).abs().max() / exact.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("counts,H,F,dtype", CASES)
def test_matches_fp64_rows(impl, counts, H, F, dtype):
    x, c, fc1, fc2, probs = _case(counts, H, F, dtype)
    with torch.no_grad():
        y = moe_grouped_swiglu(x, c, ExpertTable(fc1, fc2), probs, glu_offset=0.5, impl=impl)
    assert y.dtype == dtype and y.shape == x.shape
    exact = naive_moe_grouped_swiglu(x.cpu(), counts, [w.cpu() for w in fc1],
                                     [w.cpu() for w in fc2], probs.cpu(), 0.5)
    assert _rel_err(y, exact) <= TOL[dtype]


#: sizes the property tests draw: any on the interpreter; on a GPU, one of each kind Triton
#: compiles separately (1, a multiple of 16, other), as each new kind compiles every kernel's
#: configs again (seconds each) in the GPU check's short test stage
SIZES = st.integers(1, 20) if DEVICE.type == "cpu" else st.sampled_from([1, 5, 16, 19])


@needs_triton
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(counts=st.lists(st.integers(0, 21), min_size=1, max_size=9),
       H=SIZES, F=SIZES, seed=st.integers(0, 999))
def test_property_any_split_of_rows(counts, H, F, seed):
    x, c, fc1, fc2, probs = _case(counts, H, F, torch.float32, seed)
    with torch.no_grad():
        y = moe_grouped_swiglu(x, c, ExpertTable(fc1, fc2), probs, impl="triton")
    exact = naive_moe_grouped_swiglu(x.cpu(), counts, [w.cpu() for w in fc1],
                                     [w.cpu() for w in fc2], probs.cpu())
    assert _rel_err(y, exact) <= TOL[torch.float32]


@needs_triton
def test_kernels_write_every_row():
    from r1fast.kernels.moe_experts import grouped_swiglu_mlp

    counts = [5, 0, 19, 3]
    x, c, fc1, fc2, probs = _case(counts, 21, 18, torch.float32)
    table = ExpertTable(fc1, fc2)
    h = torch.full((x.shape[0], 18), float("nan"), device=DEVICE)
    out = torch.full_like(x, float("nan"))
    grouped_swiglu_mlp(x, c, *table.tables(), probs, 18, aligned=table.aligned, h=h, out=out)
    assert torch.isfinite(h).all() and torch.isfinite(out).all()
    exact = naive_moe_grouped_swiglu(x.cpu(), counts, [w.cpu() for w in fc1],
                                     [w.cpu() for w in fc2], probs.cpu())
    assert _rel_err(out, exact) <= TOL[torch.float32]


@pytest.mark.parametrize("impl", IMPLS)
def test_the_table_follows_a_moved_weight(impl):
    x, c, fc1, fc2, probs = _case([4, 6], 12, 10, torch.float32)
    table = ExpertTable(fc1, fc2)
    with torch.no_grad():
        before = moe_grouped_swiglu(x, c, table, probs, impl=impl)
        fc1[1].data = 2 * fc1[1].data  # new storage: the old address is stale
        table.fc1[1] = fc1[1]
        after = moe_grouped_swiglu(x, c, table, probs, impl=impl)
    exact = naive_moe_grouped_swiglu(x.cpu(), [4, 6], [w.cpu() for w in fc1],
                                     [w.cpu() for w in fc2], probs.cpu())
    assert _rel_err(after, exact) <= TOL[torch.float32]
    assert torch.equal(after[:4], before[:4]) and not torch.allclose(after[4:], before[4:])


@pytest.mark.parametrize("impl", IMPLS)
def test_weights_off_16_byte_alignment(impl):
    """Weights viewed at a 4-byte offset into one buffer (as a packed parameter buffer may
    place them): the table says unaligned, and the kernels (told so) give the same numbers."""
    counts, H, F = [4, 0, 7], 12, 10
    x, c, fc1, fc2, probs = _case(counts, H, F, torch.float32)
    fresh = ExpertTable(fc1, fc2)
    fresh.tables()
    assert fresh.aligned  # the caching allocators' blocks are at least 64-byte aligned
    flat = torch.cat([w.reshape(-1) for w in fc1 + fc2])
    buf = torch.empty(1 + flat.numel(), device=DEVICE)
    buf[1:] = flat  # the first weight starts 4 bytes past a 16-byte boundary
    views, at = [], 1
    for w in fc1 + fc2:
        views.append(buf[at:at + w.numel()].view(w.shape))
        at += w.numel()
    shifted = ExpertTable(views[:3], views[3:])
    shifted.tables()
    assert not shifted.aligned
    with torch.no_grad():
        y = moe_grouped_swiglu(x, c, shifted, probs, impl=impl)
    exact = naive_moe_grouped_swiglu(x.cpu(), counts, [w.cpu() for w in fc1],
                                     [w.cpu() for w in fc2], probs.cpu())
    assert _rel_err(y, exact) <= TOL[torch.float32]


def _bad_table(kind):
    fc1 = [torch.randn(16, 8) for _ in range(2)]
    fc2 = [torch.randn(8, 8) for _ in range(2)]
    if kind == "count":
        return ExpertTable(fc1, fc2[:1])
    if kind == "shape":
        return ExpertTable(fc1, [torch.randn(8, 7), fc2[1]])
    if kind == "dtype":
        return ExpertTable([fc1[0], fc1[1].double()], fc2)
    return ExpertTable([fc1[0], torch.randn(8, 16).t()], fc2)  # not contiguous


@pytest.mark.parametrize("kind,match", [
    ("count", r"same number \(>= 1\) of experts, got 2 and 1"),
    ("shape", r"fc2\[0\] must have shape \[8, 8\]"),
    ("dtype", r"fc1\[1\] must be contiguous torch.float32"),
    ("layout", r"fc1\[1\] must be contiguous .* \(contiguous=False\)"),
])
def test_bad_tables(kind, match):
    with pytest.raises(ValueError, match=match):
        _bad_table(kind)


@pytest.mark.parametrize("field,value,match", [
    ("counts", torch.tensor([2, 3, 0]), r"counts must have shape"),
    ("counts", torch.tensor([2.0, 3.0]), r"counts must have dtype"),
    ("probs", torch.rand(4), r"probs must have shape"),
    ("x", torch.randn(5, 9), r"experts take \[n, 8\] torch.float32 rows, got \[5, 9\]"),
    ("x", torch.randn(5, 8).double(), r"experts take \[n, 8\] torch.float32 rows"),
])
def test_bad_inputs(field, value, match):
    x, c, fc1, fc2, probs = _case([2, 3], 8, 8, torch.float32)
    args = {"x": x.cpu(), "counts": c.cpu(), "probs": probs.cpu(), field: value}
    table = ExpertTable([w.cpu() for w in fc1], [w.cpu() for w in fc2])
    with pytest.raises(ValueError, match=match), torch.no_grad():
        moe_grouped_swiglu(args["x"], args["counts"], table, args["probs"], impl="torch")


# ----------------------------------------------------------------------------- gradients

#: max |grad - fp64| / max |fp64| per gradient: 16-bit runs round [g | u], h, da and the results
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-2, torch.float16: 6e-3}


def _fp64_grads(x, counts, fc1, fc2, probs, dy, offset):
    """y and the gradients of x, probs, fc1[e], fc2[e] by fp64 autograd of the formula, one
    expert at a time (independent of both impls' code)."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in [x, probs, *fc1, *fc2]]
    xd, pd, w1, w2 = leaves[0], leaves[1], leaves[2:2 + len(fc1)], leaves[2 + len(fc1):]
    outs, r = [], 0
    for e, c in enumerate(counts):
        gate, up = (xd[r:r + c] @ w1[e].t()).chunk(2, dim=-1)
        outs.append((gate * torch.sigmoid(gate) * (up + offset) * pd[r:r + c, None]) @ w2[e].t())
        r += c
    y = torch.cat(outs)
    grads = torch.autograd.grad(y, leaves, dy.detach().cpu().double(), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    return y, grads


def _grads(x, c, fc1, fc2, probs, dy, offset, impl):
    leaves = [t.detach().clone().requires_grad_() for t in [x, probs, *fc1, *fc2]]
    E = len(fc1)
    table = ExpertTable(leaves[2:2 + E], leaves[2 + E:])
    y = moe_grouped_swiglu(leaves[0], c, table, leaves[1], glu_offset=offset, impl=impl)
    y.backward(dy)
    return y, [t.grad for t in leaves]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("counts,H,F,dtype", CASES)
def test_gradients_match_fp64_autograd(impl, counts, H, F, dtype):
    x, c, fc1, fc2, probs = _case(counts, H, F, dtype)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    y, grads = _grads(x, c, fc1, fc2, probs, dy, 0.5, impl)
    y64, want = _fp64_grads(x, counts, fc1, fc2, probs, dy, 0.5)
    assert _rel_err(y, y64.detach()) <= TOL[dtype]
    names = ["x", "probs"] + [f"fc1[{e}]" for e in range(len(counts))] + \
        [f"fc2[{e}]" for e in range(len(counts))]
    scale = {}  # a gradient is judged against the largest of its kind (all experts' fc1, ...)
    for name, w in zip(names, want):
        kind = name.split("[")[0]
        scale[kind] = max(scale.get(kind, 0.0), w.abs().max().item() if w.numel() else 0.0)
    for name, g, w in zip(names, grads, want):
        assert g is not None and g.dtype == (torch.float32 if name == "probs" else dtype), name
        err = (g.double().cpu() - w).abs().max().item() if w.numel() else 0.0
        assert err <= GRAD_TOL[dtype] * max(scale[name.split("[")[0]], 1e-30), (name, err)


@needs_triton
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(counts=st.lists(st.integers(0, 21), min_size=1, max_size=6),
       H=SIZES, F=SIZES, seed=st.integers(0, 999))
def test_property_gradients_for_any_split_of_rows(counts, H, F, seed):
    x, c, fc1, fc2, probs = _case(counts, H, F, torch.float32, seed)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    _, grads = _grads(x, c, fc1, fc2, probs, dy, 0.0, "triton")
    _, want = _fp64_grads(x, counts, fc1, fc2, probs, dy, 0.0)
    for g, w in zip(grads, want):
        if w.numel():
            scale = max(w.abs().max().item(), 1e-6)
            assert (g.double().cpu() - w).abs().max().item() <= GRAD_TOL[torch.float32] * scale


@needs_triton
def test_backward_kernels_write_every_element():
    """da, dx and both weight gradients poisoned with NaN: every element is written, an
    expert with no rows gets exact zeros, and the unpoisoned call agrees bitwise."""
    from r1fast.kernels.moe_experts import grouped_swiglu_mlp, grouped_swiglu_mlp_backward

    counts, H, F = [5, 0, 19, 3], 21, 18
    x, c, fc1, fc2, probs = _case(counts, H, F, torch.float32)
    table = ExpertTable(fc1, fc2)
    n, E = x.shape[0], len(counts)
    pre = torch.full((n, 2 * F), float("nan"), device=DEVICE)
    h = torch.full((n, F), float("nan"), device=DEVICE)
    grouped_swiglu_mlp(x, c, *table.tables(), probs, F, 0.25, aligned=table.aligned, h=h,
                       pre=pre)
    assert torch.isfinite(pre).all() and torch.isfinite(h).all()
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    nan = float("nan")
    poisoned = {"da": torch.full((n, 2 * F), nan, device=DEVICE),
                "x": torch.full_like(x, nan), "fc1": torch.full((E, 2 * F, H), nan, device=DEVICE),
                "fc2": torch.full((E, H, F), nan, device=DEVICE)}
    got = grouped_swiglu_mlp_backward(dy, x, pre, h, c, *table.tables(), probs, 0.25,
                                      aligned=table.aligned, out=poisoned)
    clean = grouped_swiglu_mlp_backward(dy, x, pre, h, c, *table.tables(), probs, 0.25,
                                        aligned=table.aligned)
    for name in ("x", "probs", "fc1", "fc2"):
        assert torch.isfinite(got[name]).all(), name
        assert torch.equal(got[name], clean[name]), name
    assert torch.isfinite(poisoned["da"]).all()
    assert not got["fc1"][1].any() and not got["fc2"][1].any()  # expert 1 has no rows


@pytest.mark.parametrize("impl", IMPLS)
def test_only_the_gradients_asked_for(impl):
    """Weights that need gradients with rows that do not (a frozen embedding upstream), and the
    reverse: autograd gets exactly the gradients it asked for, and they match."""
    x, c, fc1, fc2, probs = _case([4, 0, 7], 12, 10, torch.float32)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    _, want = _fp64_grads(x, [4, 0, 7], fc1, fc2, probs, dy, 0.0)
    w1 = [w.clone().requires_grad_() for w in fc1]
    y = moe_grouped_swiglu(x, c, ExpertTable(w1, fc2), probs, impl=impl)
    y.backward(dy)
    for e, w in enumerate(w1):
        assert (w.grad.double().cpu() - want[2 + e]).abs().max() <= 1e-4
    xr = x.clone().requires_grad_()
    moe_grouped_swiglu(xr, c, ExpertTable(fc1, fc2), probs, impl=impl).backward(dy)
    assert (xr.grad.double().cpu() - want[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_a_weight_changed_before_the_backward_is_refused(impl):
    x, c, fc1, fc2, probs = _case([3, 4], 8, 6, torch.float32)
    w2 = [w.clone().requires_grad_() for w in fc2]
    y = moe_grouped_swiglu(x.requires_grad_(), c, ExpertTable(fc1, w2), probs, impl=impl)
    with torch.no_grad():
        w2[0].mul_(2.0)  # an optimizer step between forward and backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@needs_triton
def test_autotuning_zeroes_the_partial_sums_between_trials():
    """On a GPU the autotuner runs every config of dh on the same dp buffer before the chosen
    one: a wide tile writes fewer column blocks than a narrow trial did, so dp must be zeroed
    before each run (the interpreter does not autotune; the GPU check is test_real_shapes'
    F=768 case)."""
    from r1fast.kernels import moe_experts as K

    assert K.autotuned("dh").reset_to_zero == ["dp_ptr"]
    widths = {c.kwargs["BLOCK_N"] for c in K._configs("dh")}
    assert len(widths) > 1  # the configs do differ in width: the reset matters
    for name in ("fc1", "rows", "wgrad"):  # these write every element under any config
        assert not K.autotuned(name).reset_to_zero
    # aligned and unaligned expert weights load differently: each is tuned on its own (the
    # second one used to reuse the first one's pick); Triton refuses a key it does not know
    for name in ("fc1", "rows", "dh"):
        assert "W_ALIGNED" in K.autotuned(name).keys


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_that_are_a_strided_view(impl):
    """Rows whose features are not contiguous (every other column of a wider tensor): the
    same output and gradient as the contiguous copy."""
    counts, H, F = [3, 0, 6], 10, 12
    x, c, fc1, fc2, probs = _case(counts, H, F, torch.float32)
    wide = torch.zeros(x.shape[0], 2 * H, device=DEVICE)
    wide[:, ::2] = x
    view = wide.requires_grad_()[:, ::2]  # [n, H], stride (2H, 2)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    y = moe_grouped_swiglu(view, c, ExpertTable(fc1, fc2), probs, impl=impl)
    y.backward(dy)
    want, grads = _fp64_grads(x, counts, fc1, fc2, probs, dy, 0.0)
    assert _rel_err(y.detach(), want.detach()) <= TOL[torch.float32]
    assert (wide.grad[:, ::2].double().cpu() - grads[0]).abs().max() <= 1e-5
    assert not wide.grad[:, 1::2].any()


def _config_cases():
    """(kernel, config index) of every autotune config; under the interpreter all but each
    kernel's last (largest) config are slow (~6 s each there; on a GPU they all run)."""
    from r1fast.kernels import moe_experts as K

    cases = []
    for name in ("fc1", "rows", "dh", "wgrad"):
        last = len(K._configs(name)) - 1
        cases += [pytest.param(name, i, id=f"{name}-{i}", marks=[pytest.mark.slow]
                               if i != last and DEVICE.type != "cuda" else [])
                  for i in range(last + 1)]
    return cases


@needs_triton
@pytest.mark.parametrize("name,index", _config_cases() if NO_TRITON is None else [])
def test_every_autotune_config_gives_the_fp64_numbers(name, index):
    """Each config of each kernel pinned in turn (a GPU run checks only the autotuner's pick
    for its shapes): an expert of more rows than the tallest tile, one with none, H and F wider
    than one column block; the output and every gradient against fp64."""
    from r1fast.kernels import moe_experts as K

    counts, H, F = [131, 0, 5, 19], 72, 80
    x, c, fc1, fc2, probs = _case(counts, H, F, torch.float32, seed=7)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    y64, want = _fp64_grads(x, counts, fc1, fc2, probs, dy, 0.25)
    config = K._configs(name)[index]
    with K.pinned_config(name, config):
        y, grads = _grads(x, c, fc1, fc2, probs, dy, 0.25, "triton")
    where = f"{name} {config.kwargs}"
    assert _rel_err(y.detach(), y64.detach()) <= TOL[torch.float32], where
    for g, w in zip(grads, want):
        assert (g.double().cpu() - w).abs().max() <= GRAD_TOL[torch.float32] * max(
            w.abs().max().item(), 1e-6), where
