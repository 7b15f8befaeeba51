"""A tiny world for the reward-model tests: a random tiny MoE model folder with O(1)
activations, seeded preference pairs, a reward-model folder. Shared by the reward-model
training, task and reward tests."""
from __future__ import annotations

import dataclasses
import json
import random

import torch

from r1fast.data import CharTokenizer
from r1fast.policy.config import ModelConfig, ParallelConfig

# aux loss off: megatron computes it per rank's tokens, a different objective under TP/DP
MODEL = dataclasses.replace(ModelConfig.preset("tiny-moe"), vocab_size=128, aux_loss_coef=0.0,
                            max_position_embeddings=64)


def save_init(out_dir: str, seed: int = 7) -> str:
    """A model folder (HF safetensors + char tokenizer) of MODEL with weights of std 0.1 (norms
    near 1, routers 0.3): the 0.02-std init makes every score and gradient nearly 0."""
    from r1fast.policy import build_policy
    from r1fast.train.policy_io import save_model

    policy = build_policy(MODEL, ParallelConfig(), trainable=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.gpt.named_parameters():
            if "layernorm" in name or "norm.weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                std = 0.3 if "router" in name else 0.1
                p.copy_(std * torch.randn(p.shape, generator=g))
    save_model(policy, CharTokenizer(), out_dir)
    return out_dir


def save_reward_folder(out_dir: str, init: str, seed: int = 3) -> str:
    """A reward-model folder: the backbone of ``init`` and a random head of std 0.3."""
    from r1fast.policy import build_policy
    from r1fast.policy.hf_checkpoint import load_hf_checkpoint
    from r1fast.train.reward_model_io import save_reward_model

    policy = build_policy(MODEL, ParallelConfig(), trainable=False)
    load_hf_checkpoint(policy, init)
    head = 0.3 * torch.randn(1, MODEL.hidden_size, generator=torch.Generator().manual_seed(seed))
    save_reward_model(policy, head, CharTokenizer(), out_dir, max_length=MODEL.max_position_embeddings)
    return out_dir


def sorted_digit_pairs(n: int, seed: int) -> list[dict]:
    """Preference pairs: the prompt lists 5 digits; ``chosen`` writes them in ascending order,
    ``rejected`` the same digits in another order. Both responses hold the same characters, so
    only their order tells them apart."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        digits = [rng.randrange(10) for _ in range(5)]
        good = sorted(digits)
        bad = digits[:]
        while bad == good:
            rng.shuffle(bad)
        prompt = "sort " + "".join(map(str, digits)) + ": "
        out.append({"prompt": prompt, "chosen": "".join(map(str, good)),
                    "rejected": "".join(map(str, bad))})
    return out


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)
