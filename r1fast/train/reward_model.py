"""Training a reward model (R1's stage 4): Bradley-Terry on preference pairs.

A preference pair is a JSONL/JSON/parquet row ``{"prompt", "chosen", "rejected"}`` (read with
``datasets``, as :mod:`r1fast.data.files` reads prompts). The reward model is the policy
architecture with a scalar head (:mod:`r1fast.train.reward_model_io`), started from a model
folder (``init_from``: backbone and tokenizer) at any TP/PP/EP/DP layout, and trained to score
``prompt + chosen`` above ``prompt + rejected``:

    loss = mean over pairs of  -log sigmoid(r(prompt + chosen) - r(prompt + rejected) - margin)

(:func:`bradley_terry_loss`, computed as ``softplus(r_rejected - r_chosen + margin)``, stable
for any difference; ``margin`` is the pairs' own column when they have one, as TRL's
RewardTrainer reads it, else 0). Each step draws ``batch_size`` pairs (every DP rank its share);
a rank's micro-batch (``parallel.micro_batch_size`` texts, default its whole share) holds its
pairs' chosen rows then their rejected rows, so each pair is scored in one forward; the loss
is each rank's share of the global mean, through megatron's forward-backward and distributed
optimizer with the guarded step of :class:`~r1fast.train.engine.TrainEngine` (the head is one
more parameter of the same optimizer, clipped and checked with the rest).

Held-out accuracy is the share of test pairs whose chosen response scores higher (a tie counts
one half), measured before training and at the end. Checkpoints follow SFT's
(:mod:`r1fast.train.checkpoint`): every ``save_every`` steps and at the end, backbone, head and
optimizer in megatron's distributed format (resumable at any layout), the pair order's
position and the "before" accuracy in ``meta.json``; a rerun into the same folder continues
from the latest one. ``r1fast stage reward-model --init MODEL
--data pairs.jsonl --test pairs_test.jsonl --out DIR`` writes ``DIR/metrics.jsonl``,
``DIR/eval.json``, the reward-model folder ``DIR/model`` (what ``[reward] reward_model``
names) and, for models with a Hugging Face family, ``DIR/hf`` (an
``AutoModelForSequenceClassification`` folder).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from r1fast.atomic import write_text_atomic
from r1fast.cli import ArgumentParser
from r1fast.data.dataset import RowStream
from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.optim import OptimConfig
from r1fast.train.batch import all_ranks_int
from r1fast.train.checkpoint import (CheckpointError, check_resumed_config, load_checkpoint,
                                     resume_point, run_steps, save_checkpoint)
from r1fast.train.engine import TrainEngine
from r1fast.train.metrics import MetricsLogger, truncate_metrics
from r1fast.typed_toml import dump_toml
from r1fast.train.reward_model_io import (META_FILE, PolicyRewardModel, RewardBackbone,
                                          encode_texts, export_sequence_classifier, head_scores,
                                          load_head, save_reward_model)
from r1fast.train.run_folder import check_shared_folder, start_fresh

log = logging.getLogger("r1fast.train")

PAIR_KEYS = ("prompt", "chosen", "rejected")
HEAD_KEY = "reward_head.weight"  # the head's name in distributed checkpoints
#: what a fresh start with ``overwrite`` moves to ``out_dir/previous_<time>/``
RUN_FILES = ("checkpoints", "metrics.jsonl", "eval.json", "model", "hf")


@dataclass(kw_only=True)
class RewardModelTrainConfig:
    """One reward-model training run."""

    init_from: str
    """Model folder to start from (Hugging Face or r1fast): the backbone's architecture, weights
    and tokenizer. The head starts random (std ``model.init_std``)."""
    data: str
    """Training pairs: a .jsonl / .json / .parquet file or a folder of them, rows
    ``{"prompt", "chosen", "rejected"}`` (strings; prompt may be empty)."""
    test: Optional[str] = None
    """Held-out pairs in the same layout (accuracy before and after training), or None."""
    out_dir: str = "runs/reward_model"
    """Run folder: metrics.jsonl, eval.json, checkpoints/, model/ (the reward model), hf/ (its
    export)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP/PP/EP layout (DP is what remains of the world size)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))
    """Optimizer and schedule (total_steps is set from steps; another value is an error)."""
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 16
    """Pairs per step (global, split over DP ranks)."""
    max_length: int = 0
    """Tokens per text (bos + prompt + response + eos, keeping the end); 0: the model's
    max_position_embeddings."""
    eval_batch_size: int = 32
    """Texts per forward when scoring the held-out pairs."""
    chat_template: bool = True
    """Render each pair's (non-empty) prompt with the tokenizer's chat template, when it has
    one: GRPO scores the policy's answers after prompts rendered that way, so the model learns
    on the texts it will score (recorded as ``chat_template`` in reward_model.json)."""
    aux_loss_coef: Optional[float] = None
    """MoE load-balancing loss coefficient during this training; None: the checkpoint's."""
    seed: int = 0
    """Head init and pair-order seed."""
    progress: bool = False
    """Show a progress bar."""
    export_hf: bool = True
    """Also write out_dir/hf, the Hugging Face sequence-classifier layout (when the backbone has
    an HF family; otherwise a WARNING)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end; a checkpoint is always written at the
    end)."""
    keep_last: int = 0
    """Keep the newest N checkpoints: older ones are deleted after each save, each deletion
    logged; 0 keeps every checkpoint (as Megatron-LM and verl do)."""
    resume: bool = True
    """Continue from ``out_dir/checkpoints`` when it holds a complete checkpoint."""
    overwrite: bool = False
    """Allow starting from step 0 in an out_dir that already holds checkpoints or metrics: the
    old files move to out_dir/previous_<time>/ (nothing is deleted). Without it, an error."""

    def __post_init__(self):
        for name, lo in (("steps", 1), ("batch_size", 1), ("eval_batch_size", 1),
                         ("max_length", 0), ("save_every", 0), ("keep_last", 0)):
            if getattr(self, name) < lo:
                raise ValueError(f"reward model: {name} must be >= {lo}, got "
                                 f"{getattr(self, name)}")
        if self.max_length == 1:
            raise ValueError("reward model: max_length must be 0 (the model's) or >= 2")
        p = self.parallel
        if p.max_tokens_per_microbatch:  # it was accepted and ignored
            raise ValueError(f"reward model: parallel.max_tokens_per_microbatch="
                             f"{p.max_tokens_per_microbatch} (packing) is not supported here; "
                             f"set parallel.micro_batch_size (texts per micro-batch) instead")
        if p.micro_batch_size is not None and p.micro_batch_size % 2:
            raise ValueError(f"reward model: parallel.micro_batch_size must be even (a "
                             f"micro-batch holds whole pairs, chosen and rejected texts), got "
                             f"{p.micro_batch_size}")


