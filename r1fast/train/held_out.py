"""Held-out evaluation during a GRPO run: when it runs, what its row says, how it survives a kill.

A run with held-out problems (``data.test_path``, or ``data.num_test`` problems of the synthetic
task's test split) evaluates pass@1 and cons@k on them at the end, every ``data.eval_every``
steps on the way, and with ``data.eval_before_train`` once before the first step: the baseline
a learning result is measured against (verl's ``val_before_train`` / ``test_freq``).

Each evaluation appends a row to ``out_dir/eval.jsonl``: the scores with their standard errors
over problems, the number of problems and samples, the sampling seed, the held-out prompts that
``data.max_prompt_tokens`` dropped (the scores are of the rest) and, beside a step-0 row of the
same problems, the change since step 0 with its paired standard error. Every evaluation samples
problem i's j-th completion from the random stream (seed, i, j), so two evaluations differ only
by the policy and their per-problem difference is a paired comparison
(:func:`r1fast.pipeline.demo_report.gain`). The scores also go to TensorBoard as ``eval/*``.

A resume cuts the rows after its checkpoint (they are evaluated again, as the metrics are
logged again), and an evaluation that a kill cut off after its step's checkpoint runs at the
restart, so each due step has exactly one row.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, NamedTuple

from r1fast.train.batch import all_ranks_int
from r1fast.train.metrics import append_jsonl, read_jsonl, truncate_metrics

log = logging.getLogger("r1fast.train")

#: scores compared with the step-0 row (each with its ``_se``)
COMPARED = ("pass_at_1", "cons_at_k")


class HeldOut(NamedTuple):
    """The held-out problems a run evaluates."""

    source: str
    """Their name: ``data.test_path``, or ``<task>:test``."""
    examples: list[dict]
    """The problems evaluated, rendered, each under the length cap."""
    dropped: int = 0
    """Held-out problems ``data.max_prompt_tokens`` dropped (not in ``examples``)."""


@dataclasses.dataclass(kw_only=True)
class HeldOutEvaluator:
    """Evaluates a GRPO trainer's policy on its held-out problems (collective: every rank of the
    run calls each method; rank 0, ``is_logger``, writes)."""

    trainer: Any
    """The :class:`~r1fast.train.grpo.GRPOTrainer` (its config, task, policy and engine)."""

    @property
    def held_out(self) -> HeldOut | None:
        return self.trainer.task.held_out

    @property
    def path(self) -> Path:
        return self.trainer.run_dir / "eval.jsonl"

    def due(self, step: int) -> bool:
        """Whether step ``step`` (0: before training) has an evaluation."""
        d, steps = self.trainer.cfg.data, self.trainer.cfg.run.steps
        if self.held_out is None:
            return False
        if step == 0:
            return d.eval_before_train
        return step == steps or (d.eval_every > 0 and step % d.eval_every == 0)

    def missing(self, step: int) -> bool:
        """``step`` is due and eval.jsonl has no row of it (collective)."""
        tr = self.trainer
        gone = tr.is_logger and self.due(step) and not (
            self.path.is_file() and any(r.get("step") == step for r in read_jsonl(self.path)))
        return bool(all_ranks_int(int(gone), "max"))

    def cut_after(self, step: int) -> None:
        """A resume from ``step``'s checkpoint evaluates the later steps again: their rows go."""
        if self.trainer.is_logger:
            truncate_metrics(self.path, step)

    def evaluate(self, step: int, logger=None) -> dict[str, Any] | None:
        """pass@1 / cons@k on the held-out problems now, as step ``step``'s row (None without
        held-out problems); the data-parallel replicas share the sampling and all ranks the
        answer checks; rank 0 appends the row to eval.jsonl and its scores to ``logger``'s
        TensorBoard."""
        from r1fast.pipeline.evaluate import evaluate_model

        held_out, tr = self.held_out, self.trainer
        if held_out is None:
            return None
        d = tr.cfg.data
        result = evaluate_model(None, held_out.examples, k=d.eval_k,
                                max_new_tokens=tr.cfg.rollout.max_new_tokens,
                                seed=tr.cfg.run.seed, policy=tr.policy,
                                tokenizer=tr.task.tokenizer, dp_group=tr.engine.dp_host_group(),
                                share_checks=True, warn=tr.is_logger,
                                decoder_options=tr.cfg.rollout.decoder_options()).as_dict()
        row = {"step": step, "test_path": d.test_path, "held_out": held_out.source,
               "held_out_dropped": held_out.dropped, **result}
        if not tr.is_logger:
            return row
        start = self._step_zero_row() if step > 0 else None
        if start is not None:
            row["vs_step_0"] = since_start(row, start)
        append_jsonl(self.path, row)
        if logger is not None:
            logger.scalars(step, {f"eval/{k}": row[k] for k in
                                  ("pass_at_1", "cons_at_k", "format_rate", "truncated_rate")
                                  if row.get(k) is not None})
        log.info("%s", describe(row))
        return row

    def _step_zero_row(self) -> dict | None:
        """The step-0 row of eval.jsonl, if any."""
        if not self.path.is_file():
            return None
        for row in read_jsonl(self.path):
            if row.get("step") == 0:
                return row
        return None


def since_start(row: dict, start: dict) -> dict[str, float] | None:
    """``row``'s change since the step-0 evaluation ``start`` (``{key: diff, key_se: se}``),
    paired over problems; None when the two did not score the same problems with the same
    samples per problem and seed (e.g. a resume with other held-out settings)."""
    from r1fast.pipeline.demo_report import gain

    same = ("held_out", "num_problems", "k", "seed", "temperature", "top_p", "max_new_tokens")
    if any(row.get(k) != start.get(k) for k in same):
        return None
    out = {}
    for key in COMPARED:
        out[key], out[f"{key}_se"] = gain(row, start, key)
    return out


def describe(row: dict) -> str:
    """One log line of an eval.jsonl row: scores +- standard error, what they are over."""
    kept = row["num_problems"]
    dropped = row.get("held_out_dropped") or 0
    over = (f"{kept} problems x {row['k']} samples of {row['held_out']}"
            + (f" ({dropped} dropped by data.max_prompt_tokens)" if dropped else "")
            + f", seed {row['seed']}")
    text = (f"eval at step {row['step']}: pass@1 {row['pass_at_1']:.3f} +- "
            f"{row['pass_at_1_se']:.3f}, cons@{row['k']} {row['cons_at_k']:.3f} +- "
            f"{row['cons_at_k_se']:.3f} ({over})")
    change = row.get("vs_step_0")
    if change:
        text += (f"; since step 0: pass@1 {change['pass_at_1']:+.3f} +- "
                 f"{change['pass_at_1_se']:.3f}, cons@{row['k']} {change['cons_at_k']:+.3f} +- "
                 f"{change['cons_at_k_se']:.3f} (paired over problems)")
    return text
