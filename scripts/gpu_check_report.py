"""Reading stage outputs and writing summary.md for scripts/gpu_check.py (kept apart so the
runner stays about running): the last line of a log, a marker line's JSON, test counts from a
JUnit file or from a ``pytest -v`` log, and the markdown summary of all rows."""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from gpu_check_targets import render_targets


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _marker_json(text: str, marker: str) -> dict | None:
    for line in (text or "").splitlines():
        if line.startswith(marker + " "):
            try:
                return json.loads(line[len(marker) + 1:])
            except ValueError:
                return None
    return None


def _verbose_counts(text: str) -> dict:
    """Counts from ``pytest -v`` lines (a run killed before writing its JUnit file)."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "passed": 0}
    failed = []
    for m in re.finditer(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", text or "",
                         re.M):
        word = m.group(2)
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failures", "ERROR": "errors",
               "SKIPPED": "skipped", "XFAIL": "skipped"}[word]
        counts[key] += 1
        counts["tests"] += 1
        if key in ("failures", "errors"):
            failed.append(m.group(1))
    counts["failures_list"] = failed[:20]
    counts["partial"] = True
    return counts


def _junit_counts(path: Path) -> dict:
    """Totals of a pytest JUnit file (and the first failing test ids)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for s in suites:
        for k in counts:
            counts[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failures_list"] = failed[:20]
    return counts


_BENCH_COLS = ("op", "provider", "mode", "shape", "ms", "tflops", "gbps", "frac_roofline",
               "frac_copy", "peak_extra_mib", "max_abs_err", "max_grad_rel_err", "step_s",
               "tokens_per_s", "skipped")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ",".join(f"{k}={x}" for k, x in v.items())
    return str(v).replace("|", "/").replace("\n", " ")[:160]


def render_summary(rows: list[dict], dry: bool, finished: bool, elapsed: float) -> str:
    env = next((r for r in rows if r.get("kind") == "env"), {})
    stages = [r for r in rows if r.get("kind") == "stage"]
    bench = [r for r in rows if r.get("kind") == "bench"]
    lines = [f"# r1fast gpu-check{' (DRY: tiny shapes, Triton interpreter)' if dry else ''}", ""]
    lines.append(f"- state: {'finished' if finished else 'in progress or cut short'} after "
                 f"{elapsed:.0f} s")
    for key in ("device", "clocks", "torch", "cuda_runtime", "have_triton", "nvcc", "python",
                "git_commit", "git_dirty", "have_megatron", "have_liger_kernel",
                "have_transformer_engine", "time"):
        if key in env:
            lines.append(f"- {key}: {_fmt(env[key])}")
    lines += ["", "## Stages", "", "| stage | status | seconds | limit s | detail |",
              "| --- | --- | --- | --- | --- |"]
    for r in stages:
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']} | {r.get('limit_s', '')} "
                     f"| {_fmt(r.get('detail'))} |")
    failing = [t for r in stages for t in r.get("failures_list", []) or []]
    if failing:
        lines += ["", "Failing tests:", ""] + [f"- {t}" for t in failing]
    if bench:
        lines += ["", "## Targets (issue #18; ratios within this run)", "",
                  *render_targets(rows)]
    if bench:
        lines += ["", "## Benchmarks", "", "| bench | " + " | ".join(_BENCH_COLS) + " |",
                  "| --- |" + " --- |" * len(_BENCH_COLS)]
        for r in bench:
            lines.append(f"| {r.get('bench')} | " + " | ".join(_fmt(r.get(c)) for c in _BENCH_COLS)
                         + " |")
        tuned = {k: v for r in bench for k, v in (r.get("autotune") or {}).items()}
        if tuned:
            lines += ["", "Autotune choices:", ""] + [f"- {k}: {_fmt(v)}" for k, v in
                                                      sorted(tuned.items())]
    lines += _resource_lines([r for r in rows if r.get("kind") == "resources"])
    lines.append("")
    return "\n".join(lines)


def _resource_lines(rows: list[dict]) -> list[str]:
    """The compiler's report per kernel and config (bench/kernel_resources.py)."""
    if not rows:
        return []
    lines = ["", f"## Kernel resources ({rows[0].get('arch')}, Triton {rows[0].get('triton')})",
             "", "| workload | kernel | meta-parameters | warps x stages | regs | stack B | "
             "smem KiB | HGMMA | LDGSTS | spill instr. in loops |",
             "| --- |" + " --- |" * 9]
    for r in rows:
        meta = {k: v for k, v in (r.get("constexprs") or {}).items() if k.startswith("BLOCK")}
        lines.append(f"| {r.get('workload')} | {r.get('kernel')} | {_fmt(meta)} | "
                     f"{r.get('num_warps')}x{r.get('num_stages')} | {r.get('regs')} | "
                     f"{r.get('stack_bytes')} | {(r.get('shared_bytes') or 0) / 1024:.0f} | "
                     f"{r.get('hgmma')} | {r.get('ldgsts')} | {r.get('spills_in_loops')} |")
    return lines