def render_pair_prompts(pairs: Sequence[dict], tokenizer) -> list[dict]:
    """``pairs`` whose non-empty prompts are a user turn in ``tokenizer``'s chat template, up to
    the assistant's turn, which ``chosen`` / ``rejected`` then fill, as a policy's completion
    follows that prompt (:func:`~r1fast.pipeline.sft_data.inside_opened_thought`: under a
    template that opens the thought, an answer's own leading ``<think>`` goes, and an answer
    without a thought gets an empty one closed, with a warning counting them; GRPO's scored
    texts have that shape)."""
    from r1fast.pipeline.sft_data import inside_opened_thought, lacks_thought

    out, empty = [], 0
    for p in pairs:
        if not p["prompt"]:
            out.append(dict(p))
            continue
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}],
                                               add_generation_prompt=True)
        empty += sum(lacks_thought(prompt, p[k]) for k in ("chosen", "rejected"))
        out.append({**p, "prompt": prompt,
                    **{k: inside_opened_thought(prompt, p[k]) for k in ("chosen", "rejected")}})
    if empty:
        log.warning("%d answers of %d preference pairs have no thought (no </think>) while "
                    "%r's chat template opens one: each follows an empty thought, closed at "
                    "once (an answer cut inside its thought would be misread so)", empty,
                    len(pairs), tokenizer)
    return out


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       margin: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-pair ``-log sigmoid(chosen - rejected - margin)`` [P] (fp32 or wider), as
    ``softplus(rejected - chosen + margin)``: no overflow for any difference. ``margin`` [P]:
    how much higher the chosen answer must score (None: 0)."""
    dtype = torch.promote_types(chosen.dtype, torch.float32)
    gap = rejected.to(dtype) - chosen.to(dtype)
    return F.softplus(gap if margin is None else gap + margin.to(gap))


def load_pairs(path: str | Path) -> list[dict]:
    """The preference pairs of a data file or folder; a bad row is a one-line error naming the
    file, the row and the key."""
    from r1fast.data.files import read_rows, row_name

    rows, where = read_rows(path, origins=True)
    if not rows:
        raise ValueError(f"preference pairs {path}: no rows")
    for row, at in zip(rows, where):
        for key in PAIR_KEYS:
            v = row.get(key)
            if not isinstance(v, str) or (key != "prompt" and not v.strip()):
                what = "a string" if key == "prompt" else "a non-empty string"
                raise ValueError(f"preference pairs {row_name(path, at)}: key {key!r} must be "
                                 f"{what}, got {v!r:.60}")
        if row["chosen"] == row["rejected"]:
            raise ValueError(f"preference pairs {row_name(path, at)}: 'chosen' and 'rejected' "
                             f"are the same text (the pair says nothing)")
    keys = PAIR_KEYS + (("margin",) if any(row.get("margin") is not None for row in rows) else ())
    for row, at in zip(rows, where):  # all or none: a pair without one would train at 0
        m = row.get("margin")
        if "margin" in keys and (isinstance(m, bool) or not isinstance(m, (int, float))
                                 or not math.isfinite(m)):
            raise ValueError(f"preference pairs {row_name(path, at)}: key 'margin' must be a "
                             f"finite number in every row when any row has one, got {m!r:.60}")
    return [{k: row[k] for k in keys} for row in rows]


SCALE_PAIRS = 256
"""Training pairs whose scores give a reward model's score scale when it has no test pairs."""


