"""The demo's report: the results table (every rate with its standard error), the findings
checked against it, and the RL curves as PNG files.

A finding "holds" when the claimed gain is larger than two standard errors of the difference.
Two evaluations of the same held-out problems, with the same sampling streams, are paired: the
error is that of the per-problem differences (their standard deviation / sqrt(problems)). The
errors of unpaired results (no per-problem values) add in quadrature, ``sqrt(se_a^2 + se_b^2)``,
which overstates the error of a paired difference: it makes a gain harder to show and a
"not below" claim easier to pass, so paired values are used wherever they exist.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence


def _pm(row: dict, key: str) -> str:
    return f"{row[key]:.3f} ± {row[key + '_se']:.3f}"


def format_table(rows: Sequence[dict]) -> str:
    """Markdown: one line per evaluated model."""
    k = rows[0]["k"]
    lines = [f"| stage | pass@1 (k={k}) | cons@{k} | language mixing | length (chars) | format |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {_pm(r, 'pass_at_1')} | {_pm(r, 'cons_at_k')} | "
                     f"{_pm(r, 'language_mixing')} | {r['mean_length']:.1f} | "
                     f"{r['format_rate']:.2f} |")
    n = rows[0]["num_problems"]
    sampling = sorted({(r.get("temperature"), r.get("top_p"), r.get("seed")) for r in rows},
                      key=str)  # as the rows say: one line per setting they used
    said = "; ".join(f"T={t}, top-p {p}, seed {s}" for t, p, s in sampling)
    lines.append(f"\n{n} held-out problems x {k} samples ({said}); ± one standard error over "
                 f"problems, of the evaluation's sampling given each model's weights (not of "
                 f"training: another training run moves these more).")
    return "\n".join(lines)


def gain(better: dict, worse: dict, key: str = "pass_at_1") -> tuple[float, float]:
    """(difference, its standard error) of ``key`` between two evaluations: paired over
    problems when both carry ``per_problem`` values of the same problems, else in
    quadrature (see the module docstring)."""
    from r1fast.pipeline.evaluate import standard_error

    a = (better.get("per_problem") or {}).get(key)
    b = (worse.get("per_problem") or {}).get(key)
    if a is not None and b is not None and len(a) == len(b) > 1:
        return better[key] - worse[key], standard_error([x - y for x, y in zip(a, b)])
    return (better[key] - worse[key],
            math.sqrt(better[key + "_se"] ** 2 + worse[key + "_se"] ** 2))


def finding(text: str, diff: float, se: float, claim: str = "gain") -> dict:
    """A claim about ``diff`` (better minus worse) with its standard error. ``"gain"`` holds
    when diff > 2 se; ``"not_below"`` (non-inferiority) when diff >= -2 se."""
    if claim not in ("gain", "not_below"):
        raise ValueError(f"claim must be 'gain' or 'not_below', got {claim!r}")
    holds = diff > 2 * se if claim == "gain" else diff >= -2 * se
    return {"finding": text, "claim": claim, "diff": diff, "se": se, "holds": bool(holds)}


def format_findings(findings: Sequence[dict]) -> str:
    lines = ["| finding | difference | needs | holds |", "|---|---|---|---|"]
    for f in findings:
        need = f"> {2 * f['se']:.3f}" if f["claim"] == "gain" else f"> {-2 * f['se']:.3f}"
        lines.append(f"| {f['finding']} | {f['diff']:+.3f} | {need} | "
                     f"{'yes' if f['holds'] else 'NO'} |")
    return "\n".join(lines)


def start_end(rows: Sequence[dict], key: str, window: int = 5) -> tuple[float, float]:
    """Mean of ``key`` over the first and over the last ``window`` logged steps that have it."""
    vals = [r[key] for r in rows if key in r]
    if not vals:
        return float("nan"), float("nan")
    w = min(window, len(vals))
    return sum(vals[:w]) / w, sum(vals[-w:]) / w


CURVES = (("reward_mean", "reward", "reward"),
          ("accuracy", "accuracy", "accuracy (rule rows)"),
          ("response_length", "response_length", "response length (tokens)"),
          ("language_mixing", "language_mixing", "language mixing in the thought"))


def curve(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values. ``accuracy`` and ``language_mixing`` (1 - the logged
    language-consistency reward) are over the rule-scored rows: a mixed-source run logs rule
    parts as 0.0 on reward-model rows, so their means are divided by the rule rows' share."""
    src = "reward/language" if key == "language_mixing" else key
    pts = []
    for r in rows:
        if src not in r:
            continue
        value = r[src]
        if key in ("accuracy", "language_mixing") and "reward/rows_rule" in r:
            if not r["reward/rows_rule"]:
                continue  # no rule row this step
            value /= r["reward/rows_rule"]
        pts.append((r["step"], 1.0 - value if key == "language_mixing" else value))
    return [s for s, _ in pts], [v for _, v in pts]


def plot_curves(curves: dict[str, list[dict]], out: Path) -> list[Path]:
    """``rl_<metric>.png`` per metric (one line per RL stage), and ``rl_reward_sources.png``
    (rule vs reward-model reward means of the runs that have both)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, fname, title in CURVES:
        fig, ax = plt.subplots(figsize=(5.2, 3.6))
        for name, rows in curves.items():
            steps, vals = curve(rows, key)
            if steps:
                ax.plot(steps, vals, label=name)
        ax.set_xlabel("GRPO step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / f"rl_{fname}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    mixed = {n: r for n, r in curves.items() if any("reward/source_model" in x for x in r)}
    if mixed:
        fig, ax = plt.subplots(figsize=(5.2, 3.6))
        for name, rows in mixed.items():
            for src in ("rule", "model"):
                steps, vals = curve(rows, f"reward/source_{src}")
                ax.plot(steps, vals, label=f"{name}: {src} rows")
        ax.set_xlabel("GRPO step")
        ax.set_title("stage 4: reward per source")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "rl_reward_sources.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
