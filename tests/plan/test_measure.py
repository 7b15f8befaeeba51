"""The planner's measuring tools (r1fast.plan.measure) on hand-built autograd graphs whose saved
tensors are known: ``x * x`` saves x (one storage, twice), ``exp`` saves its output, ``sum``
saves nothing; a reentrant checkpoint saves its input and re-runs its function (saving again)
in the backward; measure_peak_alloc_bytes follows every storage an op makes."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from r1fast.plan.measure import measure_peak_saved_bytes, measure_saved_bytes

N = 1000
BYTES = 4 * N  # one fp32 [N] storage


def _f(x):
    return torch.exp(x * x)  # saves x (once as a storage) and the output: 2 storages


def test_saved_bytes_count_each_storage_once_and_skip_excluded():
    x = torch.randn(N, requires_grad=True)
    _, saved = measure_saved_bytes(lambda: _f(x).sum())
    assert saved == 2 * BYTES
    _, saved = measure_saved_bytes(lambda: _f(x).sum(), exclude=[x])
    assert saved == BYTES  # only exp's output


def test_peak_without_recompute_is_the_forward_total():
    x = torch.randn(N, requires_grad=True)
    _, peak, left = measure_peak_saved_bytes(lambda: _f(_f(x)).sum().backward())
    assert (peak, left) == (3 * BYTES, 0)  # x, f(x) (saved by exp and by the next mul), f(f(x))
    out, peak, left = measure_peak_saved_bytes(lambda: _f(x).sum())  # graph kept alive
    assert (peak, left) == (2 * BYTES, 2 * BYTES)
    del out


def test_peak_with_checkpoints_is_in_the_backward():
    x = torch.randn(N, requires_grad=True)

    def step():
        h = checkpoint(_f, x, use_reentrant=True)  # keeps x
        out = checkpoint(_f, h, use_reentrant=True)  # keeps h
        out.sum().backward()

    _, forward = measure_saved_bytes(lambda: checkpoint(
        _f, checkpoint(_f, x, use_reentrant=True), use_reentrant=True).sum())
    assert forward == 2 * BYTES
    # backward of the second segment: x and h kept, h saved again (same storage), its output
    _, peak, left = measure_peak_saved_bytes(step)
    assert (peak, left) == (3 * BYTES, 0)


def test_peak_alloc_bytes_follow_every_storage_made():
    from r1fast.plan.measure import measure_peak_alloc_bytes

    x = torch.randn(N)

    def no_grad_chain():
        with torch.no_grad():
            a = x * 2  # +1
            b = a + 1  # +1 (peak 2)
            del a  # -1
            c = b * b  # +1 (2 again)
            c.add_(1)  # in place: nothing new
            view = c[3:]  # a view: nothing new
            del b  # -1: c's storage stays, through the view
            return view

    out, peak, left = measure_peak_alloc_bytes(no_grad_chain)
    assert (peak, left) == (2 * BYTES, BYTES)
    del out
    _, peak, left = measure_peak_alloc_bytes(lambda: x.add_(1))  # in place on an input
    assert (peak, left) == (0, 0)
