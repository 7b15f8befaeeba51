"""examples/ops_demo.py: GRPO through r1fast.ops alone really learns, and reproducibly.

The example is a script, not a package module, so it is loaded from its path. Sizes are small
(20 steps of 8 prompts x 8 samples x 8 tokens, vocab 64: chance reward 1/64): a run takes
about half a second of one CPU core.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ops_demo.py"
SIZES = dict(steps=20, prompts=8, group=8, length=8, vocab=64, hidden=32)
K = 5  # steps averaged at each end


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("r1fast_example_ops_demo", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reward_rises_far_above_chance(demo, seed):
    """From about chance (1/64) to at least half the tokens right: measured 0.52-1.0 over the
    last 5 steps for seeds 0-7, against 0.03-0.31 over the first 5."""
    rewards = demo.train(seed=seed, **SIZES)
    assert len(rewards) == SIZES["steps"]
    first, last = _mean(rewards[:K]), _mean(rewards[-K:])
    assert last >= first + 0.3, rewards
    assert last >= 0.4, rewards


def test_without_updates_reward_stays_at_chance(demo):
    """The control: the same run with lr = 0 never leaves chance level, so the rise above comes
    from the GRPO updates, not from sampling."""
    rewards = demo.train(seed=0, lr=0.0, **SIZES)
    assert max(rewards) < 0.1, rewards


def test_same_seed_same_run(demo):
    """All randomness comes from the seeded generator: the global torch RNG does not matter, a
    repeat is bit-identical and another seed differs."""
    torch.manual_seed(1)
    a = demo.train(seed=0, **SIZES)
    torch.manual_seed(2)
    b = demo.train(seed=0, **SIZES)
    assert a == b
    assert demo.train(seed=1, **SIZES) != a


def test_main_prints_progress_and_succeeds(demo, capsys):
    args = ["--steps", "8", "--prompts", "4", "--group", "8", "--length", "8", "--vocab", "31",
            "--hidden", "32"]
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    assert "step   1" in out and "step   5" in out and "mean reward of the first 2 steps" in out
