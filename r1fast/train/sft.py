"""Supervised fine-tuning (and from-scratch pre-training) of the policy on text pairs.

The R1 pipeline has four supervised stages: pre-training a tiny base model (the demo only),
the cold start on long readable chains of thought, SFT on rejection-sampled answers, and the
distillation of a teacher's answers into a dense student. All are next-token cross-entropy on
``prompt + completion`` pairs, computed from hidden states with
:func:`r1fast.ops.linear_logprob` (no logits), through megatron's forward-backward and
distributed optimizer, at any TP/PP/EP/DP layout. The loss is the mean over the completion
tokens of the global batch (over all tokens with ``loss_on_prompt``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from r1fast import ops
from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.optim import OptimConfig
from r1fast.train.batch import all_ranks_int, build_update_batch
from r1fast.train.engine import TrainEngine
from r1fast.train.metrics import MetricsLogger


@dataclass
class SFTConfig:
    """One supervised run."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig.preset("tiny-moe"))
    """Architecture (ignored fields are overwritten by init_from's config when given)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP/PP/EP layout."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))
    """Optimizer and schedule (total_steps is set from steps)."""
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 32
    """Sequences per step (global, split over DP ranks)."""
    loss_on_prompt: bool = False
    """Train on every token (pre-training) instead of only the completion."""
    init_from: Optional[str] = None
    """Hugging Face / r1fast checkpoint folder to start from; None: random init."""
    out_dir: str = "runs/sft"
    """Run folder: metrics.jsonl and the final checkpoint under model/."""
    seed: int = 0
    """Init and data-order seed."""
    progress: bool = False
    """Show a progress bar."""


class SFTTrainer:
    """``SFTTrainer(config, examples, tokenizer).fit()`` trains and saves ``out_dir/model``."""

    def __init__(self, config: SFTConfig, examples: Sequence[dict], tokenizer):
        if not examples:
            raise ValueError("examples must be a non-empty list of {'prompt', 'completion'} dicts")
        for i, ex in enumerate(examples[:1000]):
            if not isinstance(ex, dict) or "prompt" not in ex or "completion" not in ex:
                raise ValueError(f"examples[{i}] must be a dict with 'prompt' and 'completion'")
        self.cfg = config
        self.tokenizer = tokenizer
        self.engine = TrainEngine(config.model, config.parallel, config.optim,
                                  total_updates=config.steps, seed=config.seed,
                                  init_from=config.init_from)
        self.policy, self.info = self.engine.policy, self.engine.info
        if config.batch_size % self.info.dp:
            raise ValueError(f"batch_size ({config.batch_size}) must be divisible by the data "
                             f"parallel size ({self.info.dp})")
        self.data = [(tokenizer.encode(ex["prompt"], add_bos=True),
                      tokenizer.encode(ex["completion"], add_eos=True)) for ex in examples]
        self.rng = random.Random(config.seed)

    def _batch(self):
        """This DP rank's share of the next global batch (every rank draws the same rows)."""
        rows = [self.data[self.rng.randrange(len(self.data))] for _ in range(self.cfg.batch_size)]
        k = self.cfg.batch_size // self.info.dp
        rows = rows[self.info.dp_rank * k:(self.info.dp_rank + 1) * k]
        prompts = [[p[0]] if self.cfg.loss_on_prompt else p for p, _ in rows]
        comps = [p[1:] + c if self.cfg.loss_on_prompt else c for p, c in rows]
        n = len(rows)
        longest = max(len(p) + len(c) for p, c in zip(prompts, comps)) - 1
        length = all_ranks_int(longest, "max")
        return build_update_batch(prompts, comps, [[0.0] * len(c) for c in comps], torch.zeros(n),
                                  torch.ones(n, dtype=torch.bool), self.tokenizer.pad_id, length)

    def step(self) -> dict[str, float]:
        batch = self._batch()
        total = max(self.engine.dp_sum([float(batch.mask.sum())])[0], 1.0)  # global tokens
        micro = [{"tokens": batch.tokens, "targets": batch.targets, "mask": batch.mask}]
        upd = self.engine.update(micro, _nll_loss(total, self.policy.tp_group))
        local = {"nll": sum(float(r["nll"]) for r in upd.metrics)}
        loss = self.engine.last_stage_reduce(local, ["nll"], op="sum")["nll"]
        return {"loss": loss, "grad_norm": upd.grad_norm, "tokens": total, "lr": self.engine.lr}

    def fit(self) -> Path:
        """Train for ``steps`` and save ``out_dir/model`` (HF safetensors + tokenizer)."""
        out = Path(self.cfg.out_dir)
        logger = MetricsLogger(out, enabled=self.engine.is_logger, tensorboard=False,
                               progress=self.cfg.progress, total_steps=self.cfg.steps, desc="sft")
        try:
            for i in range(1, self.cfg.steps + 1):
                logger.log(i, self.step())
        finally:
            logger.close()
        return self.engine.save_model(self.tokenizer, out / "model")


def _nll_loss(total_tokens: float, tp_group):
    """Next-token cross-entropy of the masked targets, this micro-batch's share of the mean over
    the ``total_tokens`` of the global batch; from hidden states, no logits."""

    def loss_fn(hidden, weight, mb):
        b, length, h = hidden.shape
        dev = hidden.device
        logp = ops.linear_logprob(hidden.reshape(b * length, h), weight,
                                  mb["targets"].to(dev).reshape(-1), tp_group=tp_group)
        nll = -(logp * mb["mask"].to(dev).reshape(-1)).sum() / total_tokens
        return nll, {"nll": nll.detach()}

    return loss_fn