class RewardEngine(TrainEngine):
    """A :class:`TrainEngine` whose DDP module (and so its optimizer, grad clipping and
    non-finite guard) holds the scalar head next to the backbone: the policy is built bare,
    the head added, and then megatron DDP wraps both (``policy.gpt`` stays the bare GPT chunk,
    so HF save/load of the backbone is untouched)."""

    def _build_policy(self, model: ModelConfig, parallel: ParallelConfig, seed: int,
                      distributed_optimizer: bool):
        import types

        from r1fast.policy import build_policy
        from r1fast.policy.optim import wrap_ddp

        policy = build_policy(model, parallel, seed=seed, trainable=False)
        gpt = policy.gpt
        for p in gpt.parameters():  # build_policy(trainable=False) froze them
            p.requires_grad_(True)
        gpt.train()
        self.backbone = RewardBackbone(gpt, model.hidden_size, init_std=model.init_std, seed=seed)
        shim = types.SimpleNamespace(gpt=self.backbone, config=policy.config)
        wrap_ddp(shim, distributed_optimizer)  # the policy's DDP setup, over backbone + head
        policy.module = shim.module
        return policy

    def _load_initial_weights(self, init_from: str) -> None:
        from r1fast.train.policy_io import load_model_state

        load_model_state(self.policy, init_from)
        if (Path(init_from) / META_FILE).is_file() and self.backbone.score is not None:
            with torch.no_grad():  # a reward model trained further: its head too
                self.backbone.score.weight.copy_(
                    load_head(init_from, self.policy.model_cfg.hidden_size))
        self.optimizer.reload_model_params()  # fp32 masters of the backbone and the head

    def extra_params(self) -> dict[str, torch.Tensor]:
        """The head, checkpointed beside the backbone (last pipeline stage)."""
        return {} if self.backbone.score is None else {HEAD_KEY: self.backbone.score.weight}

    @property
    def head_weight(self) -> Optional[torch.Tensor]:
        """The head [1, H] (last pipeline stage; None elsewhere)."""
        return None if self.backbone.score is None else self.backbone.score.weight


