"""Block-quantized FP8 checkpoints (DeepSeek-V3's and R1's release), dequantized on load.

DeepSeek publishes V3 and R1 with most linear weights in ``float8_e4m3fn`` and one float32
factor per ``128 x 128`` block of each, in a companion tensor ``<name>_scale_inv`` (despite
the name, the factor the FP8 values are multiplied by); ``config.json`` says so in
``quantization_config`` (``{"quant_method": "fp8", "fmt": "e4m3", "weight_block_size":
[128, 128]}``). Embeddings, norms, routers and the output layer stay bf16.

The checkpoint loader (:mod:`r1fast.policy.hf_checkpoint`) reads such a weight through
:class:`DequantSlice`: only the rows and columns the rank's shard needs, each value times its
block's factor in fp32. Loaded into bf16 parameters that rounds to what DeepSeek's own
conversion script (``inference/fp8_cast_bf16.py``, a Triton kernel that needs a GPU) writes;
into fp32 ones it is what transformers' FP8 dequantization gives. So an FP8 release loads at
any TP/PP/EP layout without a conversion pass, and a saved or exported model holds the
parameters' dtype. Factors stored as E8M0 exponents (one unsigned byte per block, the scale
``2 ** (byte - 127)``, as MXFP8 checkpoints ship them) are decoded, never read as numbers.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import torch

#: the companion tensor of an FP8 weight ``<name>``: ``<name>_scale_inv``
SCALE_SUFFIX = "_scale_inv"
#: DeepSeek-V3's block, for a checkpoint whose config.json does not give one
DEFAULT_BLOCK = (128, 128)


def block_size(path: str) -> Optional[tuple[int, int]]:
    """The FP8 block ``(rows, columns)`` in ``path/config.json``'s ``quantization_config``;
    None when the config has no FP8 quantization. A quantization this loader cannot read is
    an error naming the field."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        return None
    with open(cfg_path) as f:
        q = json.load(f).get("quantization_config")
    if not q:
        return None
    where = f"{cfg_path}: quantization_config"
    if q.get("quant_method") != "fp8":
        raise ValueError(f"{where}.quant_method is {q.get('quant_method')!r}; only DeepSeek's "
                         f"block FP8 ('fp8') is read")
    if q.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"{where}.fmt is {q.get('fmt')!r}; only 'e4m3' is read")
    block = q.get("weight_block_size", list(DEFAULT_BLOCK))
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"{where}.weight_block_size must be two positive ints, got {block!r}")
    return block[0], block[1]


def _bounds(index: Any, shape: tuple[int, int]) -> tuple[slice, slice]:
    """``index`` (``[a:b]``, ``[:, a:b]``, ``[:]``: what the loader asks) as two unit-step
    slices with their bounds resolved."""
    parts = index if isinstance(index, tuple) else (index,)
    parts = parts + (slice(None),) * (2 - len(parts))
    if len(parts) != 2 or not all(isinstance(p, slice) for p in parts):
        raise TypeError(f"an FP8 weight is read by row and column slices, got {index!r}")
    out = []
    for p, n in zip(parts, shape):
        start, stop, step = p.indices(n)
        if step != 1:
            raise TypeError(f"an FP8 weight is read by unit-step slices, got {index!r}")
        out.append(slice(start, max(start, stop)))
    return out[0], out[1]


class DequantSlice:
    """A safetensors slice of an FP8 weight that reads as its fp32 dequantization (module
    doc): ``get_shape()``, ``get_dtype()`` ("F32") and ``[rows, cols]`` indexing."""

    def __init__(self, key: str, weight: Any, scale: Any, block: tuple[int, int]) -> None:
        self.key, self.weight, self.scale, self.block = key, weight, scale, block
        shape, dtype = tuple(weight.get_shape()), weight.get_dtype()
        if not dtype.startswith("F8"):
            raise ValueError(f"{key} has a {key}{SCALE_SUFFIX} block scale but dtype {dtype}, "
                             f"not FP8")
        if len(shape) != 2:
            raise ValueError(f"{key}: an FP8 weight must be 2-D, got shape {list(shape)}")
        want = tuple(math.ceil(n / b) for n, b in zip(shape, block))
        got = tuple(scale.get_shape())
        if got != want:
            raise ValueError(f"{key}{SCALE_SUFFIX} has shape {list(got)}; blocks of "
                             f"{list(block)} over {list(shape)} need {list(want)} (check "
                             f"quantization_config.weight_block_size)")
        self.shape = shape

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> str:
        return "F32"

    def __getitem__(self, index: Any) -> torch.Tensor:
        rows, cols = _bounds(index, self.shape)
        (b0, b1), (r0, c0) = self.block, (rows.start, cols.start)
        w = self.weight[rows, cols].float()  # [r, c]
        s = self.scale[r0 // b0: -(-rows.stop // b0), c0 // b1: -(-cols.stop // b1)]
        s = (s.float() - 127.0).exp2() if s.dtype == torch.uint8 else s.float()  # E8M0 bytes
        s = s.repeat_interleave(b0, 0).repeat_interleave(b1, 1)  # a factor per value
        s = s[r0 % b0: r0 % b0 + w.shape[0], c0 % b1: c0 % b1 + w.shape[1]]
        return w * s
