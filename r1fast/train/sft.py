"""Supervised fine-tuning (and from-scratch pre-training) of the policy on text pairs.

The R1 pipeline has four supervised stages: pre-training a tiny base model (the demo only),
the cold start on long readable chains of thought, SFT on rejection-sampled answers, and the
distillation of a teacher's answers into a dense student; Sky-T1-style long-trace SFT
(``recipes/sky_t1_sft.toml``) is the same loop on traces of many thousand tokens. All are
next-token cross-entropy on ``prompt + completion`` pairs, computed from hidden states with
:func:`r1fast.ops.linear_logprob` (no logits), through megatron's forward-backward and
distributed optimizer, at any TP/PP/EP/DP layout.

One step (:meth:`SFTTrainer.step`):

1. every rank takes the same next ``batch_size`` rows of the data order and keeps its DP
   share (so the rows of a step do not depend on the layout). The order is drawn without
   replacement, each epoch a fresh seeded permutation (:class:`r1fast.data.RowStream`), so
   ``epochs = 1`` shows every row, and a row twice only where the last batch of an epoch is
   completed from the next epoch's order (steps are whole batches: ``steps_for_epochs``
   rounds up);
2. the rows become micro-batches: packed end to end under the token budget
   ``parallel.max_tokens_per_microbatch`` (:mod:`r1fast.train.packing`, the layout GRPO uses:
   memory follows tokens, not the longest row), or padded micro-batches of
   ``parallel.micro_batch_size`` rows, or (the default) the whole share as one padded one;
3. :meth:`TrainEngine.update` accumulates the gradients of every micro-batch and takes one
   guarded optimizer step. Each micro-batch contributes its share of ONE global mean: the
   summed NLL of its target tokens over the target tokens of the whole global batch (over all
   tokens with ``loss_on_prompt``), so the layout of micro-batches and ranks never changes
   the NLL or its gradient beyond rounding. A MoE's load-balancing loss is the exception: it
   is a mean per micro-batch (megatron's convention), so another split of the rows moves it
   (helper-71: its gradient by 11-240% between layouts of 8 rows; the whole gradient by
   2e-3 relative at ``aux_loss_coef`` 1e-3).

Checkpoints follow GRPO's (:mod:`r1fast.train.checkpoint`): every ``save_every`` steps and at
the end, the model and optimizer as a megatron distributed checkpoint (resumable at any
layout), the RNG per rank, and in ``meta.json`` the data position, the config and the LR
schedule.
A run finds its latest checkpoint in ``out_dir/checkpoints`` and continues bit-exactly at the
same layout; ``metrics.jsonl`` is cut back to the checkpoint's step first.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from r1fast import ops
from r1fast.data.dataset import RowStream
from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.config_checks import Range, check_fields
from r1fast.policy.optim import OptimConfig
from r1fast.policy.transfer import to_device_async
from r1fast.train.balance import balanced_partition
from r1fast.train.batch import UpdateBatch, all_ranks_int, build_update_batch, split_even
from r1fast.train.checkpoint import (CheckpointError, check_resumed_config, load_checkpoint,
                                     resume_point, run_steps, save_checkpoint)
from r1fast.train.engine import TrainEngine
from r1fast.train.metrics import MetricsLogger, truncate_metrics
from r1fast.train.packing import packed_micro_batches, sequence_loss_on_packed_rows
from r1fast.train.run_folder import check_shared_folder, start_fresh
from r1fast.train.task import check_tokenizer_fits
from r1fast.typed_toml import dump_toml

log = logging.getLogger("r1fast.train")

#: what a fresh start with ``overwrite`` moves to ``out_dir/previous_<time>/`` (the data
#: summary is the recipe runner's, r1fast.pipeline.sft_recipe)
RUN_FILES = ("checkpoints", "metrics.jsonl", "model", "data_summary.json", "tokenizer")


@dataclass(kw_only=True)
class SFTConfig:
    """One supervised run. Every field is checked when the config is made."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig.preset("tiny-moe"))
    """Architecture (ignored fields are overwritten by init_from's config when given)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP/PP/EP layout and micro-batching: ``max_tokens_per_microbatch`` > 0 packs the rows
    into micro-batches of at most that many tokens; else ``micro_batch_size`` rows per padded
    micro-batch (None: the whole per-rank batch at once)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))
    """Optimizer and schedule (total_steps is set from steps; another value is an error)."""
    steps: int = 100
    """Optimizer steps in total, including resumed ones (>= 1)."""
    batch_size: int = 32
    """Sequences per step (global, split over DP ranks; >= 1)."""
    loss_on_prompt: bool = False
    """Train on every token (pre-training) instead of only the completion."""
    init_from: Optional[str] = None
    """Hugging Face / r1fast checkpoint folder to start from; None: random init."""
    out_dir: str = "runs/sft"
    """Run folder: metrics.jsonl, checkpoints/ and the final model under model/."""
    seed: int = 0
    """Init and data-order seed (>= 0)."""
    progress: bool = False
    """Show a progress bar."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end; a checkpoint is always written at the
    end)."""
    keep_last: int = 0
    """Keep the newest N checkpoints: older ones are deleted after each save, each deletion
    logged; 0 keeps every checkpoint (as Megatron-LM and verl do)."""
    resume: bool = True
    """Continue from ``out_dir/checkpoints`` when it holds a complete checkpoint."""
    overwrite: bool = False
    """Allow starting from step 0 in an out_dir that already holds checkpoints or metrics (no
    usable checkpoint, or resume=False). Nothing is deleted: the old checkpoints/,
    metrics.jsonl, model/ and data_summary.json move to out_dir/previous_<time>/. Without it
    such a start is an error."""

    def __post_init__(self) -> None:
        _check_config(self)


_RANGES = {"steps": Range(integer=True, lo=1), "batch_size": Range(integer=True, lo=1),
           "save_every": Range(integer=True, lo=0), "keep_last": Range(integer=True, lo=0),
           "seed": Range(integer=True, lo=0)}


def _check_config(cfg: SFTConfig) -> None:
    """One-line ValueErrors naming the field, its value and what is allowed."""
    for name, cls in (("model", ModelConfig), ("parallel", ParallelConfig),
                      ("optim", OptimConfig)):
        if not isinstance(getattr(cfg, name), cls):
            raise ValueError(f"SFTConfig: {name} must be a {cls.__name__}, got "
                             f"{type(getattr(cfg, name)).__name__}")
    check_fields("SFTConfig", cfg, _RANGES)
    for name in ("loss_on_prompt", "progress", "resume", "overwrite"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"SFTConfig: {name} must be true or false, got "
                             f"{getattr(cfg, name)!r}")
    if not isinstance(cfg.out_dir, str) or not cfg.out_dir.strip():
        raise ValueError(f"SFTConfig: out_dir must be a non-empty folder path, got "
                         f"{cfg.out_dir!r}")
    if cfg.init_from is not None and (not isinstance(cfg.init_from, str)
                                      or not cfg.init_from.strip()):
        raise ValueError(f"SFTConfig: init_from must be None or a model folder path, got "
                         f"{cfg.init_from!r}")
    cfg.model.validate()
    # the engine sizes the schedule the same way; this checks optimizer name, decay style, ...
    dataclasses.replace(cfg.optim, total_steps=max(cfg.steps, cfg.optim.warmup_steps + 1)
                        ).validate()


class SFTTrainer:
    """``SFTTrainer(config, examples, tokenizer).fit()`` trains and saves ``out_dir/model``;
    with ``config.resume`` it continues from the run folder's latest checkpoint."""

    def __init__(self, config: SFTConfig, examples: Sequence[dict], tokenizer):
        if not isinstance(config, SFTConfig):
            raise ValueError(f"config must be an SFTConfig, got {type(config).__name__}")
        if not examples:
            raise ValueError("examples must be a non-empty list of {'prompt', 'completion'} dicts")
        for i, ex in enumerate(examples):
            if not isinstance(ex, dict) or "prompt" not in ex or "completion" not in ex:
                raise ValueError(f"examples[{i}] must be a dict with 'prompt' and 'completion'")
        self.cfg = config
        self.tokenizer = tokenizer
        # what can fail without the model fails before it is built (seconds of construction)
        check_tokenizer_fits(tokenizer, config.model.vocab_size, "model.vocab_size")
        self.data = [encode_sft_row(tokenizer, ex) for ex in examples]
        _check_rows(self.data, config.model.max_position_embeddings)
        self.run_dir = Path(config.out_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        check_shared_folder(self.run_dir, "sft.out_dir")  # starts torch.distributed
        path = resume_point(self.ckpt_dir, resume=config.resume, overwrite=config.overwrite,
                            start_over="resume=False (in a recipe --sft.resume=false)",
                            expect=("sft_data", "SFT"))
        if path is None and not config.overwrite:
            self._check_fresh_start()  # only raises: without overwrite nothing is moved
        self.engine = TrainEngine(config.model, config.parallel, config.optim,
                                  total_updates=config.steps, seed=config.seed,
                                  init_from=config.init_from, resuming=path is not None)
        self.policy, self.info = self.engine.policy, self.engine.info
        self._check_layout()
        self.data_fingerprint = _fingerprint(self.data)
        self.order = RowStream(len(self.data), config.seed)
        self.step_idx = 0
        """Optimizer steps done (restored from a checkpoint on resume)."""
        if path is not None:
            self._resume(path)
        elif config.overwrite:  # without it the check above already found nothing to move
            self._check_fresh_start()

    def _check_layout(self) -> None:
        cfg, dp = self.cfg, self.info.dp
        if cfg.batch_size % dp:
            raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the data "
                             f"parallel size ({dp})")
        rows, mbs = cfg.batch_size // dp, cfg.parallel.micro_batch_size
        if cfg.parallel.max_tokens_per_microbatch > 0:
            said = sequence_loss_on_packed_rows(cfg.model, cfg.parallel)
            if said and self.engine.is_logger:
                log.warning("%s", said)
            if mbs and self.engine.is_logger:
                log.warning("parallel.micro_batch_size=%d is not used by SFT training: "
                            "parallel.max_tokens_per_microbatch=%d packs the rows by tokens",
                            mbs, cfg.parallel.max_tokens_per_microbatch)
        elif mbs and mbs < rows and rows % mbs:
            raise ValueError(f"parallel.micro_batch_size ({mbs}) must divide the rows per data "
                             f"parallel rank (batch_size {cfg.batch_size} / dp {dp} = {rows}), "
                             f"or be >= them")

    # -------------------------------------------------------------------------- checkpoints
    def _check_fresh_start(self) -> None:
        start_fresh(self.run_dir, RUN_FILES, overwrite=self.cfg.overwrite,
                    resume=self.cfg.resume, what="SFT run",
                    resume_off="resume=False",
                    overwrite_on="overwrite=True (in a recipe --sft.overwrite=true)")

    def _resume(self, path: Path) -> None:
        """Model, optimizer (resharded to this layout), LR schedule, data position and step from
        the checkpoint ``path``; metrics.jsonl is cut back to its step."""
        state, meta = load_checkpoint(path)
        data = meta.get("sft_data")
        if not isinstance(data, dict) or not ("position" in data or "rng" in data):
            raise CheckpointError(f"checkpoint {path} is not an SFT checkpoint (its meta.json has "
                                  f"no sft_data); choose another out_dir for this SFT run")
        check_resumed_config(meta.get("config"), dump_toml(self.cfg), path,
                             ("steps", "resume", "overwrite", "progress", "save_every",
                              "keep_last", "parallel."))
        self.engine.load_checkpoint(path, state, meta)
        self.step_idx = int(meta["step"])
        if "position" in data:
            self.order.position = int(data["position"])
        else:  # older checkpoints: rows were drawn with replacement from a saved RNG
            self.order.position = self.step_idx * self.cfg.batch_size
            log.warning("checkpoint %s drew SFT rows with replacement (an older r1fast); the "
                        "run continues without replacement from row %d of the epoch order, so "
                        "its data order is not that of an uninterrupted run", path,
                        self.order.position)
        if self.engine.is_logger:
            if data.get("fingerprint") != self.data_fingerprint:
                log.warning("resuming %s with other training rows than the run's (%d rows, "
                            "sha256 %.12s), now %d rows, sha256 %.12s; the data order from "
                            "here on is not that of an uninterrupted run", path,
                            data.get("rows", -1), str(data.get("fingerprint")), len(self.data),
                            self.data_fingerprint)
            truncate_metrics(self.run_dir / "metrics.jsonl", self.step_idx)
        log.info("resumed from %s at step %d", path, self.step_idx)
        self.engine.fit_schedule(self.cfg.steps, self.cfg.optim.warmup_steps, "steps")

    def save(self) -> Path:
        """A checkpoint of this step (collective): model and optimizer in megatron's
        distributed format (resumable at any layout), RNG per rank, data position and config
        in meta."""
        meta = {"sft_data": {"position": self.order.position, "rows": len(self.data),
                             "fingerprint": self.data_fingerprint},
                "config": dump_toml(self.cfg), **self.engine.checkpoint_meta()}
        return save_checkpoint(self.ckpt_dir, self.step_idx, self.engine.rank_state(), meta,
                               keep_last=self.cfg.keep_last, write_shared=self.engine.write_shared,
                               shared_tensors=self.engine.shared_tensors())

    # -------------------------------------------------------------------------- one step
    def _batch(self) -> UpdateBatch:
        """This DP rank's share of the next global batch (every rank draws the same rows): with
        packing and ``parallel.balance_dp_tokens``, rows of balanced token sums (every rank
        holds the step's rows, so nothing is exchanged; each rank otherwise runs as many
        packed micro-batches as its fullest peer), else a contiguous slice."""
        rows = [self.data[i] for i in self.order.take(self.cfg.batch_size)]
        dp, par = self.info.dp, self.cfg.parallel
        if dp > 1 and par.balance_dp_tokens and par.max_tokens_per_microbatch > 0:
            parts = balanced_partition([len(p) + len(c) for p, c in rows], dp)
            rows = [rows[i] for i in parts[self.info.dp_rank]]
        else:
            k = self.cfg.batch_size // dp
            rows = rows[self.info.dp_rank * k:(self.info.dp_rank + 1) * k]
        prompts = [[p[0]] if self.cfg.loss_on_prompt else p for p, _ in rows]
        comps = [p[1:] + c if self.cfg.loss_on_prompt else c for p, c in rows]
        n = len(rows)
        longest = max(len(p) + len(c) for p, c in zip(prompts, comps)) - 1
        length = all_ranks_int(longest, "max")
        return build_update_batch(prompts, comps, [[0.0] * len(c) for c in comps], torch.zeros(n),
                                  torch.ones(n, dtype=torch.bool), self.tokenizer.pad_id, length)

    def _micro_batches(self, batch: UpdateBatch) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of this rank's rows: packed ``[1, T]`` streams with ``cu_seqlens``
        under the token budget (every rank runs the same number, of one length T agreed over
        the ranks, a multiple of tp under sequence parallelism), else padded ``[b, L]``
        micro-batches of ``parallel.micro_batch_size`` rows (default: all rows at once)."""
        budget = self.cfg.parallel.max_tokens_per_microbatch
        if budget > 0:
            multiple = self.info.tp if self.policy.sequence_parallel else 1
            packs = packed_micro_batches(batch.lengths.tolist(), budget, multiple,
                                         agree=all_ranks_int)
            pad = self.tokenizer.pad_id
            return [{"tokens": p.pack(batch.tokens, pad), "lengths": p.real_lengths(),
                     "targets": p.pack(batch.targets, pad), "mask": p.pack(batch.mask),
                     "cu_seqlens": p.cu_seqlens()} for p in packs]
        n = batch.num_rows
        mbs = self.cfg.parallel.micro_batch_size or n
        return [{"tokens": batch.tokens[s], "lengths": batch.lengths[s],
                 "targets": batch.targets[s], "mask": batch.mask[s]}
                for s in split_even(n, max(n // mbs, 1))]

    def _normalizer(self, batch: UpdateBatch) -> float:
        """Target tokens of the global batch (all DP ranks): the loss's one denominator."""
        return max(self.engine.dp_sum([float(batch.mask.sum())])[0], 1.0)

    def _loss_fn(self, total_tokens: float):
        return _nll_loss(total_tokens, self.policy.tp_group)

    def step(self) -> dict[str, float]:
        """One optimizer step over the next global batch; returns its metrics row."""
        t0 = time.perf_counter()
        batch = self._batch()
        total = self._normalizer(batch)
        micro = self._micro_batches(batch)
        upd = self.engine.update(micro, self._loss_fn(total))
        self.step_idx += 1
        local = {"nll": sum(float(r["nll"]) for r in upd.metrics)}
        loss = self.engine.last_stage_reduce(local, ["nll"], op="sum")["nll"]
        seen = self.engine.dp_sum([float(batch.lengths.sum())])[0]  # real tokens run
        return {"loss": loss, "grad_norm": upd.grad_norm, "tokens": total, "lr": upd.lr,
                "micro_batches": len(micro), "skipped": float(upd.skipped),  # non-finite
                "tokens_per_s": seen / max(time.perf_counter() - t0, 1e-9)}

    # -------------------------------------------------------------------------- the loop
    def fit(self) -> Path:
        """Train until ``steps`` (checkpoints every ``save_every`` steps and at the end), then
        save ``out_dir/model`` (HF safetensors + tokenizer) and return its path."""
        cfg = self.cfg
        if self.engine.is_logger:  # `r1fast export` of a checkpoint reads it from here
            self.tokenizer.save(self.run_dir / "tokenizer")
        run_steps(self, cfg.steps, cfg.save_every,
                  MetricsLogger(self.run_dir, enabled=self.engine.is_logger, tensorboard=False,
                                progress=cfg.progress, total_steps=cfg.steps,
                                initial_step=self.step_idx, desc="sft"))
        return self.engine.save_model(self.tokenizer, self.run_dir / "model")


