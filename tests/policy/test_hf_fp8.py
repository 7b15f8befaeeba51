"""DeepSeek's block-FP8 release read through its scales (r1fast.policy.hf_fp8): any slice of
a weight equals the same slice of the whole dequantization (the fp32 product, within fp32
rounding of fp64; E8M0 byte scales decoded); a tiny DeepSeek-V3 saved in that format loads
into exactly the parameters of its dequantized twin, in fp32 and in bf16 (DeepSeek's
conversion), and exports without scales; checkpoints the loader cannot read are errors naming
the tensor or config field."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from r1fast.policy.hf_fp8 import DequantSlice, block_size
from tests.helpers.hf_parity import load

transformers = pytest.importorskip("transformers")

FP8_MAX = 448.0  # float8_e4m3fn


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 values, fp32 factor per block) of ``w``, as DeepSeek's release stores them."""
    b0, b1 = block
    rows, cols = -(-w.shape[0] // b0), -(-w.shape[1] // b1)
    scale = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            tile = w[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1]
            scale[i, j] = tile.abs().max().clamp_min(1e-12) / FP8_MAX
    full = scale.repeat_interleave(b0, 0).repeat_interleave(b1, 1)[:w.shape[0], :w.shape[1]]
    return (w / full).to(torch.float8_e4m3fn), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, block, dtype=torch.float32):
    """The whole weight: every value times its block's factor, in ``dtype``."""
    b0, b1 = block
    full = scale.repeat_interleave(b0, 0).repeat_interleave(b1, 1)[:q.shape[0], :q.shape[1]]
    return q.to(dtype) * full.to(dtype)


@pytest.fixture(scope="module")
def fp8_file(tmp_path_factory):
    block = (8, 16)
    w = torch.randn(37, 50) * torch.logspace(-3, 1, 50)  # columns of very different size
    q, scale = quantize(w, block)
    path = tmp_path_factory.mktemp("fp8") / "w.safetensors"
    save_file({"w": q, "w_scale_inv": scale}, str(path))
    return path, q, scale, block


@settings(max_examples=60, deadline=None)
@given(r0=st.integers(0, 37), r1=st.integers(0, 37), c0=st.integers(0, 50),
       c1=st.integers(0, 50))
def test_any_slice_is_that_slice_of_the_whole_dequantization(fp8_file, r0, r1, c0, c1):
    path, q, scale, block = fp8_file
    whole = dequantize(q, scale, block)
    with safe_open(str(path), framework="pt") as f:
        sl = DequantSlice("w", f.get_slice("w"), f.get_slice("w_scale_inv"), block)
        assert sl.get_shape() == [37, 50] and sl.get_dtype() == "F32"
        got = sl[r0:r1, c0:c1]
        assert got.dtype == torch.float32 and torch.equal(got, whole[r0:r1, c0:c1])
        assert torch.equal(sl[r0:r1], whole[r0:r1]) and torch.equal(sl[:], whole)


def test_the_dequantization_is_fp32_rounding_of_fp64_and_decodes_e8m0(fp8_file, tmp_path):
    _, q, scale, block = fp8_file
    mine, exact = dequantize(q, scale, block).double(), dequantize(q, scale, block, torch.float64)
    rel = ((mine - exact).abs() / exact.abs().clamp_min(1e-30)).max().item()
    assert rel <= 2 ** -24
    # MXFP8-style factors: one E8M0 byte per block, the scale 2 ** (byte - 127)
    exponents = torch.randint(100, 140, scale.shape, dtype=torch.uint8)
    save_file({"w": q, "w_scale_inv": exponents}, str(tmp_path / "e8m0.safetensors"))
    with safe_open(str(tmp_path / "e8m0.safetensors"), framework="pt") as f:
        got = DequantSlice("w", f.get_slice("w"), f.get_slice("w_scale_inv"), block)[:]
    powers = torch.pow(2.0, exponents.double() - 127)
    assert torch.equal(got.double(), dequantize(q, powers, block, torch.float64))


def _fp8_twins(src, tmp_path, block):
    """(FP8 folder, folder of the same weights dequantized in fp32): every projection weight of
    the checkpoint ``src`` quantized in ``block``s, as DeepSeek-V3's release is."""
    tensors = load_file(f"{src}/model.safetensors")
    fp8, ref = dict(tensors), dict(tensors)
    for key, w in tensors.items():
        if key.endswith("proj.weight") or key.endswith("proj_with_mqa.weight"):
            q, scale = quantize(w.float(), block)
            fp8[key], fp8[key + "_scale_inv"] = q, scale
            ref[key] = dequantize(q, scale, block)
    folders = []
    for name, tensors_out, quant in (("fp8", fp8, True), ("ref", ref, False)):
        out = tmp_path / name
        shutil.copytree(src, out)
        save_file(tensors_out, str(out / "model.safetensors"))
        if quant:
            cfg = json.loads((out / "config.json").read_text())
            cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                          "activation_scheme": "dynamic",
                                          "weight_block_size": list(block)}
            (out / "config.json").write_text(json.dumps(cfg))
        folders.append(out)
    return folders


