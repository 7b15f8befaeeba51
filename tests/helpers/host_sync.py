"""Recording host syncs issued from r1fast code (tests/ops/test_host_sync.py and the policy's
router test): ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool(t)`` / ``int(t)``,
``nonzero``, ``bincount``, ``unique``, ``masked_select``, indexing with a boolean mask. On a CPU nothing waits, so the
recorder stands in for the GPU; on a GPU it also turns on ``torch.cuda.set_sync_debug_mode
("error")``, which raises on any synchronising CUDA call."""
from __future__ import annotations

import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

_SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::bincount",
             "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
             "aten::masked_select", "aten::is_nonzero"}


def _from_r1fast() -> bool:
    """True when the innermost non-torch frame is r1fast code (not Triton's interpreter)."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if "/triton/" in name:
            return False
        if "/r1fast/" in name or "/kernels/" in name:
            return "/tests/" not in name
        f = f.f_back
    return False


#: ``x[mask]`` and ``x[mask] = v``: the mask becomes indices (its count), which a GPU must
#: report to the host first
_INDEX_OPS = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


def _boolean_index(args) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in args[1] or ())


class SyncRecorder(TorchDispatchMode):
    """Records the host-syncing calls made from r1fast code while active (and on a GPU makes
    every synchronising CUDA call raise)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.calls: list[str] = []
        self._cuda = DEVICE.type == "cuda"
        from r1fast.ops import _dispatch

        # CPU tensors always get their value checks (nothing waits there); standing in for
        # the GPU, the recorder puts the accelerator's rule in place (checks under
        # R1FAST_DEBUG_CHECKS or validate=True only)
        monkeypatch.setattr(_dispatch, "value_checks",
                            lambda device: _dispatch.debug_checks())
        for name in ("item", "tolist", "cpu", "numpy"):
            original = getattr(torch.Tensor, name)

            def wrapper(t, *a, _name=name, _orig=original, **kw):
                if _from_r1fast():
                    self.calls.append(f"Tensor.{_name}")
                return _orig(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, wrapper)

    def __enter__(self):
        if self._cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        return super().__enter__()

    def __exit__(self, *exc):
        if self._cuda:
            torch.cuda.set_sync_debug_mode("default")
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in _SYNC_OPS and _from_r1fast():
            self.calls.append(name)
        elif name in _INDEX_OPS and _boolean_index(args) and _from_r1fast():
            self.calls.append(f"{name} (boolean mask)")  # the mask's count, read on the host
        return func(*args, **(kwargs or {}))
