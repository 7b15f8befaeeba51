"""SFT from a TOML recipe: long reasoning traces (Sky-T1 style) or any SFT data file.

Sky-T1 showed that supervised fine-tuning alone turns an instruct model into a long-chain
reasoner: ~17k correct traces from a reasoning teacher, 3 epochs, learning rate 1e-5, batch 96.
``recipes/sky_t1_sft.toml`` is that recipe for ``r1fast stage sft --recipe``::

    r1fast stage sft --recipe recipes/sky_t1_sft.toml --sft.data=traces.jsonl --parallel.tp=8

A recipe has three tables: ``[sft]`` (:class:`SFTRecipe`: model folder, data, mixing, length
limit, epochs or steps, batch, checkpoints and resume), ``[optim]``
(:class:`r1fast.policy.optim.OptimConfig`; the total is set from the run length) and
``[parallel]`` (:class:`r1fast.policy.config.ParallelConfig`: the layout, and
``max_tokens_per_microbatch``, the token budget of the packed micro-batches that keeps memory
bounded on long traces); any key can be overridden as ``--sft.steps=1``. The run reads the
JSONL, mixes in non-reasoning rows (:mod:`r1fast.pipeline.sft_data`), renders prompts with the
model's chat template, drops rows longer than the model can hold (counted), and trains with
:class:`r1fast.train.sft.SFTTrainer`, checkpointing every ``sft.save_every`` steps and resuming
from the run folder's latest checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from r1fast.policy.config import ParallelConfig
from r1fast.policy.optim import OptimConfig

log = logging.getLogger("r1fast.pipeline")


@dataclass(kw_only=True)
class SFTRecipe:
    """What to fine-tune, on what, for how long."""

    init_from: Optional[str] = None
    """Model folder to fine-tune (Hugging Face checkpoint or an r1fast stage's output); it
    defines the architecture and the tokenizer. Required."""
    data: Optional[str] = None
    """SFT rows (the long reasoning traces): {"prompt", "completion"}, TRL conversations or
    ShareGPT, in .jsonl / .json / .parquet (r1fast.pipeline.sft_data.read_sft_rows). Required."""
    out_dir: str = "runs/sft"
    """Run folder: metrics.jsonl, data_summary.json and the model under model/."""
    mix: Optional[str] = None
    """Non-reasoning SFT rows (as ``data``) mixed in at ``mix_ratio``."""
    mix_ratio: float = 0.0
    """Share of the SFT set drawn from ``mix`` (R1: 200k of 800k = 0.25); 0: no mixing."""
    chat_template: bool = True
    """Render each prompt as a user message with the tokenizer's chat template (when it has one)."""
    system_prompt: Optional[str] = None
    """A system message before each prompt (chat template only; Sky-T1 used one)."""
    max_tokens: int = 0
    """Drop rows whose prompt + completion exceed this many tokens (counted and reported);
    0: the model's max_position_embeddings."""
    epochs: float = 1.0
    """Passes over the data, when ``steps`` is 0: steps = ceil(epochs * rows / batch_size)."""
    steps: int = 0
    """Optimizer steps; 0: as many as ``epochs`` passes need."""
    batch_size: int = 32
    """Sequences per optimizer step (global, split over data-parallel ranks)."""
    warmup_fraction: float = 0.0
    """Linear warmup over this share of the steps (sets optim.warmup_steps, which must then be
    left at 0); 0: optim.warmup_steps as given."""
    loss_on_prompt: bool = False
    """Also train on prompt tokens (pre-training style); False: completions only."""
    seed: int = 0
    """Seed of the mixing, the data order and any fresh weights."""
    progress: bool = True
    """Show a progress bar."""
    save_every: int = 0
    """Checkpoint (model, optimizer, data order) every N steps; 0: only at the end. A long run
    killed in between resumes from its last checkpoint."""
    keep_last: int = 0
    """Keep the newest N checkpoints: older ones are deleted after each save, each deletion
    logged; 0 keeps every checkpoint (as Megatron-LM and verl do)."""
    resume: bool = True
    """Continue from ``out_dir/checkpoints`` when it holds a complete checkpoint (resharded to
    this run's ``[parallel]`` layout if that differs)."""
    overwrite: bool = False
    """Allow starting from step 0 in an out_dir that already holds checkpoints or metrics (the
    old files move to ``out_dir/previous_<time>/``, never deleted); without it that is an
    error."""

    def __post_init__(self):
        if self.steps < 0 or (self.steps == 0 and not self.epochs > 0):
            raise ValueError(f"sft.steps must be > 0, or 0 with sft.epochs > 0, got "
                             f"steps={self.steps}, epochs={self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"sft.batch_size must be >= 1, got {self.batch_size}")
        if self.save_every < 0:
            raise ValueError(f"sft.save_every must be >= 0 (0: only at the end), got "
                             f"{self.save_every}")
        if self.keep_last < 0:
            raise ValueError(f"sft.keep_last must be >= 0 (0: keep every checkpoint), got "
                             f"{self.keep_last}")
        if self.max_tokens < 0:
            raise ValueError(f"sft.max_tokens must be >= 0 (0: the model's positions), got "
                             f"{self.max_tokens}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"sft.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 <= self.mix_ratio < 1:
            raise ValueError(f"sft.mix_ratio must be in [0, 1), got {self.mix_ratio}")
        if (self.mix is None) != (self.mix_ratio == 0):
            raise ValueError(f"sft.mix and sft.mix_ratio go together (a file and a share > 0), "
                             f"got mix={self.mix!r}, mix_ratio={self.mix_ratio}")


@dataclass(kw_only=True)
class SFTRun:
    """A whole SFT recipe file."""

    sft: SFTRecipe = field(default_factory=SFTRecipe)
    """Model, data, length and batch."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    """Optimizer and learning-rate schedule; total_steps is set from the run length (another
    value is an error)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP/PP/EP layout (DP is what remains of the world size)."""


def load_sft_recipe(path: str | Path | None, overrides: Sequence[str] = ()) -> SFTRun:
    """A recipe TOML + ``--table.key=value`` overrides -> a validated :class:`SFTRun`."""
    from r1fast import typed_toml

    try:
        return typed_toml.load(SFTRun, path, overrides)
    except ValueError as e:
        if isinstance(e, typed_toml.ConfigError):
            raise
        raise typed_toml.ConfigError(str(e)) from e


def prepare_rows(recipe: SFTRecipe, tokenizer, max_positions: int) -> tuple[list[dict], dict]:
    """The recipe's rows, rendered and length-filtered, then mixed (so the non-reasoning share
    is that of the rows trained on: the long rows dropped are mostly reasoning traces), and a
    summary of the counts."""
    from r1fast.pipeline.sft_data import (drop_long_rows, mix_non_reasoning, read_sft_rows,
                                          render_prompts)

    if recipe.max_tokens > max_positions:  # its longer rows could not be trained
        raise ValueError(f"sft.max_tokens={recipe.max_tokens} is more than the model's "
                         f"max_position_embeddings={max_positions}; use at most that (0: the "
                         f"model's)")
    limit = recipe.max_tokens or max_positions

    def ready(path: str) -> tuple[list[dict], int]:
        rows = render_prompts(read_sft_rows(path), tokenizer,
                              chat_template=recipe.chat_template,
                              system_prompt=recipe.system_prompt)
        return drop_long_rows(rows, tokenizer, limit)

    rows, dropped = ready(recipe.data)
    summary: dict[str, Any] = {"data": recipe.data, "rows": len(rows) + dropped,
                               "dropped_too_long": dropped}
    if recipe.mix is not None:
        extra, dropped_extra = ready(recipe.mix)
        summary["dropped_too_long"] += dropped_extra
        rows, summary["mix"] = mix_non_reasoning(rows, extra, recipe.mix_ratio, recipe.seed)
    summary.update(max_tokens=limit, trained_rows=len(rows))
    return rows, summary


def sft_config(run: SFTRun, model, steps: int):
    """The :class:`r1fast.train.sft.SFTConfig` of ``run`` for ``model`` (a ModelConfig) and a
    run of ``steps`` steps (warmup from ``sft.warmup_fraction``)."""
    from r1fast.pipeline.stages import checkpoint_warmup
    from r1fast.train.sft import SFTConfig

    r = run.sft
    optim = run.optim  # the engine sets total_steps to the run's steps (refusing another)
    if r.warmup_fraction:
        if run.optim.warmup_steps:
            raise ValueError(f"set sft.warmup_fraction ({r.warmup_fraction}) or "
                             f"optim.warmup_steps ({run.optim.warmup_steps}), not both")
        # rounded up, as transformers does (0.1 of 5 steps is 1, not 0: a fraction > 0 was
        # no warmup at all), past float noise (0.1 x 30 = 3.0000000000000004 is 3)
        warmup = math.ceil(round(r.warmup_fraction * steps, 9))
        kept = checkpoint_warmup(r.out_dir) if r.resume else None
        if kept is not None and kept != warmup:  # a longer run resumed: its schedule stays
            log.warning("sft.warmup_fraction=%g: the resumed run keeps its checkpoint's warmup "
                        "of %d steps (%g of this run's %d steps would be %d; the optimizer's "
                        "schedule resumes from the checkpoint)", r.warmup_fraction, kept,
                        r.warmup_fraction, steps, warmup)
            warmup = kept
        optim = dataclasses.replace(optim, warmup_steps=warmup)
    return SFTConfig(model=model, parallel=run.parallel, optim=optim, steps=steps,
                     batch_size=r.batch_size, loss_on_prompt=r.loss_on_prompt,
                     init_from=r.init_from, out_dir=r.out_dir, seed=r.seed, progress=r.progress,
                     save_every=r.save_every, keep_last=r.keep_last, resume=r.resume,
                     overwrite=r.overwrite)


def run_sft_recipe(run: SFTRun) -> tuple[Path, dict]:
    """Train as ``run`` says (resuming from ``out_dir``'s latest checkpoint when there is one);
    returns (``out_dir/model``, data summary). The summary is also written to
    ``out_dir/data_summary.json``."""
    from r1fast.data import load_tokenizer
    from r1fast.pipeline.sft_data import steps_for_epochs
    from r1fast.atomic import write_text_atomic
    from r1fast.policy.hf_checkpoint import load_model_config
    from r1fast.train.sft import SFTTrainer

    r = run.sft
    for key, value in (("sft.init_from", r.init_from), ("sft.data", r.data)):
        if value is None:
            raise ValueError(f"{key} is required (set it in the recipe or as --{key}=...)")
    model = load_model_config(r.init_from)
    tokenizer = load_tokenizer(r.init_from)
    rows, summary = prepare_rows(r, tokenizer, model.max_position_embeddings)
    steps = r.steps or steps_for_epochs(r.epochs, len(rows), r.batch_size)
    summary["steps"] = steps
    # the trainer checks the run folder first (a fresh start over an old run is an error, or
    # with overwrite moves the old files aside, data_summary.json included)
    trainer = SFTTrainer(sft_config(run, model, steps), rows, tokenizer)
    if trainer.engine.is_logger:  # one writer under torchrun (the temporary file is shared)
        write_text_atomic(Path(r.out_dir) / "data_summary.json",
                          json.dumps(summary, indent=1) + "\n")
    return trainer.fit(), summary