def pair_loss_fn(engine: RewardEngine, total_pairs: float):
    """``loss_fn`` of a micro-batch ``{"tokens" [2P, L], "lengths" [2P]}`` (P chosen rows then
    their P rejected rows): this micro-batch's share of the global mean Bradley-Terry loss."""

    def loss_fn(hidden, output_weight, mb):
        r = head_scores(engine.head_weight, hidden, mb["lengths"])  # [2P]
        chosen, rejected = r.chunk(2)
        per_pair = bradley_terry_loss(chosen, rejected, mb.get("margin"))
        loss = per_pair.sum() / total_pairs
        return loss, {"bt_sum": per_pair.detach().sum(),
                      "correct": (chosen > rejected).float().sum().detach()
                      + 0.5 * (chosen == rejected).float().sum().detach(),
                      "margin_sum": (chosen - rejected).detach().sum()}

    return loss_fn


class RewardModelTrainer:
    """``RewardModelTrainer(config).fit()`` trains, evaluates and saves a reward model (see the
    module docstring). Collective: every rank of the layout runs it."""

    def __init__(self, config: RewardModelTrainConfig):
        from r1fast.data import load_tokenizer
        from r1fast.policy.hf_checkpoint import load_model_config

        self.cfg = config
        self.run_dir = Path(config.out_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        check_shared_folder(self.run_dir, "the reward model's out_dir (--out)")  # starts dist
        path = resume_point(self.ckpt_dir, resume=config.resume, overwrite=config.overwrite,
                            start_over="resume=False (--overwrite on the command line)",
                            expect=("reward_data", "reward-model"))
        if path is None and not config.overwrite:
            self._start_fresh()  # only raises: without overwrite nothing is moved
        self.train_pairs = load_pairs(config.data)  # bad files fail before the model is built
        self.test_pairs = load_pairs(config.test) if config.test else []
        model = load_model_config(config.init_from)
        if config.aux_loss_coef is not None:
            model = dataclasses.replace(model, aux_loss_coef=config.aux_loss_coef)
        self.tokenizer = load_tokenizer(config.init_from)
        self.chat = config.chat_template and self.tokenizer.has_chat_template
        """The pairs' prompts are in the chat template (as GRPO renders its prompts)."""
        if self.chat:
            self.train_pairs, self.test_pairs = (render_pair_prompts(p, self.tokenizer)
                                                 for p in (self.train_pairs, self.test_pairs))
        self.max_length = config.max_length or model.max_position_embeddings
        if self.max_length > model.max_position_embeddings:
            raise ValueError(f"reward model: max_length={self.max_length} exceeds the model's "
                             f"max_position_embeddings={model.max_position_embeddings}")
        self.engine = RewardEngine(model, config.parallel, config.optim,
                                   total_updates=config.steps, seed=config.seed,
                                   init_from=config.init_from, resuming=path is not None)
        self.policy, self.info = self.engine.policy, self.engine.info
        if config.batch_size % self.info.dp:
            raise ValueError(f"reward model: batch_size ({config.batch_size}) must be divisible "
                             f"by the data parallel size ({self.info.dp})")
        mb = config.parallel.micro_batch_size
        self.pairs_per_micro_batch = config.batch_size // self.info.dp if mb is None else mb // 2
        if (config.batch_size // self.info.dp) % self.pairs_per_micro_batch:
            raise ValueError(f"reward model: a rank's {config.batch_size // self.info.dp} pairs "
                             f"(batch_size / dp) must split into micro-batches of "
                             f"parallel.micro_batch_size / 2 = {self.pairs_per_micro_batch}")
        self.scorer = PolicyRewardModel(self.policy, self.engine.head_weight, self.tokenizer,
                                        self.max_length)
        self.order = RowStream(len(self.train_pairs), config.seed)  # without replacement
        self.fingerprint = hashlib.sha256(json.dumps(self.train_pairs).encode()).hexdigest()
        self.step_idx = 0
        """Optimizer steps done (restored from a checkpoint on resume)."""
        self.before: Optional[dict] = None
        """Held-out accuracy before training (measured at step 0, kept in checkpoints)."""
        self.last_loss: Optional[float] = None
        if path is not None:
            self._resume(path)
        elif config.overwrite:  # without it the check above already found nothing to move
            self._start_fresh()

    # -------------------------------------------------------------------------- checkpoints
    def _start_fresh(self) -> None:
        start_fresh(self.run_dir, RUN_FILES, overwrite=self.cfg.overwrite,
                    resume=self.cfg.resume, what="reward-model run", resume_off="resume=False",
                    overwrite_on="overwrite=True (--overwrite)")

    def _resume(self, path: Path) -> None:
        """Backbone, head, optimizer (resharded to this layout), LR schedule, pair position,
        step and the "before" accuracy from checkpoint ``path``; metrics.jsonl is cut back to
        its step."""
        state, meta = load_checkpoint(path)
        data = meta.get("reward_data")
        if not isinstance(data, dict) or "position" not in data:
            raise CheckpointError(f"checkpoint {path} is not a reward-model checkpoint (its "
                                  f"meta.json has no reward_data); choose another out_dir")
        check_resumed_config(meta.get("config"), dump_toml(self.cfg), path,
                             ("steps", "resume", "overwrite", "progress", "save_every",
                              "keep_last", "export_hf", "eval_batch_size", "parallel."))
        self.engine.load_checkpoint(path, state, meta)
        self.step_idx, self.order.position = int(meta["step"]), int(data["position"])
        self.before, self.last_loss = data.get("heldout_before"), data.get("last_loss")
        if self.engine.is_logger:
            if data.get("fingerprint") != self.fingerprint:
                log.warning("resuming %s with other training pairs than the run's (%s pairs "
                            "then, %d now): the pair order from here on is not that of an "
                            "uninterrupted run", path, data.get("pairs"), len(self.train_pairs))
            truncate_metrics(self.run_dir / "metrics.jsonl", self.step_idx)
        log.info("resumed from %s at step %d", path, self.step_idx)
        self.engine.fit_schedule(self.cfg.steps, self.cfg.optim.warmup_steps, "steps")

    def save(self) -> Path:
        """A checkpoint of this step (collective): backbone, head and optimizer in megatron's
        distributed format, RNG per rank, pair position and config in meta."""
        meta = {"reward_data": {"position": self.order.position, "pairs": len(self.train_pairs),
                                "fingerprint": self.fingerprint, "last_loss": self.last_loss,
                                "heldout_before": self.before},
                "config": dump_toml(self.cfg), **self.engine.checkpoint_meta()}
        return save_checkpoint(self.ckpt_dir, self.step_idx, self.engine.rank_state(), meta,
                               keep_last=self.cfg.keep_last, write_shared=self.engine.write_shared,
                               shared_tensors=self.engine.shared_tensors())

    # -------------------------------------------------------------------------- training

    def _micro_batches(self) -> tuple[list[dict[str, torch.Tensor]], int]:
        """This DP rank's share of the next global batch of pairs (every rank takes the same
        global batch), in micro-batches of ``parallel.micro_batch_size`` texts (default: one),
        each its pairs' chosen rows then their rejected rows; and how many texts were cut."""
        n, k = self.cfg.batch_size, self.cfg.batch_size // self.info.dp
        pairs = [self.train_pairs[i] for i in self.order.take(n)]
        mine = pairs[self.info.dp_rank * k:(self.info.dp_rank + 1) * k]
        texts = [p["prompt"] + p["chosen"] for p in mine] + [p["prompt"] + p["rejected"]
                                                            for p in mine]
        tokens, lengths, cut = encode_texts(self.tokenizer, texts, self.max_length)  # [2k, L]
        width = all_ranks_int(tokens.shape[1], "max")  # one shape on every rank
        tokens = F.pad(tokens, (0, width - tokens.shape[1]), value=int(self.tokenizer.pad_id))
        margin = (torch.tensor([float(p["margin"]) for p in mine], dtype=torch.float32)
                  if mine and "margin" in mine[0] else None)  # [k]
        micro = []
        for start in range(0, k, self.pairs_per_micro_batch):
            pairs_here = torch.arange(start, start + self.pairs_per_micro_batch)
            rows = torch.cat([pairs_here, pairs_here + k])  # the chosen rows, then the rejected
            micro.append({"tokens": tokens[rows], "lengths": lengths[rows],
                          **({} if margin is None else {"margin": margin[pairs_here]})})
        return micro, cut

    def step(self) -> dict[str, float]:
        """One optimizer step on ``batch_size`` pairs (counted in ``step_idx``): loss, train
        accuracy and mean margin of the batch (before the step), grad norm, lr."""
        n = float(self.cfg.batch_size)
        micro, cut = self._micro_batches()
        upd = self.engine.update(micro, pair_loss_fn(self.engine, n))
        local = {k: sum(float(r[k]) for r in upd.metrics)
                 for k in ("bt_sum", "correct", "margin_sum")}
        sums = self.engine.last_stage_reduce(local, list(local), op="sum")
        self.step_idx += 1
        self.last_loss = sums["bt_sum"] / n
        return {"loss": self.last_loss, "accuracy": sums["correct"] / n,
                "margin": sums["margin_sum"] / n, "grad_norm": upd.grad_norm,
                "lr": upd.lr, "skipped": float(upd.skipped),
                "texts_cut": self.engine.dp_sum([float(cut)])[0]}

    def score_pairs(self, pairs: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen scores [P], rejected scores [P]) of ``pairs``, all on this rank, in batches
        of eval_batch_size texts; collective (ranks with fewer batches make idle calls)."""
        texts = [p["prompt"] + p["chosen"] for p in pairs] + [p["prompt"] + p["rejected"]
                                                             for p in pairs]
        bs = self.cfg.eval_batch_size
        chunks = [texts[i:i + bs] for i in range(0, len(texts), bs)]
        for _ in range(all_ranks_int(len(chunks), "max") - len(chunks)):
            chunks.append([])
        scores = torch.cat([self.scorer(c) for c in chunks]) if chunks else torch.zeros(0)
        return scores[:len(pairs)], scores[len(pairs):]

    def heldout(self) -> dict[str, float]:
        """Accuracy (a tie counts 1/2) with its standard error over pairs (sample standard
        deviation / sqrt(pairs)) and mean margin on the test pairs, each DP rank scoring its
        share."""
        mine = self.test_pairs[self.info.dp_rank::self.info.dp]
        chosen, rejected = self.score_pairs(mine)
        wins, ties = float((chosen > rejected).sum()), float((chosen == rejected).sum())
        c, c2, n, m = self.engine.dp_sum([wins + 0.5 * ties, wins + 0.25 * ties,
                                          float(len(mine)), float((chosen - rejected).sum())])
        var = max(c2 - c * c / n, 0.0) / (n - 1) if n > 1 else 0.0  # per-pair outcomes
        return {"accuracy": c / n, "accuracy_se": math.sqrt(var / n), "margin": m / n,
                "pairs": int(n), **self._moments(torch.cat([chosen, rejected]))}

    def _moments(self, scores: torch.Tensor) -> dict[str, float]:
        """Mean and standard deviation of ``scores`` over every DP rank's (collective)."""
        n, total, squares = self.engine.dp_sum([float(scores.numel()), float(scores.sum()),
                                                float((scores.double() ** 2).sum())])
        mean = total / n
        return {"score_mean": mean,
                "score_std": math.sqrt(max(squares / n - mean * mean, 0.0) * n / max(n - 1, 1))}

    def train_score_stats(self) -> dict:
        """The scale of this model's scores without test pairs (GRPO's
        ``reward.reward_model_normalize``): their mean and standard deviation over the chosen
        and rejected texts of the first :data:`SCALE_PAIRS` training pairs (collective)."""
        pairs = self.train_pairs[:SCALE_PAIRS]
        chosen, rejected = self.score_pairs(pairs[self.info.dp_rank::self.info.dp])
        return {**self._moments(torch.cat([chosen, rejected])),
                "score_stats_from": f"{len(pairs)} training pairs"}

    def fit(self) -> dict:
        """Train for ``steps``, evaluate, save ``out_dir/model`` (and ``out_dir/hf``); returns
        the summary written to ``out_dir/eval.json``."""
        cfg, out = self.cfg, self.run_dir
        if self.before is None and self.test_pairs:
            self.before = self.heldout()
        run_steps(self, cfg.steps, cfg.save_every,
                  MetricsLogger(out, enabled=self.engine.is_logger, tensorboard=False,
                                progress=cfg.progress, total_steps=cfg.steps,
                                initial_step=self.step_idx, desc="reward-model"))
        after = self.heldout() if self.test_pairs else None
        summary = {"train_pairs": len(self.train_pairs), "steps": cfg.steps,
                   "final_train_loss": self.last_loss, "test_pairs": len(self.test_pairs)}
        if after is not None:
            summary.update(heldout_accuracy_before=self.before["accuracy"],
                           heldout_accuracy=after["accuracy"],
                           heldout_accuracy_se=after["accuracy_se"],
                           heldout_margin=after["margin"], score_mean=after["score_mean"],
                           score_std=after["score_std"],
                           score_stats_from=f"{after['pairs']} test pairs")
        else:
            summary.update(self.train_score_stats())
        summary["chat_template"] = self.chat
        path = save_reward_model(self.policy, self.engine.head_weight, self.tokenizer,
                                 out / "model", max_length=self.max_length, summary=summary)
        summary["model"] = str(path)
        if self.engine.is_logger:
            hf = export_sequence_classifier(path, out / "hf") if cfg.export_hf else None
            summary["hf"] = None if hf is None else str(hf)
            write_text_atomic(out / "eval.json", json.dumps(summary, indent=1))
        _barrier()
        return summary


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="r1fast stage reward-model",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--init", required=True, help="model folder to start from (backbone + "
                    "tokenizer)")
    ap.add_argument("--data", required=True, help="training pairs (JSONL/JSON/parquet file or "
                    "folder) with prompt, chosen, rejected")
    ap.add_argument("--test", help="held-out pairs in the same layout")
    ap.add_argument("--out", required=True, help="run folder (model/ is the reward model)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=16, help="pairs per step")
    ap.add_argument("--max-length", type=int, default=0, help="tokens per text (0: the model's)")
    ap.add_argument("--aux-loss-coef", type=float, help="MoE aux-loss coefficient (default: the "
                    "checkpoint's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-chat-template", action="store_true", help="train on prompt + answer "
                    "as plain text even when the tokenizer has a chat template")
    for name in ("tp", "pp", "ep"):
        ap.add_argument(f"--{name}", type=int, default=1, help=f"{name.upper()} size (under "
                        f"torchrun)")
    ap.add_argument("--micro-batch-size", type=int, help="texts per micro-batch (even: whole "
                    "pairs; default: a rank's whole share of the batch at once)")
    ap.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at "
                    "the end only); a rerun with the same --out resumes from the latest")
    ap.add_argument("--keep-last", type=int, default=0, help="keep the newest N checkpoints "
                    "(0: every one)")
    ap.add_argument("--overwrite", action="store_true", help="start from step 0 in an --out "
                    "that holds a run (its files move to previous_<time>/)")
    ap.add_argument("--no-export", action="store_true", help="skip the out/hf export")
    ap.add_argument("--progress", action="store_true")
    return ap


def stage_main(argv: Sequence[str]) -> int:
    """``r1fast stage reward-model ...``: train, print the summary (JSON) and the folder."""
    args = _parser().parse_args(list(argv))
    logging.basicConfig(level=logging.WARNING)
    cfg = RewardModelTrainConfig(
        init_from=args.init, data=args.data, test=args.test, out_dir=args.out,
        parallel=ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep,
                                micro_batch_size=args.micro_batch_size),
        optim=OptimConfig(lr=args.lr), steps=args.steps, batch_size=args.batch_size,
        max_length=args.max_length, aux_loss_coef=args.aux_loss_coef, seed=args.seed,
        progress=args.progress, export_hf=not args.no_export, save_every=args.save_every,
        keep_last=args.keep_last, overwrite=args.overwrite, resume=not args.overwrite,
        chat_template=not args.no_chat_template)
    summary = RewardModelTrainer(cfg).fit()
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(summary))
        print(summary["model"], file=sys.stderr)
    return 0