def encode_sft_row(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """``(prompt ids with bos, completion ids)`` of an SFT row. The completion ends with the
    tokenizer's eos, unless the row says ``"completion_ends_turn": true`` (its text already
    ends with the chat template's end of turn: r1fast.pipeline.sft_data.render_prompts)."""
    closed = row.get("completion_ends_turn", False)
    if not isinstance(closed, bool):
        raise ValueError(f"completion_ends_turn must be true or false, got {closed!r}")
    return (tokenizer.encode(row["prompt"], add_bos=True),
            tokenizer.encode(row["completion"], add_eos=not closed))


def _check_rows(rows: Sequence[tuple[list[int], list[int]]], max_positions: int) -> None:
    """Every row must fit the model (found at start-up, not at the step that draws it) and
    have a first token to predict from (a tokenizer without bos encodes "" to nothing)."""
    empty = [i for i, (p, _) in enumerate(rows) if not p]
    if empty:
        raise ValueError(f"SFT examples {empty[:5]}{' ...' if len(empty) > 5 else ''} "
                         f"({len(empty)} in all) have an empty prompt and this tokenizer adds "
                         f"no bos, so their first token has nothing to be predicted from; give "
                         f"each row a non-empty prompt")
    # the model reads prompt + completion minus the last token
    long = [(i, len(p) + len(c) - 1) for i, (p, c) in enumerate(rows)
            if len(p) + len(c) - 1 > max_positions]
    if long:
        shown = ", ".join(f"examples[{i}]: {n}" for i, n in long[:5])
        raise ValueError(f"{len(long)} SFT row(s) are longer than model.max_position_embeddings="
                         f"{max_positions} tokens ({shown}{' ...' if len(long) > 5 else ''}); "
                         f"drop them first (an SFT recipe drops and counts them) or use a model "
                         f"with a longer context")


def _fingerprint(rows: Sequence[tuple[list[int], list[int]]]) -> str:
    """sha256 of the tokenised rows (a resume checks it is training on the same data)."""
    h = hashlib.sha256()
    for prompt, completion in rows:
        h.update(array("q", [len(prompt), len(completion), *prompt, *completion]).tobytes())
    return h.hexdigest()


def _nll_loss(total_tokens: float, tp_group):
    """Next-token cross-entropy of the masked targets, this micro-batch's share of the mean over
    the ``total_tokens`` of the global batch; from hidden states, no logits. Takes padded
    ``[b, L]`` and packed ``[1, T]`` micro-batches alike: the loss is per token."""

    def loss_fn(hidden, weight, mb):
        b, length, h = hidden.shape
        dev = hidden.device
        targets, mask = (to_device_async(mb[k], dev) for k in ("targets", "mask"))  # no wait
        logp = ops.linear_logprob(hidden.reshape(b * length, h), weight, targets.reshape(-1),
                                  tp_group=tp_group)
        nll = -(logp * mask.reshape(-1)).sum() / total_tokens
        return nll, {"nll": nll.detach()}

    return loss_fn
