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

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from r1fast import ops
from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.optim import OptimConfig
from r1fast.train.batch import all_ranks_int, build_update_batch
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
    def __init__(self, config: SFTConfig, examples: Sequence[dict], tokenizer):
        from r1fast.policy import build_optimizer, build_policy
        from r1fast.train.policy_io import load_model_state

        if not examples:
            raise ValueError("examples must be a non-empty list of {'prompt', 'completion'} dicts")
        for i, ex in enumerate(examples[:1000]):
            if not isinstance(ex, dict) or "prompt" not in ex or "completion" not in ex:
                raise ValueError(f"examples[{i}] must be a dict with 'prompt' and 'completion'")
        self.cfg = config
        self.tokenizer = tokenizer
        torch.manual_seed(config.seed)
        self.policy = build_policy(config.model, config.parallel, seed=config.seed)
        self.info = self.policy.info
        if config.batch_size % self.info.dp:
            raise ValueError(f"batch_size ({config.batch_size}) must be divisible by the data "
                             f"parallel size ({self.info.dp})")
        optim = dataclasses.replace(config.optim, total_steps=max(config.steps,
                                                                  config.optim.warmup_steps + 1))
        self.optimizer, self.scheduler = build_optimizer(self.policy, optim)
        if config.init_from:
            load_model_state(self.policy, config.init_from, self.optimizer)
        self.data = [(tokenizer.encode(ex["prompt"], add_bos=True),
                      tokenizer.encode(ex["completion"], add_eos=True)) for ex in examples]
        self.rng = random.Random(config.seed)

    def _batch(self):
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
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        batch = self._batch()
        n_tok = torch.tensor([float(batch.mask.sum())], dtype=torch.float64)
        if self.info.dp > 1:
            dist.all_reduce(n_tok, group=ps.get_data_parallel_group())
        total = max(float(n_tok.item()), 1.0)
        tp_group = self.policy.tp_group

        def loss_fn(hidden, weight, mb):
            b, L, H = hidden.shape
            dev = hidden.device
            logp = ops.linear_logprob(hidden.reshape(b * L, H), weight,
                                      mb["targets"].to(dev).reshape(-1), tp_group=tp_group)
            nll = -(logp * mb["mask"].to(dev).reshape(-1)).sum() / total
            return nll, {"nll": nll.detach()}

        out = self.policy.forward_backward(
            [{"tokens": batch.tokens, "targets": batch.targets, "mask": batch.mask}], loss_fn)
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(1)
        if not ok:
            raise FloatingPointError("optimizer step skipped: non-finite gradients")
        local = sum(float(r["nll"]) for r in out)
        loss = torch.tensor([local if (self.policy.gpt.post_process and self.info.tp_rank == 0)
                             else 0.0], dtype=torch.float64)
        if self.info.world_size > 1:
            dist.all_reduce(loss)
        return {"loss": float(loss.item()), "grad_norm": float(grad_norm or 0.0),
                "tokens": total, "lr": float(self.optimizer.param_groups[0]["lr"])}

    def fit(self) -> Path:
        """Train for ``steps`` and save ``out_dir/model`` (HF safetensors + tokenizer)."""
        out = Path(self.cfg.out_dir)
        logger = MetricsLogger(out, enabled=self.info.rank == 0, tensorboard=False,
                               progress=self.cfg.progress, total_steps=self.cfg.steps, desc="sft")
        try:
            for i in range(1, self.cfg.steps + 1):
                logger.log(i, self.step())
        finally:
            logger.close()
        return save_model(self.policy, self.tokenizer, out / "model")


def save_model(policy, tokenizer, path: str | Path) -> Path:
    """A self-contained model folder: HF safetensors + config.json, r1fast_config.json and the
    tokenizer (collective; rank 0 writes). Written under a temporary name, then renamed."""
    import os
    import shutil

    import torch.distributed as dist

    from r1fast.policy import save_hf_checkpoint

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    save_hf_checkpoint(policy, str(tmp))
    if rank == 0:
        tokenizer.save(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()
    return path
