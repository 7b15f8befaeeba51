"""Run metrics: one JSON line per step (``metrics.jsonl``), TensorBoard scalars, a progress bar.

Only rank 0 writes. JSONL is the machine-readable record (plots, tests, resume checks);
TensorBoard is for people; the progress bar shows the latest reward and accuracy.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from r1fast.atomic import write_text_atomic

log = logging.getLogger("r1fast.train")


def _scalar(v) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().item())
    return float(v)


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 total_steps: int | None = None, progress: bool = True, initial_step: int = 0,
                 desc: str = "grpo"):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = None
        self._bar = None
        self._file = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # on resume, points after the checkpoint (logged again from it) are purged, as
            # metrics.jsonl is cut back
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"),
                                     purge_step=initial_step + 1 if initial_step else None)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)

    def log(self, step: int, metrics: Mapping[str, float]) -> dict:
        row = {"step": step, "time": time.time()}
        row.update({k: _scalar(v) for k, v in metrics.items()})
        if not self.enabled:
            return row
        self._file.write(json.dumps(row) + "\n")
        self.scalars(step, {k: v for k, v in row.items() if k not in ("step", "time")})
        if self._bar is not None:
            shown = {k: f"{row[k]:.3g}" for k in ("reward_mean", "accuracy", "loss", "kl")
                     if k in row}
            self._bar.set_postfix(shown)
            self._bar.update(1)
        return row

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """TensorBoard scalars at ``step`` (non-finite ones left out): a metrics row's, or
        those of no metrics.jsonl row (an evaluation's, whose row is in eval.jsonl)."""
        if self._tb is not None:
            for k, v in values.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file (metrics, datasets)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def truncate_metrics(path: str | Path, last_step: int) -> tuple[int, int]:
    """Drop the rows of a metrics file logged after ``last_step`` (a resume from the checkpoint
    of ``last_step`` logs them again) and lines that are not JSON objects (a torn last line of
    a killed run). The file is replaced atomically. Returns ``(rows dropped, torn lines)``."""
    path = Path(path)
    if not path.is_file():
        return 0, 0
    kept, dropped, torn = [], 0, 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            torn += 1
            continue
        if not isinstance(row, dict):
            torn += 1
        elif isinstance(row.get("step"), (int, float)) and row["step"] > last_step:
            dropped += 1
        else:
            kept.append(line)
    if dropped or torn:
        write_text_atomic(path, "".join(k + "\n" for k in kept))
        log.info("%s: dropped %d row(s) after step %d (logged again from the checkpoint) and "
                 "%d unreadable line(s)", path.name, dropped, last_step, torn)
    return dropped, torn


def gather_expert_load(policy) -> dict[int, list[float]]:
    """Tokens the training forwards routed to each expert of every MoE layer (all pipeline
    stages) since the last call, ``{layer: [E]}``, the same on every rank (collective)."""
    from r1fast.policy.parallel import all_ranks_object
    from r1fast.policy.router import expert_load

    loads = {layer: load.tolist() for layer, load in expert_load(policy).items()}
    for part in all_ranks_object(loads):  # stages hold different layers; replicas the same sums
        loads.update(part)
    return dict(sorted(loads.items()))


def load_imbalance(loads: Mapping[int, list[float]]) -> dict[str, float]:
    """Max over mean of the per-expert token counts of a layer (1.0: perfectly balanced; E:
    every token on one expert): the worst layer's and the mean over layers."""
    ratios = [max(c) * len(c) / sum(c) for c in loads.values() if sum(c) > 0]
    if not ratios:
        return {}
    return {"moe/load_imbalance_max": max(ratios),
            "moe/load_imbalance_mean": sum(ratios) / len(ratios)}


def combine_micro_metrics(stats: Mapping[str, list[float]]) -> dict[str, float | None]:
    """One rank's update metrics from its micro-batches' rows (``stats[key]`` in micro-batch
    order): ``loss`` summed (each is a share of the global loss); ``ratio_min`` /
    ``ratio_max`` the extremes over micro-batches that had tokens (None when none had: a
    micro-batch without tokens reports a neutral 1.0); every other metric a mean weighted by
    the micro-batches' ``num_tokens``, so a 5-token micro-batch counts for its 5 tokens."""
    counts = stats.get("num_tokens")
    out: dict[str, float | None] = {}
    for key, vals in stats.items():
        aligned = counts is not None and len(counts) == len(vals)
        weighted = aligned and sum(counts) > 0
        if key == "loss":
            out[key] = sum(vals)
        elif key in ("ratio_min", "ratio_max") and aligned:
            had = [v for v, n in zip(vals, counts) if n > 0]
            out[key] = (min(had) if key == "ratio_min" else max(had)) if had else None
        elif weighted and key != "num_tokens":
            out[key] = sum(v * n for v, n in zip(vals, counts)) / sum(counts)
        else:
            out[key] = sum(vals) / len(vals)
    return out


def replica_token_means(local: Mapping[str, float | None], keys: Sequence[str], tokens: float,
                        reduce_sum: Callable[[dict, list], dict]) -> dict[str, float]:
    """``keys`` of one replica's :func:`combine_micro_metrics` over the DP replicas: ``loss``
    summed, every other key a mean over all their ``tokens`` (each replica's mean weighted by
    its own count), so the numbers equal a one-rank run's over the same rows at any DP size
    (a plain mean over replicas halved them at DP 2 when one replica kept no tokens).
    ``reduce_sum(values, keys)``: the sum over the replicas (collective)."""
    vals = {k: float(local.get(k) or 0.0) * (1.0 if k == "loss" else tokens) for k in keys}
    out = reduce_sum({**vals, "num_tokens": float(tokens)}, [*keys, "num_tokens"])
    total = out.pop("num_tokens")
    return {k: v if k == "loss" else (v / total if total > 0 else 0.0) for k, v in out.items()}


def append_jsonl(path: str | Path, row: Mapping) -> None:
    """One JSON line appended to ``path`` (flushed: a killed run keeps its rows)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
