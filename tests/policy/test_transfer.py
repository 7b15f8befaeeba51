"""Host-to-GPU copies that do not make the host wait (r1fast.policy.transfer): shapes, dtypes
and values on any device; on a GPU, that they pass torch's sync-error mode, and that a plain
copy does not (the premise: torch synchronises the stream after a copy from pageable memory)."""
from __future__ import annotations

import pytest
import torch

from r1fast.policy.transfer import to_device_async, to_device_once

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_to_device_once_returns_views_of_one_copy():
    parts = [torch.arange(6).view(2, 3), torch.tensor([7], dtype=torch.int32), torch.empty(0)]
    got = to_device_once("cpu", parts)
    assert [t.shape for t in got] == [t.shape for t in parts]
    assert all(t.dtype == torch.int64 for t in got)
    assert got[0].tolist() == [[0, 1, 2], [3, 4, 5]] and got[1].tolist() == [7]
    assert got[0].untyped_storage().data_ptr() == got[1].untyped_storage().data_ptr()
    assert to_device_once("cpu", []) == [] and to_device_once(None, parts)[1].dtype == torch.int64
    assert all(t.is_meta for t in to_device_once("meta", parts))


def test_to_device_async_keeps_values_dtype_and_none():
    x = torch.randn(3, 5).t()  # non-contiguous
    assert to_device_async(None, "cpu") is None
    assert to_device_async(x, "cpu") is x
    meta = to_device_async(x, "meta")
    assert meta.is_meta and meta.shape == x.shape and meta.dtype == x.dtype


@CUDA
def test_copies_pass_sync_error_mode_where_a_plain_copy_does_not():
    host = {"f32": torch.randn(257, 3).t(), "i64": torch.arange(1000), "bool": torch.ones(9) > 0}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):  # the premise: a pageable copy synchronises
            host["i64"].to("cuda")
        sent = {k: to_device_async(v, "cuda") for k, v in host.items()}
        once = to_device_once("cuda", [host["i64"], host["bool"].long()])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for k, v in host.items():
        assert sent[k].is_cuda and torch.equal(sent[k].cpu(), v)
    assert torch.equal(once[0].cpu(), host["i64"]) and once[1].cpu().bool().all()
