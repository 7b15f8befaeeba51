"""Host tensors to the GPU without making the host wait.

A plain ``tensor.to("cuda")`` of a CPU tensor (and ``torch.tensor(data, device="cuda")``)
copies from pageable memory, and torch then synchronises the stream: the host waits until the
GPU has finished everything queued before it, so the kernels the host would launch next are
not queued while the GPU drains. In a training step the micro-batch's targets, old log-probs,
masks and advantages arrive from the host at the loss head, right after the forward was
queued: each plain copy there is one such wait. A copy from pinned (page-locked) memory with
``non_blocking=True`` is queued like a kernel instead; torch's pinned-memory cache keeps the
staging buffer alive until the copy has run.

:func:`to_device_async` sends one tensor that way; :func:`to_device_once` sends several int64
tensors (a packed micro-batch's boundaries and plans) in one copy. Off CUDA both are ``.to``.
``tests/policy/test_transfer.py`` checks on a GPU that they pass torch's sync-error mode where
a plain copy does not.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def to_device_async(tensor: Optional[torch.Tensor],
                    device: torch.device | str) -> Optional[torch.Tensor]:
    """``tensor`` on ``device``; a CPU tensor going to CUDA goes through pinned memory and a
    non-blocking copy (no wait). None stays None; a tensor already there is returned as is."""
    if tensor is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def to_device_once(device: torch.device | str | None,
                   tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Host ``tensors`` as int64 on ``device`` (None: on the host), through one copy that
    does not make the host wait (:func:`to_device_async` of their concatenation); views of
    that one copy."""
    tensors = [t.to(torch.int64) for t in tensors]
    if device is None or not tensors:
        return tensors
    flat = to_device_async(torch.cat([t.reshape(-1) for t in tensors]), device)
    parts = flat.split([t.numel() for t in tensors])
    return [part.view(t.shape) for part, t in zip(parts, tensors)]
