"""Every parallel layout computes the one-rank model: TP2, EP2, PP2 and TP2xEP2 (4 ranks) give
the same log-probs, the same full gradients and global gradient norm, and -- after one step of
megatron's distributed optimizer -- the same full weights as one process.

The model is a DeepSeek-V3-like MoE that exercises every layout-sensitive path at once: a
dense first layer, sigmoid group-limited routing with the aux-loss-free expert bias (updated
in the step), a gated shared expert, load-balancing and z losses, q/k norms. Sequences have
odd length 7, so sequence parallelism at TP2 pads them (and the router must ignore the pad),
and one target is ignored. Each DP rank takes its share of the batch as microbatches of one
sequence, the loss is normalised by the global token count. All ranks are gloo subprocesses."""
from __future__ import annotations

import pytest
import torch

from r1fast.policy.config import ModelConfig
from tests.helpers import dist as _dist

pytestmark = [
    pytest.mark.multiproc,
    pytest.mark.skipif(torch.cuda.is_available(), reason="gloo CPU layouts; GPU runs use NCCL"),
]

LAYOUTS = {  # name: (tp, pp, ep, world size)
    "TP2": (2, 1, 1, 2),
    "EP2": (1, 1, 2, 2),
    "PP2": (1, 2, 1, 2),
    "TP2xEP2": (2, 1, 2, 4),
}
BATCH, LENGTH = 4, 7


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cfg = ModelConfig.preset("tiny-dsv3").replace(
        dense_layers=(0,), shared_expert_gate=True, aux_loss_coef=1e-2, z_loss_coef=1e-3,
        router_bias_update_rate=1e-2)
    base = dict(ckpt=str(tmp_path_factory.mktemp("ckpt")), lr=1e-3, adam_eps=1e-3,
                batch=BATCH, length=LENGTH, model=cfg.to_dict())
    out = {"ref": _dist.launch(1, "parity", dict(base, tp=1, pp=1, ep=1, create=True))[0]}
    for name, (tp, pp, ep, world) in LAYOUTS.items():
        out[name] = _dist.launch(world, "parity", dict(base, tp=tp, pp=pp, ep=ep))
    return out


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_logprobs(results, layout):
    ref = results["ref"]["logprobs"]
    for rank in results[layout]:
        dp, r = int(rank["dp"]), int(rank["dp_rank"])
        n = BATCH // dp
        assert rank["logprobs"].shape == (n, LENGTH)
        assert (rank["logprobs"] - ref[r * n:(r + 1) * n]).abs().max().item() < 1e-5


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_gradients_and_grad_norm(results, layout):
    ref = results["ref"]
    assert max_diff(results[layout][0]["grads"], ref["grads"]) < 1e-5
    for rank in results[layout]:  # every rank reports the same global norm
        assert bool(rank["ok"])
        assert abs(rank["grad_norm"].item() - ref["grad_norm"].item()) < 1e-5


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_weights_after_one_optimizer_step(results, layout):
    ref = results["ref"]["state"]
    got = results[layout][0]["state"]
    assert max_diff(got, ref) < 1e-6
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert ref[bias].abs().max().item() > 0  # the expert bias moved, identically
    assert torch.equal(got[bias], ref[bias])


def test_reference_is_not_trivial(results):
    ref = results["ref"]
    assert ref["grad_norm"].item() > 1.0
    assert ref["logprobs"].abs().max().item() > 1.0


def test_sequence_wise_balance_loss_under_sequence_parallelism(tmp_path):
    """TP2 with sequence parallelism holds half of every row on each rank (the second half
    with the pad): the sequence-wise loss sums the rows' counts and lengths over the two ranks,
    so the gradients are the one-rank ones."""
    cfg = ModelConfig.preset("tiny-dsv3").replace(aux_loss_coef=5e-2,
                                                  aux_loss_type="seq_aux_loss")
    base = dict(ckpt=str(tmp_path / "ckpt"), lr=1e-3, adam_eps=1e-3, batch=2, length=LENGTH,
                model=cfg.to_dict())
    ref = _dist.launch(1, "parity", dict(base, tp=1, pp=1, ep=1, create=True))[0]
    tp2 = _dist.launch(2, "parity", dict(base, tp=2, pp=1, ep=1))
    assert max_diff(tp2[0]["grads"], ref["grads"]) < 1e-6
    off = _dist.launch(1, "parity", dict(base, tp=1, pp=1, ep=1, create=True,
                                         ckpt=str(tmp_path / "off"),  # the same weights
                                         model=cfg.replace(aux_loss_coef=0.0).to_dict()))[0]
    assert max_diff(off["grads"], ref["grads"]) > 1e-5  # the loss moves the gradients
