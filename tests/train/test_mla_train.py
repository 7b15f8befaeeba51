"""``r1fast train recipes/tiny_dsv3_mla.toml``: GRPO on the tiny DeepSeek-V3 model (MLA, a dense
first layer, sigmoid group-limited routing with a shared expert) on the CPU, with the recipe's
packed micro-batches. Two steps run; a run stopped after step 1 and resumed for step 2 equals
the uninterrupted run bit for bit: every metric but the timings, and every tensor of the step-2
checkpoint (model shard, optimizer state, RNG states)."""
from __future__ import annotations

from pathlib import Path

import torch

from r1fast.cli import main
from r1fast.rewards import register_reward
from r1fast.train.config import load_train_config
from r1fast.train.metrics import read_jsonl
from tests.helpers.ckpt_state import assert_same, checkpoint_state

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "tiny_dsv3_mla.toml")
TIMINGS = {"time", "tokens_per_s", "time_generation_s", "time_rewards_s", "time_logprobs_s",
           "time_update_s", "time_fwd_bwd_s", "time_optimizer_s"}

@register_reward("mla_train_test_varied")
def varied_reward(completion: str, example: dict) -> float:
    """Differs within groups from the first step (a random tiny policy never solves the task),
    so the update has a policy-gradient term and the weights move."""
    return (sum(map(ord, completion)) % 7) / 6.0


def train(out: Path, steps: int) -> list[dict]:
    rc = main(["train", RECIPE, f"--run.out_dir={out}", f"--run.steps={steps}",
               "--run.progress=false", "--run.tensorboard=false", "--reward.workers=0",
               "--reward.weights.mla_train_test_varied=1.0", "--data.prompts_per_step=2",
               "--rollout.max_new_tokens=12"])
    assert rc == 0
    return read_jsonl(out / "metrics.jsonl")


def checkpoint(out: Path, step: int) -> dict:
    """This (only) rank's state in the step's checkpoint (RNG, and the model, optimizer and
    reference of the distributed checkpoint as full tensors), its checksums verified."""
    return checkpoint_state(out / "checkpoints" / f"step_{step:08d}", out)


def test_grpo_on_tiny_mla_runs_and_resumes_bitwise(tmp_path):
    cfg = load_train_config(RECIPE)
    assert cfg.model.is_mla and cfg.model.dense_layers == (0,)
    assert cfg.parallel.max_tokens_per_microbatch > 0  # packed micro-batches through MLA
    full = train(tmp_path / "full", 2)
    assert [r["step"] for r in full] == [1, 2]
    assert full[0]["reward_std"] > 0 and full[0]["grad_norm"] > 0
    assert train(tmp_path / "cut", 1)[-1]["step"] == 1
    first = checkpoint(tmp_path / "cut", 1)["policy"]
    resumed = train(tmp_path / "cut", 2)
    assert [r["step"] for r in resumed] == [1, 2]  # metrics.jsonl continues the first run
    for a, b in zip(full, resumed):
        assert {k: v for k, v in a.items() if k not in TIMINGS} == \
            {k: v for k, v in b.items() if k not in TIMINGS}
    before, after = checkpoint(tmp_path / "full", 2), checkpoint(tmp_path / "cut", 2)
    assert_same(before, after)
    moved = [k for k in first if not k.startswith("optimizer.")
             and not torch.equal(first[k], before["policy"][k])]
    assert moved, "step 2 changed no weight"
