"""Resume at another parallel layout (megatron distributed checkpoints, issue #16).

A GRPO run saved at TP2 x EP2 (4 gloo ranks) resumes at EP4 (4 ranks) and at one rank; its next
step equals the step of a run that trained at that layout from the start (1e-5), and the
weights after it, exported by ONE process from the 4-rank checkpoint, equal the uninterrupted
run's to 2e-4. That bound is Adam's, not the reshard's: layouts agree to ~1e-7 in the gradients,
and m / sqrt(v) turns that into up to ~1e-4 (of lr = 3e-3 steps) on the few elements whose
gradient is near zero (uninterrupted EP4 and one-rank runs differ by 2.6e-5 there). The reshard
itself is bitwise (tests/policy/test_dist_ckpt.py). The layouts start from the same Hugging Face
weights (random init differs by layout). Slow: 7 runs of 1-4 ranks, ~3 min on 2 cores."""
import json
import os
import shutil

import pytest
import torch

from tests.helpers.spawn import run_ranks
from tests.train.test_grpo import _save_init, make_cfg, varied_reward

TP2xEP2 = ["--parallel.tp=2", "--parallel.ep=2"]
EP4 = ["--parallel.ep=4"]
METRICS = ("reward_mean", "response_length", "loss", "grad_norm", "kl", "entropy", "clip_frac",
           "logp_mismatch")


def _fit(rank, out_dir, extra):
    from r1fast.train.grpo import GRPOTrainer

    rows = GRPOTrainer(make_cfg(out_dir, *extra), reward=varied_reward).fit()
    if rank == 0:
        with open(os.path.join(out_dir, f"rows_{len(rows)}.json"), "w") as f:
            json.dump(rows, f)


def _export(rank, run_dir, out):
    from r1fast.train.export import export_checkpoint

    export_checkpoint(run_dir, out)


def _rows(out_dir, n):
    with open(os.path.join(out_dir, f"rows_{n}.json")) as f:
        return json.load(f)


def _weights(folder):
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


@pytest.mark.slow
@pytest.mark.multiproc
def test_resume_at_another_layout_matches_that_layout(tmp_path):
    init = tmp_path / "init"
    run_ranks(1, _save_init, str(init))
    extra = ["--optim.lr=0.003", "--algo.kl_coef=0.01", "--model.aux_loss_coef=0.0",
             f"--run.init_from={init}", "--data.prompts_per_step=4", "--run.save_every=1"]
    # step 1 at TP2 x EP2, then the same checkpoint resumed at EP4 and at one rank
    run_ranks(4, _fit, str(tmp_path / "to_ep4"), [*extra, "--run.steps=1", *TP2xEP2])
    shutil.copytree(tmp_path / "to_ep4", tmp_path / "to_one")
    run_ranks(4, _fit, str(tmp_path / "to_ep4"), [*extra, "--run.steps=2", *EP4])
    run_ranks(1, _fit, str(tmp_path / "to_one"), [*extra, "--run.steps=2"])
    # uninterrupted runs at the resumed layouts
    run_ranks(4, _fit, str(tmp_path / "ep4"), [*extra, "--run.steps=2", *EP4])
    run_ranks(1, _fit, str(tmp_path / "one"), [*extra, "--run.steps=2"])
    for resumed, whole in (("to_ep4", "ep4"), ("to_one", "one")):
        a, b = _rows(tmp_path / resumed, 1)[0], _rows(tmp_path / whole, 2)[1]
        assert a["step"] == b["step"] == 2
        assert a["reward_std"] > 0  # the policy gradient is not trivially zero
        for key in METRICS:
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), \
                (resumed, key, a[key], b[key])
        # the step-2 weights, exported by one process from a checkpoint of 4 (or 1) ranks
        run_ranks(1, _export, str(tmp_path / resumed), str(tmp_path / f"{resumed}_hf"))
        run_ranks(1, _export, str(tmp_path / whole), str(tmp_path / f"{whole}_hf"))
        wa, wb = _weights(tmp_path / f"{resumed}_hf"), _weights(tmp_path / f"{whole}_hf")
        assert set(wa) == set(wb)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=2e-4, msg=f"{resumed}: {k}")
