"""What every launcher in this package shares: launching on the GPU that holds the tensors,
and short autotuning trials.

Triton launches a kernel on the *current* CUDA device, on that device's current stream, not on
the device of its tensor arguments. Called with tensors on ``cuda:1`` while ``cuda:0`` is
current, a launcher would run the kernel on ``cuda:0`` against ``cuda:1``'s memory (an illegal
address) and outside the stream that orders the tensors' producers. Per-rank
``torch.cuda.set_device`` hides this in training; a library imported into another trainer
cannot count on it. So every launch sits inside :func:`on_device_of`
(``tests/ops/test_launch_device.py`` checks that each one does).
"""
from __future__ import annotations

import contextlib

import torch


def on_device_of(t: torch.Tensor):
    """A context making ``t``'s CUDA device current (nothing for a CPU tensor, i.e. under the
    Triton interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def short_trials(fn, quantiles):
    """An autotuning trial of ~30 ms, for ``triton.autotune(do_bench=...)`` (Triton's default
    is ~125 ms): the kernels take 0.1-5 ms at real shapes, every new shape tunes several
    kernels of several configs, and the GPU tests meet many shapes in one short session."""
    from triton.runtime import driver

    return driver.active.get_benchmarker()(fn, quantiles=quantiles, warmup=5, rep=25)