@pytest.fixture(scope="module")
def dsv3(tmp_path_factory):
    from tests.policy.test_deepseek_v3 import make_hf

    path = tmp_path_factory.mktemp("dsv3_bf16")
    make_hf().save_pretrained(str(path), safe_serialization=True)
    return path


def test_an_fp8_release_loads_as_its_dequantized_twin_and_exports_bf16(dsv3, tmp_path):
    from r1fast.policy.hf_checkpoint import save_hf_checkpoint

    import dataclasses

    from r1fast.policy.config import ParallelConfig
    from r1fast.policy.hf_checkpoint import load_hf_checkpoint, load_model_config
    from r1fast.policy.model import build_policy

    fp8, ref = _fp8_twins(dsv3, tmp_path, (8, 16))
    assert block_size(str(fp8)) == (8, 16) and block_size(str(ref)) is None
    a, b = load(str(fp8)), load(str(ref))
    pa, pb = dict(a.gpt.named_parameters()), dict(b.gpt.named_parameters())
    original = dict(load(str(dsv3)).gpt.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
    # bf16 parameters: the fp32 products rounded once, as DeepSeek's fp8_cast_bf16.py writes
    cfg = dataclasses.replace(load_model_config(str(fp8)), params_dtype="bfloat16")
    half = build_policy(cfg, ParallelConfig(), trainable=False)
    load_hf_checkpoint(half, str(fp8))
    halves = dict(half.gpt.named_parameters())
    for name, p in halves.items():
        assert torch.equal(p, pb[name].to(p.dtype)), name
    # the FP8 values were read, not the original ones: quantization moved every projection
    moved = [n for n in pa if not torch.equal(pa[n], original[n])]
    assert len(moved) >= 10 and all("norm" not in n and "router" not in n for n in moved)
    assert all(halves[n].dtype == torch.bfloat16 for n in moved)
    save_hf_checkpoint(a, str(tmp_path / "export"))
    out = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert not [k for k in out if k.endswith("_scale_inv")]
    assert {t.dtype for t in out.values()} <= {torch.float32, torch.bfloat16}


def test_scales_in_another_shard_of_an_index_are_found(dsv3, tmp_path):
    """An index may file a weight and its scale in different shards; the reader looked for the
    scale in the weight's file."""
    fp8, ref = _fp8_twins(dsv3, tmp_path, (8, 16))
    tensors = load_file(str(fp8 / "model.safetensors"))
    scales = {k: v for k, v in tensors.items() if k.endswith("_scale_inv")}
    weights = {k: v for k, v in tensors.items() if k not in scales}
    (fp8 / "model.safetensors").unlink()
    save_file(weights, str(fp8 / "weights.safetensors"))
    save_file(scales, str(fp8 / "scales.safetensors"))
    index = {"metadata": {}, "weight_map": {**{k: "weights.safetensors" for k in weights},
                                            **{k: "scales.safetensors" for k in scales}}}
    (fp8 / "model.safetensors.index.json").write_text(json.dumps(index))
    a, b = load(str(fp8)), load(str(ref))
    pb = dict(b.gpt.named_parameters())
    for name, p in a.gpt.named_parameters():
        assert torch.equal(p, pb[name]), name


def test_what_the_loader_cannot_read_is_named(dsv3, tmp_path):
    fp8, _ = _fp8_twins(dsv3, tmp_path, (8, 16))
    key = "model.layers.0.self_attn.o_proj.weight"
    tensors = load_file(str(fp8 / "model.safetensors"))
    lone = dict(tensors)
    del lone[key + "_scale_inv"]
    save_file(lone, str(fp8 / "model.safetensors"))
    with pytest.raises(ValueError, match=f"{key} is F8_E4M3 without its block scale"):
        load(str(fp8))
    wrong = dict(tensors)
    wrong[key + "_scale_inv"] = torch.ones(2, 2)
    save_file(wrong, str(fp8 / "model.safetensors"))
    with pytest.raises(ValueError, match=r"o_proj.weight_scale_inv has shape \[2, 2\]; blocks "):
        load(str(fp8))
    cfg = json.loads((fp8 / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "awq"
    (fp8 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"quantization_config.quant_method is 'awq'"):
        block_size(str(fp8))
