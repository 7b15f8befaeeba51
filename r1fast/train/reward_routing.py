"""Mixed-source rewards (R1's stage 4): rule rewards for reasoning rows, a reward model for
general prompts, in one GRPO run, with each source's numbers reported on its own.

A row's ``reward`` field picks its source:

- ``"reward_model"`` or ``"model"``: the **model** source. The row needs only a prompt (no
  answer); its completions are scored by the recipe's reward model alone
  (``[reward] reward_model`` = a reward-model folder), as ``reward_model_weight * score``;
- anything else (a rule reward's name, ``"rule"``, or no field): the **rule** source, scored by
  the ``[reward] weights`` parts as before (``accuracy`` = the row's own checker).

:class:`MixedScorer` splits a batch by source, scores each part with its own
:class:`~r1fast.rewards.RewardRunner` (the reward model's runner is called on every process
even when it has no model rows: its forward is collective) and merges the results back in row
order. Besides ``total`` and every part (0.0 on the rows of the other source), it emits per row

- ``rows_<source>``: 1.0 on that source's rows, else 0.0;
- ``total_<source>``: the row's total on that source's rows, else 0.0;

so the trainer's per-part means over all rows (``reward/<part>``, summed over data-parallel
ranks, divided by the global row count) are the share of the batch from each source and each
source's contribution to ``reward_mean`` (``reward/total_rule + reward/total_model ==
reward_mean``). :func:`source_means` turns those into the means over each source's own rows,
``reward/source_rule`` and ``reward/source_model`` (exact under data parallelism, since both
numerator and denominator are global sums).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

#: values of a row's ``reward`` field that route it to the reward model
MODEL_SOURCES = ("reward_model", "model")
SOURCES = ("rule", "model")

#: the prompt column of each dataset preset (r1fast.data.files), for rows without an answer
PROMPT_COLUMN = {"gsm8k": "question", "math": "problem", "dapo": "prompt",
                 "deepscaler": "problem", "verl": "prompt"}


def row_source(row: Mapping[str, Any]) -> str:
    """``"model"`` for a row routed to the reward model, else ``"rule"``."""
    return "model" if row.get("reward") in MODEL_SOURCES else "rule"


def general_example(row: Mapping[str, Any], index: int, where: str, path: str,
                    preset: str | None, prompt_key: str | None) -> dict:
    """The example of a model-source row: its prompt (text, or chat ``messages`` ending with
    the user's turn) only; ``where``: the row's ``"file:row"``, its id."""
    from r1fast.data.files import BadRow, prompt_fields, row_name

    if preset == "countdown":
        raise ValueError(f"data {row_name(path, where)}: reward={row.get('reward')!r} routes "
                         f"the row to the reward model, but preset 'countdown' builds every "
                         f"prompt from nums/target; use a preset with a prompt column or "
                         f"prompt_key")
    key = PROMPT_COLUMN[preset] if preset else (prompt_key or "prompt")
    try:
        prompt = prompt_fields(row.get(key))
    except BadRow as e:
        raise ValueError(f"data {row_name(path, where)}: key {key!r}: {e}") from e
    return {"id": where, "row": index, **prompt, "reward": "reward_model"}


def split_rows(rows: list[dict]) -> tuple[list[int], list[int]]:
    """(indices of rule rows, indices of model rows)."""
    model = [i for i, r in enumerate(rows) if row_source(r) == "model"]
    taken = set(model)
    return [i for i in range(len(rows)) if i not in taken], model


class MixedScorer:
    """Scores a batch whose rows come from both sources (see the module docstring): ``rule``
    and ``model`` are :class:`~r1fast.rewards.RewardRunner` s."""

    def __init__(self, rule, model):
        self.runners = {"rule": rule, "model": model}

    def __call__(self, texts: Sequence[str], examples: Sequence[dict],
                 rule_texts: Sequence[str] | None = None, *, rules: bool = True
                 ) -> dict[str, list[float]]:
        """``rule_texts``: the completions as the rule rewards read them (default ``texts``,
        which the reward model reads); ``rules=False``: zeros for the parts this
        process would compute alone (a model-parallel peer scores them); a reward model still
        runs (collective)."""
        n = len(texts)
        source = [row_source(e) for e in examples]
        read = {"rule": texts if rule_texts is None else rule_texts, "model": texts}
        out: dict[str, list[float]] = {"total": [0.0] * n}
        for name, runner in self.runners.items():  # both, always: the model's is collective
            rows = [i for i in range(n) if source[i] == name]
            scored = runner([read[name][i] for i in rows], [examples[i] for i in rows],
                            local_parts=rules)
            for j, i in enumerate(rows):
                out["total"][i] = scored.total[j]
            for part, values in scored.parts.items():
                column = out.setdefault(part, [0.0] * n)
                for j, i in enumerate(rows):
                    column[i] = values[j]
        for name in SOURCES:
            out[f"rows_{name}"] = [float(s == name) for s in source]
            out[f"total_{name}"] = [t if s == name else 0.0 for t, s in zip(out["total"], source)]
        return out

    def failure_metrics(self) -> dict[str, float]:
        """Failed reward calls of both runners: errors, timeouts, crashes."""
        ms = [r.metrics() for r in self.runners.values()]
        return {k: sum(m.get(f"rewards/{k}", 0.0) for m in ms)
                for k in ("errors", "timeouts", "crashes")}

    def close(self) -> None:
        for r in self.runners.values():
            r.close()


def source_means(metrics: Mapping[str, float], prefix: str = "reward/") -> dict[str, float]:
    """``{prefix + "source_<s>": mean total over source s's rows}`` for each source with rows in
    ``metrics`` (a trainer's step row holding ``reward/rows_<s>`` and ``reward/total_<s>``, the
    means over all rows); sources without rows are left out (their mean is undefined)."""
    out = {}
    for name in SOURCES:
        share = metrics.get(f"{prefix}rows_{name}")
        if share:
            out[f"{prefix}source_{name}"] = metrics[f"{prefix}total_{name}"] / share
    return out
