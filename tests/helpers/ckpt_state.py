"""The whole content of an r1fast training checkpoint as one nested dict, for bitwise
comparisons in tests: this rank's file (RNG) and the distributed model/optimizer state of
``policy/`` (and ``reference/``) read back as full, unsharded tensors with torch's
``dcp_to_torch_save``, the layout-free view of megatron's distributed checkpoint; and
:func:`assert_same`, the bitwise comparison of two such states (or metrics rows)."""
import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from r1fast.train.checkpoint import load_checkpoint


def checkpoint_state(folder: Path, scratch: Path) -> dict:
    """``{"rank": this rank's state, "policy": {key: tensor}, "reference": ...}`` of checkpoint
    ``folder`` (checksums verified); ``scratch`` is a folder for the converted files."""
    rank_state, _ = load_checkpoint(folder)
    out = {"rank": rank_state}
    for part in ("policy", "reference"):
        if (folder / part).is_dir():
            file = Path(scratch) / f"{folder.name}_{part}.pt"
            with warnings.catch_warnings():  # torch's own ShardedTensor deprecation notices
                warnings.simplefilter("ignore", FutureWarning)
                dcp_to_torch_save(folder / part, file)
            out[part] = {k: v for k, v in torch.load(file, weights_only=False).items()
                         if isinstance(v, torch.Tensor)}  # tensors: weights, moments, step
    return out


def assert_same(a, b, where: str = "") -> None:
    """Equal containers of equal tensors (bitwise) and equal plain values."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where
