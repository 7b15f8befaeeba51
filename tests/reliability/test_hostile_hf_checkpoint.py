"""Hostile HF checkpoints: a tensor whose shape only fits after slicing, extra and missing
tensors, NaN/Inf weights, int/bool tensors where weights are floats. Each is refused with a
message naming the tensor; nothing is silently truncated, ignored or cast."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.hf_checkpoint import (gather_hf_state_dict, load_hf_checkpoint,
                                         save_hf_checkpoint)
from r1fast.policy.model import build_policy

pytestmark = pytest.mark.reliability

EMB = "model.embed_tokens.weight"
NORM = "model.layers.0.input_layernorm.weight"
PROJ = "model.layers.1.self_attn.o_proj.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    cfg = ModelConfig.preset("tiny-moe")
    policy = build_policy(cfg, ParallelConfig(), trainable=False, seed=5)
    path = tmp_path_factory.mktemp("good")
    save_hf_checkpoint(policy, str(path))
    return cfg, path, gather_hf_state_dict(policy)


def _tampered(good, tmp_path, change):
    cfg, path, _ = good
    tensors = load_file(os.path.join(path, "model.safetensors"))
    change(tensors)
    out = tmp_path / "bad"
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    for f in os.listdir(path):
        if f.endswith(".json"):
            (out / f).write_text((path / f).read_text())
    return out


def _load(cfg, path, **kw):
    policy = build_policy(cfg, ParallelConfig(), trainable=False, seed=6)
    load_hf_checkpoint(policy, str(path), **kw)
    return policy


def _set(key, fn):
    def change(t):
        t[key] = fn(t[key])
    return change


CASES = {
    "larger_embedding": (_set(EMB, lambda v: torch.cat([v, v[:7]])), rf"{EMB} has shape"),
    "smaller_embedding": (_set(EMB, lambda v: v[:-1].clone()), rf"{EMB} has shape"),
    "wider_proj": (_set(PROJ, lambda v: torch.cat([v, v], 1)), rf"{PROJ} has shape"),
    "transposed_proj": (_set(PROJ, lambda v: v.t().contiguous().reshape(v.shape[1], -1)
                             if v.shape[0] != v.shape[1] else v.t().contiguous()[:-1]),
                        rf"{PROJ} has shape"),
    "norm_as_2d": (_set(NORM, lambda v: v[None]), rf"{NORM} has shape"),
    "int_weight": (_set(NORM, lambda v: v.round().long()), rf"{NORM} has dtype I64"),
    "bool_weight": (_set(NORM, lambda v: v > 0), rf"{NORM} has dtype BOOL"),
    "nan_weight": (_set(PROJ, lambda v: v.index_fill(0, torch.tensor([1]), float("nan"))),
                   rf"{PROJ} holds NaN or Inf"),
    "inf_weight": (_set(NORM, lambda v: v.index_fill(0, torch.tensor([0]), float("inf"))),
                   rf"{NORM} holds NaN or Inf"),
    "extra_tensor": (lambda t: t.__setitem__("model.layers.9.mlp.gate.weight", torch.ones(2)),
                     r"1 tensors the policy does not use.*model.layers.9.mlp.gate.weight"),
    "missing_tensor": (lambda t: t.pop(PROJ), rf"lacks 1 tensors, e.g. \['{PROJ}'\]"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_checkpoint_is_refused_naming_the_tensor(good, tmp_path, case):
    change, msg = CASES[case]
    path = _tampered(good, tmp_path, change)
    with pytest.raises(ValueError, match=msg):
        _load(good[0], path)


def test_allow_nonfinite_loads_nan_weights(good, tmp_path):
    path = _tampered(good, tmp_path, CASES["nan_weight"][0])
    policy = _load(good[0], path, allow_nonfinite=True)
    assert torch.isnan(gather_hf_state_dict(policy)[PROJ][1]).all()


def test_harmless_extras_are_ignored_and_good_loads_exactly(good, tmp_path):
    cfg, _, state = good
    path = _tampered(good, tmp_path, lambda t: t.__setitem__(
        "model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(4)))
    again = gather_hf_state_dict(_load(cfg, path))
    assert set(again) == set(state) and all(torch.equal(again[k], state[k]) for k in state)
