"""Tests of the torch reference of ``linear_logprob`` (and the public op's validation).

Ground truth: the textbook full-logits formula (``naive_linear_logprob``) evaluated in fp64 on
fp64 copies of the inputs, with fp64 autograd for the gradients. The reference streams the
logits in tiles, so every case runs with small chunk sizes that split T and V unevenly.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from r1fast.ops._dispatch import ImplUnavailableError
from r1fast.ops.linear_logprob import (
    _torch_partials,
    linear_logprob,
    merge_partials,
    naive_linear_logprob,
)

IGNORE = -100


def make_inputs(T, H, V, dtype=torch.float32, n_ignored=0, ignore_index=IGNORE, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    # logits with std ~3: peaked but not one-hot distributions
    weight = (torch.randn(V, H, generator=g) * (3.0 / math.sqrt(max(H, 1)))).to(dtype)
    targets = torch.randint(0, V, (T,), generator=g)
    if n_ignored:
        targets[torch.randperm(T, generator=g)[:n_ignored]] = ignore_index
    grad_logp = torch.randn(T, generator=g)
    grad_ent = torch.randn(T, generator=g)
    return hidden, weight, targets, grad_logp, grad_ent


def fp64_truth(hidden, weight, targets, tau, g, h, ignore_index=IGNORE):
    """(logp, entropy, dx, dW) from the full-logits formula in fp64."""
    x = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logp, ent = naive_linear_logprob(x, w, targets, tau, True, ignore_index)
    ((logp * g.double()).sum() + (ent * h.double()).sum()).backward()
    return logp.detach(), ent.detach(), x.grad, w.grad


def run_op(hidden, weight, targets, tau, g, h, ignore_index=IGNORE, **kw):
    """(logp, entropy, dx, dW) of ``linear_logprob`` with upstream gradients g, h."""
    x = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logp, ent = linear_logprob(x, w, targets, tau, True, ignore_index, **kw)
    ((logp * g.to(logp.dtype)).sum() + (ent * h.to(ent.dtype)).sum()).backward()
    return logp.detach(), ent.detach(), x.grad, w.grad


def assert_close_to_truth(got, truth, out_tol, grad_rel):
    """Outputs within ``out_tol``; gradients within ``grad_rel`` of each gradient's max."""
    logp, ent, dx, dw = got
    t_logp, t_ent, t_dx, t_dw = truth
    assert logp.dtype in (torch.float32, torch.float64) and ent.dtype == logp.dtype
    torch.testing.assert_close(logp.double(), t_logp, atol=out_tol, rtol=out_tol)
    torch.testing.assert_close(ent.double(), t_ent, atol=out_tol, rtol=out_tol)
    for got_g, want in ((dx, t_dx), (dw, t_dw)):
        scale = max(want.abs().max().item(), 1e-3)
        torch.testing.assert_close(got_g.double(), want, atol=grad_rel * scale, rtol=grad_rel)


SHAPES = [(1, 7, 1), (7, 33, 257), (63, 7, 100), (5, 1, 3)]


