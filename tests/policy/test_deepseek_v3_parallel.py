"""The DeepSeek-V3 architecture at every layout computes the one-rank model: a tiny MLA model
(q LoRA, YaRN, 3 layers with the first dense, 8 experts in 4 groups, shared expert, expert bias
updated in the step, routed scaling 2.5) at TP2, EP2, PP2 with an uneven split (1 + 2 layers)
and TP2xEP2 gives the one-process log-probs, gradients, global grad norm and post-step weights
(gloo subprocesses, the ``parity`` scenario of tests/helpers/dist.py)."""
from __future__ import annotations

import pytest
import torch

from r1fast.policy.config import ModelConfig
from tests.helpers import dist as _dist

pytestmark = [
    pytest.mark.multiproc,
    pytest.mark.slow,  # ~3.5 min on 2 cores (9 gloo processes); `make test-slow` runs it
    pytest.mark.skipif(torch.cuda.is_available(), reason="gloo CPU layouts; GPU runs use NCCL"),
]

LAYOUTS = {  # name: (tp, pp, ep, world size, extra ParallelConfig fields)
    "TP2": (2, 1, 1, 2, {}),
    "EP2": (1, 1, 2, 2, {}),
    "PP2-uneven": (1, 2, 1, 2, {"pp_first_stage_layers": 1}),
    "TP2xEP2": (2, 1, 2, 4, {}),
}
BATCH, LENGTH = 4, 7
MODEL = ModelConfig(
    vocab_size=128, hidden_size=48, num_layers=3, num_attention_heads=4, ffn_hidden_size=96,
    attention="mla", q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
    v_head_dim=12, rope_type="yarn", rope_factor=4.0, rope_original_max_position=64,
    rope_mscale_all_dim=1.0, max_position_embeddings=256, num_experts=8,
    moe_ffn_hidden_size=16, moe_router_topk=4, dense_layers=(0,), shared_expert_size=16,
    router_score="sigmoid", router_n_groups=4, router_topk_groups=2, router_expert_bias=True,
    router_bias_update_rate=1e-2, router_scaling_factor=2.5)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = dict(ckpt=str(tmp_path_factory.mktemp("ckpt")), lr=1e-3, adam_eps=1e-3,
                batch=BATCH, length=LENGTH, model=MODEL.validate().to_dict())
    out = {"ref": _dist.launch(1, "parity", dict(base, tp=1, pp=1, ep=1, create=True))[0]}
    for name, (tp, pp, ep, world, extra) in LAYOUTS.items():
        out[name] = _dist.launch(world, "parity", dict(base, tp=tp, pp=pp, ep=ep, layout=extra))
    return out


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_logprobs_grads_and_weights(results, layout):
    ref = results["ref"]
    for rank in results[layout]:
        dp, r = int(rank["dp"]), int(rank["dp_rank"])
        n = BATCH // dp
        assert (rank["logprobs"] - ref["logprobs"][r * n:(r + 1) * n]).abs().max().item() < 1e-5
        assert bool(rank["ok"])
        assert abs(rank["grad_norm"].item() - ref["grad_norm"].item()) < 1e-5
    assert max_diff(results[layout][0]["grads"], ref["grads"]) < 1e-5
    assert max_diff(results[layout][0]["state"], ref["state"]) < 1e-6
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert ref["state"][bias].abs().max().item() > 0  # moved in the step, identically
    assert torch.equal(results[layout][0]["state"][bias], ref["state"][bias])


def test_reference_is_not_trivial(results):
    assert results["ref"]["grad_norm"].item() > 1.0
    assert "model.layers.2.self_attn.q_a_proj.weight" in results["ref"]["grads"]