@pytest.mark.parametrize("T,H,V", SHAPES)
@pytest.mark.parametrize("tau", [1.0, 0.7])
@pytest.mark.parametrize("chunks", [(None, None), (4, 17)])
def test_fp32_matches_fp64_naive(T, H, V, tau, chunks):
    hidden, weight, targets, g, h = make_inputs(T, H, V, n_ignored=T // 3)
    got = run_op(hidden, weight, targets, tau, g, h, impl="torch",
                 chunk_tokens=chunks[0], chunk_vocab=chunks[1])
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    assert_close_to_truth(got, fp64_truth(hidden, weight, targets, tau, g, h), 2e-5, 2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,H,V", [(7, 33, 257), (63, 7, 100)])
def test_half_inputs_accumulate_in_fp32(dtype, T, H, V):
    hidden, weight, targets, g, h = make_inputs(T, H, V, dtype=dtype, n_ignored=2)
    got = run_op(hidden, weight, targets, 1.3, g, h, impl="torch", chunk_tokens=5, chunk_vocab=33)
    assert got[0].dtype == torch.float32  # outputs fp32, not rounded to the input dtype
    assert got[2].dtype == dtype and got[3].dtype == dtype
    # outputs: fp32 accumulation of exactly representable inputs -> fp32-level error;
    # gradients: one rounding to the 16-bit dtype at the end
    eps = torch.finfo(dtype).eps
    assert_close_to_truth(got, fp64_truth(hidden, weight, targets, 1.3, g, h), 2e-5, 2 * eps)


def test_autocast_does_not_lower_the_accumulation():
    """Under torch.autocast(bf16) the torch path's matmuls ran in bf16 (logp error 4e-3
    against fp64, not 1e-7); the op accumulates in fp32 whatever the autocast state."""
    hidden, weight, targets, g, h = make_inputs(7, 33, 257, n_ignored=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run_op(hidden, weight, targets, 1.0, g, h, impl="torch")
    assert_close_to_truth(got, fp64_truth(hidden, weight, targets, 1.0, g, h), 2e-5, 2e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="impl='auto' picks Triton on CUDA only")
def test_fp64_with_auto_takes_the_torch_path_on_a_gpu():
    """Triton has no fp64; impl='auto' used to pick it on a GPU and then refuse the dtype."""
    hidden, weight, targets, g, h = make_inputs(7, 33, 257, n_ignored=2)
    hidden, weight, targets = hidden.double().cuda(), weight.double().cuda(), targets.cuda()
    got = linear_logprob(hidden, weight, targets, impl="auto")
    want = linear_logprob(hidden, weight, targets, impl="torch")
    assert got.dtype == torch.float64 and torch.equal(got, want)


def test_a_float_temperature_traces_under_dynamic_compile():
    """torch.compile(dynamic=True) makes a float temperature symbolic, which math.isfinite
    cannot read (fullgraph failed); the check runs in the graph instead."""
    hidden, weight, targets, _, _ = make_inputs(5, 8, 11)

    def logp(hidden, tau):
        return linear_logprob(hidden, weight, targets, temperature=tau, impl="torch")

    torch._dynamo.reset()
    compiled = torch.compile(logp, dynamic=True, fullgraph=True)
    torch.testing.assert_close(compiled(hidden, 0.7), logp(hidden, 0.7), rtol=1e-6, atol=1e-6)
    with pytest.raises(Exception):
        compiled(hidden, -0.5)
    torch._dynamo.reset()


def row_temperatures(T, seed=1, ignored=None):
    """[T] per-row temperatures in [0.3, 2.3); 0 (invalid) on the ``ignored`` rows, which the
    op must not read."""
    tau = torch.rand(T, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3
    if ignored is not None:
        tau[ignored] = 0.0
    return tau


@pytest.mark.parametrize("T,H,V", SHAPES)
@pytest.mark.parametrize("chunks", [(None, None), (4, 17)])
def test_per_row_temperature_matches_fp64_naive(T, H, V, chunks):
    hidden, weight, targets, g, h = make_inputs(T, H, V, n_ignored=T // 3)
    tau = row_temperatures(T, ignored=targets == IGNORE)
    got = run_op(hidden, weight, targets, tau, g, h, impl="torch",
                 chunk_tokens=chunks[0], chunk_vocab=chunks[1])
    truth_tau = torch.where(targets == IGNORE, 1.0, tau).double()  # the truth divides by tau
    assert_close_to_truth(got, fp64_truth(hidden, weight, targets, truth_tau, g, h), 2e-5, 2e-5)
    assert all(bool(torch.isfinite(t).all()) for t in got)


def test_per_row_temperature_fp64_gradcheck():
    hidden, weight, targets, _, _ = make_inputs(4, 3, 5, dtype=torch.float64, n_ignored=1)
    tau = row_temperatures(4).double()

    def fn(x, w):
        return linear_logprob(x, w, targets, tau, True, impl="torch", chunk_tokens=3,
                              chunk_vocab=2)

    assert torch.autograd.gradcheck(fn, (hidden.requires_grad_(), weight.requires_grad_()),
                                    eps=1e-6, atol=1e-8)


def test_equal_row_temperatures_give_the_scalar_result():
    hidden, weight, targets, g, h = make_inputs(9, 6, 11, n_ignored=2)
    # tau = 0.5: 1/tau is exact, so both paths multiply by the same fp32 factor
    scalar = run_op(hidden, weight, targets, 0.5, g, h, impl="torch", chunk_tokens=4,
                    chunk_vocab=5)
    rows = run_op(hidden, weight, targets, torch.full((9,), 0.5), g, h, impl="torch",
                  chunk_tokens=4, chunk_vocab=5)
    for a, b in zip(scalar, rows):
        assert torch.equal(a, b)


def test_fp64_gradcheck():
    hidden, weight, targets, _, _ = make_inputs(3, 4, 5, dtype=torch.float64, n_ignored=1)
    hidden.requires_grad_()
    weight.requires_grad_()

    def fn(x, w):
        return linear_logprob(x, w, targets, 0.8, True, impl="torch", chunk_tokens=2,
                              chunk_vocab=3)

    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-6, atol=1e-8)


def test_int32_targets_and_noncontiguous_inputs():
    hidden, weight, targets, g, h = make_inputs(9, 6, 11, n_ignored=2)
    hidden_nc = hidden.t().contiguous().t()  # same values, column-major strides
    weight_nc = torch.stack([weight, weight], dim=2)[..., 0]  # strided view, same values
    assert not hidden_nc.is_contiguous() and not weight_nc.is_contiguous()
    got = run_op(hidden_nc, weight_nc, targets.int(), 1.0, g, h, impl="torch", chunk_tokens=4,
                 chunk_vocab=5)
    assert_close_to_truth(got, fp64_truth(hidden, weight, targets, 1.0, g, h), 2e-5, 2e-5)


def test_ignored_rows_give_zero_and_no_gradient():
    hidden, weight, targets, g, h = make_inputs(8, 5, 13)
    targets[[1, 6]] = IGNORE
    logp, ent, dx, _ = run_op(hidden, weight, targets, 1.0, g, h, impl="torch", chunk_tokens=3,
                              chunk_vocab=4)
    assert logp[[1, 6]].eq(0).all() and ent[[1, 6]].eq(0).all()
    assert dx[[1, 6]].eq(0).all()
    assert dx[[0, 2, 3, 4, 5, 7]].abs().sum(1).gt(0).all()


def test_ignore_index_inside_vocabulary():
    hidden, weight, targets, g, h = make_inputs(6, 5, 9)
    targets[[0, 4]] = 2  # id 2 is a real token but also the ignore_index here
    got = run_op(hidden, weight, targets, 1.0, g, h, ignore_index=2, impl="torch",
                 chunk_tokens=4, chunk_vocab=4)
    assert got[0][[0, 4]].eq(0).all()
    assert_close_to_truth(got, fp64_truth(hidden, weight, targets, 1.0, g, h, 2), 2e-5, 2e-5)


def test_all_rows_ignored():
    hidden, weight, targets, g, h = make_inputs(4, 3, 5)
    targets.fill_(IGNORE)
    logp, ent, dx, dw = run_op(hidden, weight, targets, 1.0, g, h, impl="torch")
    assert logp.eq(0).all() and ent.eq(0).all() and dx.eq(0).all() and dw.eq(0).all()


def test_empty_batch():
    hidden, weight, targets, g, h = make_inputs(0, 4, 6)
    logp, ent, dx, dw = run_op(hidden, weight, targets, 1.0, g, h, impl="torch")
    assert logp.shape == (0,) and ent.shape == (0,) and dx.shape == (0, 4)
    assert dw.eq(0).all()


def test_logp_only_and_frozen_weight():
    hidden, weight, targets, g, _ = make_inputs(7, 5, 12, n_ignored=1)
    x = hidden.clone().requires_grad_()
    logp = linear_logprob(x, weight, targets, 0.9, impl="torch", chunk_tokens=3, chunk_vocab=5)
    assert isinstance(logp, torch.Tensor) and logp.shape == (7,)
    (logp * g).sum().backward()
    t_logp, _, t_dx, _ = fp64_truth(hidden, weight, targets, 0.9, g, torch.zeros(7))
    torch.testing.assert_close(logp.detach().double(), t_logp, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(x.grad.double(), t_dx, atol=2e-5, rtol=2e-5)


def test_auto_picks_torch_on_cpu_and_cuda_is_unavailable():
    hidden, weight, targets, _, _ = make_inputs(3, 4, 5)
    auto = linear_logprob(hidden, weight, targets, impl="auto")
    ref = linear_logprob(hidden, weight, targets, impl="torch")
    assert torch.equal(auto, ref)
    with pytest.raises(ImplUnavailableError, match="impl='cuda' is not implemented"):
        linear_logprob(hidden, weight, targets, impl="cuda")


def test_merge_partials_equals_unsplit_statistics():
    """The merge rule used across vocabulary splits and tensor-parallel ranks."""
    hidden, weight, targets, _, _ = make_inputs(11, 6, 23)
    full = _torch_partials(hidden, weight, targets, 1.0 / 0.9, 0, 4, 7)
    cuts = [0, 5, 6, 17, 23]
    parts = [_torch_partials(hidden, weight[a:b], targets, 1.0 / 0.9, a, 3, 4)
             for a, b in zip(cuts, cuts[1:])]
    merged = merge_partials(torch.stack(parts))  # rows m, s, S, z_y
    torch.testing.assert_close(merged, full, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- properties

@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.integers(1, 4), H=st.integers(1, 9), V=st.integers(1, 40),
       tau=st.floats(0.25, 4.0), seed=st.integers(0, 2**16), ct=st.integers(1, 8),
       cv=st.integers(1, 16))
def test_probabilities_over_the_vocabulary_sum_to_one(T, H, V, tau, seed, ct, cv):
    """logsumexp over every vocabulary id of logp is 0, and the entropy is -sum p log p."""
    hidden, weight, _, _, _ = make_inputs(T, H, V, seed=seed)
    rows = hidden.repeat_interleave(V, dim=0)  # [T*V, H]: each row once per vocabulary id
    ids = torch.arange(V).repeat(T)  # [T*V]
    logp, ent = linear_logprob(rows, weight, ids, tau, True, impl="torch", chunk_tokens=ct,
                               chunk_vocab=cv)
    logp = logp.double().view(T, V)
    torch.testing.assert_close(torch.logsumexp(logp, 1), torch.zeros(T, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    want_ent = -(logp.exp() * logp).sum(1)
    torch.testing.assert_close(ent.double().view(T, V)[:, 0], want_ent, atol=1e-4, rtol=1e-5)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.integers(1, 12), V=st.integers(1, 30), ct=st.integers(1, 13),
       cv=st.integers(1, 31), seed=st.integers(0, 2**16))
def test_chunking_does_not_change_the_result(T, V, ct, cv, seed):
    hidden, weight, targets, g, h = make_inputs(T, 5, V, seed=seed, n_ignored=T // 4)
    a = run_op(hidden, weight, targets, 1.1, g, h, impl="torch", chunk_tokens=ct, chunk_vocab=cv)
    b = run_op(hidden, weight, targets, 1.1, g, h, impl="torch")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- memory

class _RecordSizes(TorchDispatchMode):
    """Records the element count of every tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.sizes.append((t.numel(), str(func)))
        return out


def test_no_tensor_scales_with_tokens_times_vocab():
    T, H, V, ct, cv = 64, 8, 96, 16, 24
    hidden, weight, targets, g, h = make_inputs(T, H, V, n_ignored=3)
    x = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with _RecordSizes() as rec:
        logp, ent = linear_logprob(x, w, targets, 1.0, True, impl="torch", chunk_tokens=ct,
                                   chunk_vocab=cv)
        ((logp * g).sum() + (ent * h).sum()).backward()
    ops = {name for _, name in rec.sizes}
    assert any("addmm" in o for o in ops), "backward ops were not recorded"
    biggest, where = max(rec.sizes)
    # the largest tensors allowed: a logit tile, the weight/its gradient, hidden/its gradient
    assert biggest <= max(ct * cv, V * H, T * H) < T * V, (biggest, where)


# ----------------------------------------------------------------------------- bad input

def _args(**over):
    hidden, weight, targets, _, _ = make_inputs(5, 7, 11)
    args = dict(hidden=hidden, weight=weight, targets=targets)
    args.update(over)
    return args


BAD = {
    "hidden_not_tensor": (dict(hidden=[[1.0]]), "hidden must be a torch.Tensor"),
    "hidden_1d": (dict(hidden=torch.randn(5)), r"hidden must be 2-D, got shape \(5,\)"),
    "hidden_int": (dict(hidden=torch.ones(5, 7, dtype=torch.int64)), "hidden must have dtype in"),
    "weight_width": (dict(weight=torch.randn(11, 6)), r"weight must have shape \[\*, 7\]"),
    "weight_dtype": (dict(weight=torch.randn(11, 7, dtype=torch.float64)),
                     r"weight must have hidden's dtype \(torch.float32\), got torch.float64"),
    "weight_3d": (dict(weight=torch.randn(2, 11, 7)), "weight must be 2-D"),
    "weight_empty": (dict(weight=torch.randn(0, 7)), "weight must have at least one vocabulary"),
    "targets_float": (dict(targets=torch.zeros(5)), r"targets must have dtype in \(int64, int32\)"),
    "targets_len": (dict(targets=torch.zeros(4, dtype=torch.int64)),
                    r"targets must have shape \[5\], got \[4\]"),
    "targets_2d": (dict(targets=torch.zeros(5, 1, dtype=torch.int64)), "targets must be 1-D"),
    "target_too_big": (dict(targets=torch.tensor([0, 1, 11, 2, 3])),
                       r"targets must be in \[0, 11\) .*targets\[2\] = 11"),
    "target_negative": (dict(targets=torch.tensor([0, 1, 2, -3, 3])),
                        r"ignore_index=-100; got targets\[3\] = -3"),
    "temperature_zero": (dict(temperature=0.0), "temperature must be a finite number > 0"),
    "temperature_negative": (dict(temperature=-1.0), "temperature must be a finite number > 0"),
    "temperature_nan": (dict(temperature=float("nan")), "temperature must be a finite number"),
    "temperature_inf": (dict(temperature=float("inf")), "temperature must be a finite number"),
    "temperature_str": (dict(temperature="1"), "temperature must be a finite number"),
    "temperature_rows_len": (dict(temperature=torch.ones(4)),
                             r"temperature must have shape \[5\], got \[4\]"),
    "temperature_rows_int": (dict(temperature=torch.ones(5, dtype=torch.int64)),
                             "temperature must have dtype in"),
    "temperature_rows_grad": (dict(temperature=torch.ones(5, requires_grad=True)),
                              r"temperature requires grad.*temperature.detach\(\)"),
    "temperature_rows_zero": (dict(temperature=torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0])),
                              r"finite and > 0 .*temperature\[3\] = 0.0"),
    "temperature_rows_nan": (dict(temperature=torch.tensor([float("nan"), 1, 1, 1, 1.0])),
                             r"finite and > 0 .*temperature\[0\] = nan"),
    "return_entropy_int": (dict(return_entropy=1), "return_entropy must be a bool"),
    "ignore_index_float": (dict(ignore_index=-100.0), "ignore_index must be an int"),
    "chunk_tokens_zero": (dict(chunk_tokens=0), "chunk_tokens must be None or a positive int"),
    "chunk_vocab_negative": (dict(chunk_vocab=-4), "chunk_vocab must be None or a positive int"),
    "chunk_vocab_float": (dict(chunk_vocab=2.0), "chunk_vocab must be None or a positive int"),
    "impl_unknown": (dict(impl="fast"), "impl must be one of"),
    "tp_group_without_dist": (dict(tp_group=object()), "torch.distributed is not initialized"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_clear_error(case, monkeypatch):
    monkeypatch.setenv("R1FAST_DEBUG_CHECKS", "1")  # the target-range checks are debug-only
    over, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        linear_logprob(**_args(**over))


def test_module_imports_without_triton():
    """The op module must import (and the torch path run) on machines without Triton."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"  # make `import triton` fail
            "import torch\n"
            "from r1fast.ops.linear_logprob import linear_logprob\n"
            "x, w = torch.randn(3, 4), torch.randn(5, 4)\n"
            "print(linear_logprob(x, w, torch.tensor([0, 4, 2]), impl='torch').shape)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([3])" in out.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp32_logits_accumulate_in_fp32(dtype):
    """The sampler's logits: fp32, within fp32 rounding of the fp64 product of the 16-bit
    values (on a GPU, 16-bit operands take cuBLAS's fp32-output GEMM); under autograd the
    weight still gets its gradient."""
    from r1fast.ops.linear_logprob import fp32_logits

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 64, generator=g).to(dev, dtype)  # [b, L, H]
    weight = torch.randn(257, 64, generator=g).to(dev, dtype)  # [V, H]
    with torch.no_grad():
        z = fp32_logits(hidden, weight)
    assert z.dtype == torch.float32 and z.shape == (3, 5, 257)
    exact = hidden.double() @ weight.double().t()
    assert (z.double() - exact).abs().max().item() <= 1e-5 * exact.abs().max().item()
    w = weight.clone().requires_grad_()
    fp32_logits(hidden, w).sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape


def test_cpu_targets_out_of_the_vocabulary_are_errors_without_debug_mode(monkeypatch):
    """The value checks ran only in debug mode, also on CPU tensors where they cost no sync:
    a target equal to V or -1 returned numbers without a word (helper-68)."""
    from r1fast import ops

    monkeypatch.delenv("R1FAST_DEBUG_CHECKS", raising=False)
    hidden, weight = torch.randn(3, 8), torch.randn(11, 8)
    for bad in (11, -1):
        with pytest.raises(ValueError, match=rf"targets\[1\] = {bad}"):
            ops.linear_logprob(hidden, weight, torch.tensor([0, bad, 2]), impl="torch")
    ops.linear_logprob(hidden, weight, torch.tensor([0, -100, 2]), impl="torch")  # ignored
    with pytest.raises(ValueError, match=r"expert ids in \[0, 4\)"):
        ops.moe_permute(hidden, torch.tensor([[0], [4], [1]]), 4)


def test_a_head_of_another_dtype_and_an_integer_mask_say_what_to_do():
    """A bf16 body with an fp32 head was refused as "weight must have dtype in (bfloat16)";
    verl's int64 response_mask was refused by the loss (helper-68)."""
    from r1fast import ops

    hidden, weight = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(11, 8)
    with pytest.raises(ValueError, match=r"weight must have hidden's dtype \(torch.bfloat16\), "
                                         r"got torch.float32 .* hidden.to\(weight.dtype\)"):
        ops.linear_logprob(hidden, weight, torch.tensor([0, 1, 2, 3]), impl="torch")
    logp = -torch.rand(2, 5)
    args = (logp, logp.detach() - 0.1, torch.tensor([1.0, -1.0]))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    as_int, _ = ops.policy_loss(*args, mask, ops.PolicyLossConfig(), impl="torch")
    as_float, _ = ops.policy_loss(*args, mask.float(), ops.PolicyLossConfig(), impl="torch")
    assert torch.equal(as_int, as_float)
