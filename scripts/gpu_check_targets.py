"""Issue #18's speed targets, read off the benchmark rows of one gpu-check run.

The README carries "a table of the measured ratios against each target, misses included". This
module computes that table from ``results.jsonl`` alone, so nobody transcribes a number by
hand, and every ratio is taken between rows of the same run (same machine, clocks, versions):

| target | ratio computed | met when |
|---|---|---|
| linear_logprob fwd+bwd vs the 8THV floor | ms / (bare GEMMs' ms x 8/6) | <= 1.25 |
| linear_logprob vs Liger FLCE | Liger ms / r1fast ms | > 1 |
| linear_logprob extra memory | peak_extra_mib | < 2048 |
| linear_logprob logp error vs fp64 | max_abs_err | <= 1e-4 |
| linear_logprob dX, dW error vs fp64 | max of max_grad_rel_err | <= 1e-2 |
| fused policy loss vs linear_logprob alone | fused ms / alone ms | <= 1.03 |
| routing fwd+bwd vs megatron-core's router | megatron ms / r1fast ms | >= 5 |
| routing: one launch each way | kernels of a forward, of a backward (memsets shown) | 1, 1 |
| permute, unpermute vs a copy | frac_copy | >= 0.70 |
| GRPO step, kernels on vs off | on tokens_per_s / off tokens_per_s | >= 1.3 |
| grouped experts vs the per-expert loop (decoding, training) | loop ms / grouped ms | >= 1 |
| grouped experts vs megatron's SequentialMLP (training) | megatron ms / grouped ms | >= 1 |
| one temperature per row vs one for all (fused tiles) | per-row ms / scalar ms | <= 1.05 |

The gradient error row and the last four rows are not the issue's targets (bf16 gradients
are rounded to 2^-8 relative, so 1e-2 of the largest entry leaves room for accumulation order
only). Three check r1fast's own default, ``"auto"`` = the
grouped expert kernels on a GPU (``rollout.experts``, ``parallel.experts``), at Qwen3-30B-A3B's
expert sizes (a decoding step of 256 routed rows, forward; a training micro-batch of 16384,
forward and backward, also against megatron's own per-expert forward). The last prices a
per-sample temperature (``linear_logprob(temperature=[T] tensor)``): the fused kernels read one
more float per row, so it should cost next to nothing.

The bare-GEMM "full" row times the three GEMMs of a forward and backward without recompute
(6THV FLOPs), so the 8THV floor is that time x 8/6. r1fast's row is the faster of its
arrangements (fused or cuBLAS tiles), named in the table; the fused loss is its own path
(grad-in-forward is another algorithm, 6THV, with its own bench row); the launch count is that provider's, from its forward and backward rows
(``launches``, ``memsets``: the harness's profile of one call). A launch is a kernel; a
memset that zeroes an output in stream order (the CUDA router's ``cudaMemsetAsync`` of its
expert counts) is shown beside the count, not hidden and not counted; torch's ``zero_()`` is a
fill *kernel* on CUDA and counts (the Triton router's counts: its forward reads 2). Shapes are the issue's
(T=16384, H=4096, V=151936; E=256, k=8; H=4096) when the run has them; a dry run's tiny
shapes are used as they are and the table says so.
A target whose rows are missing, skipped or failed reads "not measured" with the reason.

    python scripts/gpu_check_targets.py RESULTS/results.jsonl     # prints the markdown table
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

LOGPROB_SHAPE = {"T": 16384, "H": 4096, "V": 151936}
ROUTE_SHAPE = {"T": 16384, "E": 256, "k": 8}
PERMUTE_SHAPE = {"T": 16384, "H": 4096, "E": 256, "k": 8}
#: (mode, shape) of the grouped experts' rows: a decoding step, a training micro-batch
EXPERTS_CASES = {"decoding": ("forward", {"rows": 256, "E": 128, "H": 2048, "F": 768}),
                 "training": ("full", {"rows": 16384, "E": 128, "H": 2048, "F": 768})}
R1FAST_LOGPROB = ("r1fast triton", "r1fast triton (gemm tiles)")
LIGER = "liger flce (sum)"
#: bytes per element of the benches' dtype names
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
#: the routing configs the issue names: a missing one reads "not measured", not nothing
ROUTE_CONFIGS = ("softmax", "dsv3")


def _bench_rows(rows: list[dict], bench: str, op: str | None = None,
                mode: str = "full") -> list[dict]:
    """The bench's rows of ``op`` in ``mode`` (a row with no mode, the step benchmark's, is
    a full one)."""
    return [r for r in rows if r.get("kind", "bench") == "bench" and r.get("bench") == bench
            and (op is None or r.get("op") == op) and r.get("mode", "full") == mode]


def _at_shape(rows: list[dict], want: dict) -> tuple[list[dict], bool]:
    """Rows at the shape ``want`` (its keys), else at the last shape present (a dry run)."""
    hit = [r for r in rows if all((r.get("shape") or {}).get(k) == v for k, v in want.items())]
    if hit or not rows:
        return hit, bool(hit)
    last = rows[-1].get("shape") or {}
    return [r for r in rows if all((r.get("shape") or {}).get(k) == last.get(k)
                                   for k in want)], False


def _timed(rows: list[dict], providers) -> dict[str, dict]:
    return {r["provider"]: r for r in rows if r.get("provider") in providers and "ms" in r}


def _why_missing(rows: list[dict], providers) -> str:
    notes = [f"{r['provider']}: {r.get('skipped') or r.get('error')}" for r in rows
             if r.get("provider") in providers and (r.get("skipped") or r.get("error"))]
    return "not measured" + (f" ({'; '.join(notes)})" if notes else " (no rows)")


def _row(target: str, goal: str, value, met, where: str, provider: str | None = None) -> dict:
    """One target; ``provider``: the r1fast row it was measured on, where one was."""
    return {"target": target, "goal": goal, "value": value, "met": met, "where": where,
            "provider": provider}


#: (target, goal, met) of linear_logprob at the issue's shape, in the table's order
_LOGPROB_TARGETS = (
    ("linear_logprob fwd+bwd / 8THV floor", "<= 1.25", lambda v: v <= 1.25),
    ("Liger FLCE / linear_logprob", "> 1", lambda v: v > 1),
    ("linear_logprob extra memory beyond dW, dX (MiB)", "< 2048", lambda v: v < 2048),
    ("linear_logprob logp error vs fp64", "<= 1e-4", lambda v: v <= 1e-4),
    ("linear_logprob dX, dW error vs fp64 (relative to the largest)", "<= 1e-2",
     lambda v: v <= 1e-2),
)


def _linear_logprob(rows: list[dict]) -> list[dict]:
    lp, exact = _at_shape(_bench_rows(rows, "linear_logprob", "linear_logprob"), LOGPROB_SHAPE)
    where = _shape_note(lp, exact)
    ours = _timed(lp, R1FAST_LOGPROB)
    if not ours:
        values = [_why_missing(lp, R1FAST_LOGPROB)] * len(_LOGPROB_TARGETS)
    else:
        best = min(ours.values(), key=lambda r: r["ms"])
        where = f"{where}; {best['provider']}"
        gemm = _timed(lp, ("bare GEMM (roofline)",)).get("bare GEMM (roofline)")
        liger = _timed(lp, (LIGER,)).get(LIGER)
        values = [best["ms"] / (gemm["ms"] * 8 / 6) if gemm
                  else _why_missing(lp, ("bare GEMM (roofline)",)),
                  liger["ms"] / best["ms"] if liger else _why_missing(lp, (LIGER,)),
                  _beyond_gradients(best), best.get("max_abs_err"), _grad_error(best)]
    return [_row(target, goal, value, met(value) if isinstance(value, (int, float)) else None,
                 where) for (target, goal, met), value in zip(_LOGPROB_TARGETS, values)]


def _grad_error(row: dict):
    """The largest of a full row's gradient errors (``max_grad_rel_err``: per input, max
    |grad - fp64| / max |fp64 grad|), or why there is none."""
    errs = [v for v in (row.get("max_grad_rel_err") or {}).values() if v is not None]
    return max(errs) if errs else "not measured (no gradient check in the row)"


def _beyond_gradients(row: dict):
    """A full run's peak extra memory less the gradients it must return (dW [V, H] and dX
    [T, H] in the inputs' dtype), as tests/ops/test_real_shapes.py bounds it."""
    shape, peak = row.get("shape") or {}, row.get("peak_extra_mib")
    if peak is None or shape.get("dtype") not in DTYPE_BYTES:
        return peak
    grads = (shape["V"] + shape["T"]) * shape["H"] * DTYPE_BYTES[shape["dtype"]]
    return peak - grads / 2**20


def _per_row_temperature(rows: list[dict]) -> dict:
    lp, exact = _at_shape(_bench_rows(rows, "linear_logprob", "linear_logprob"), LOGPROB_SHAPE)
    pair = ("r1fast triton", "r1fast triton (per-row tau)")
    timed = _timed(lp, pair)
    target, goal, where = "per-row temperature / one temperature", "<= 1.05", _shape_note(lp, exact)
    if len(timed) < 2:
        return _row(target, goal, _why_missing(lp, pair), None, where)
    ratio = timed[pair[1]]["ms"] / timed[pair[0]]["ms"]
    return _row(target, goal, ratio, ratio <= 1.05, f"{where}; {pair[1]}", pair[1])


def _fused_loss(rows: list[dict]) -> dict:
    fused, exact = _at_shape(_bench_rows(rows, "grpo_loss", "fused_linear_policy_loss"), LOGPROB_SHAPE)
    alone, _ = _at_shape(_bench_rows(rows, "grpo_loss", "linear_logprob (the fused loss's yardstick)"),
                         LOGPROB_SHAPE)
    impl = "triton" if any("(triton)" in r.get("provider", "") for r in fused) else "torch"
    # the fused loss's own path against linear_logprob's: grad-in-forward is another
    # algorithm (6THV against 8THV), its own row in the bench table
    ours = _timed(fused, (f"r1fast-fused ({impl})",))
    base = _timed(alone, (f"r1fast linear_logprob ({impl})",))
    goal, target = "<= 1.03", "fused policy loss / linear_logprob alone"
    if not ours or not base:
        return _row(target, goal, _why_missing(fused + alone, (
            f"r1fast-fused ({impl})", f"r1fast linear_logprob ({impl})")), None,
            _shape_note(fused, exact))
    best = min(ours.values(), key=lambda r: r["ms"])
    ratio = best["ms"] / next(iter(base.values()))["ms"]
    return _row(target, goal, ratio, ratio <= 1.03,
                f"{_shape_note(fused, exact)}; {best['provider']}")


def _faster_than(rows: list[dict], exact: bool, target: str, peer: str, goal: float) -> dict:
    ours = _timed(rows, ("r1fast cuda", "r1fast triton"))
    them = _timed(rows, (peer,)).get(peer)
    where = _shape_note(rows, exact)
    if not ours or not them:
        return _row(target, f">= {goal:g}", _why_missing(rows, ("r1fast cuda", "r1fast triton",
                                                                peer)), None, where)
    best = min(ours.values(), key=lambda r: r["ms"])
    ratio = them["ms"] / best["ms"]
    return _row(target, f">= {goal:g}", ratio, ratio >= goal, f"{where}; {best['provider']}",
                best["provider"])


def _routing(rows: list[dict]) -> list[dict]:
    route = _bench_rows(rows, "moe_route", "moe_route")
    configs = sorted(({(r.get("shape") or {}).get("config") for r in route} - {None})
                     | set(ROUTE_CONFIGS))
    out = []
    for c in configs:
        speed = _faster_than(*_at_shape([r for r in route if r["shape"].get("config") == c],
                                        ROUTE_SHAPE),
                             f"routing ({c}) megatron / r1fast", "megatron", 5.0)
        out += [speed, _routing_launches(rows, c, speed)]
    return out


def _routing_launches(rows: list[dict], config: str, speed: dict) -> dict:
    """The kernels one forward and one backward of the provider that ``speed`` found fastest
    put on the device, with their memsets shown beside (module doc)."""
    target, goal = f"routing ({config}) launches forward, backward", "1, 1"
    provider = speed["provider"]
    counts = {}
    for mode in ("forward", "backward"):
        picked, _ = _at_shape([r for r in _bench_rows(rows, "moe_route", "moe_route", mode)
                               if r.get("provider") == provider
                               and (r.get("shape") or {}).get("config") == config],
                              ROUTE_SHAPE)
        row = next((r for r in picked if "launches" in r), None)
        if row is None:
            why = next((r["launches_error"] for r in picked if "launches_error" in r),
                       "no CUDA profile" if picked else f"no {mode} row")
            return _row(target, goal, f"not measured ({provider or 'no r1fast row'}: {why})",
                        None, speed["where"])
        counts[mode] = (row["launches"], row.get("memsets", 0))
    value = ", ".join(f"{k}" + (f" (+{m} memset)" if m else "") for k, m in counts.values())
    return _row(target, goal, value, all(k == 1 for k, _ in counts.values()), speed["where"])


def _permutation(rows: list[dict]) -> list[dict]:
    out = []
    for op in ("moe_permute", "moe_unpermute"):
        perm, exact = _at_shape(_bench_rows(rows, "moe_permute", op), PERMUTE_SHAPE)
        ours = _timed(perm, ("r1fast cuda", "r1fast triton"))
        target = f"{op.removeprefix('moe_')} / copy bandwidth"
        if not ours or not any("frac_copy" in r for r in ours.values()):
            out.append(_row(target, ">= 0.70", _why_missing(perm, ("r1fast cuda",
                                                                   "r1fast triton")),
                            None, _shape_note(perm, exact)))
            continue
        best = max(ours.values(), key=lambda r: r.get("frac_copy", 0.0))
        out.append(_row(target, ">= 0.70", best["frac_copy"], best["frac_copy"] >= 0.7,
                        f"{_shape_note(perm, exact)}; {best['provider']}"))
    return out


def _step(rows: list[dict]) -> dict:
    """Tokens per second, not step times: the two runs sample their own completions, so their
    steps hold different numbers of tokens (bench_step.py says what "off" turns off)."""
    step = {r["provider"]: r for r in _bench_rows(rows, "step", "grpo_step")
            if "tokens_per_s" in r}
    on, off = step.get("r1fast kernels on"), step.get("r1fast kernels off")
    target = "GRPO step tokens/s, fused loss + grouped experts on / off"
    goal = ">= 1.3"
    if not on or not off:
        return _row(target, goal, "not measured (no step rows)", None, "")
    ratio = on["tokens_per_s"] / off["tokens_per_s"]
    where = " ".join([Path(on.get("recipe", "?")).name,
                      *(o.removeprefix("--") for o in on.get("overrides", []))])
    return _row(target, goal, ratio, ratio >= 1.3, where)


def _experts(rows: list[dict]) -> list[dict]:
    """The grouped expert kernels against the per-expert loop, and in training against
    megatron's own SequentialMLP (module doc: r1fast's default)."""
    out = []
    for case, (mode, shape) in EXPERTS_CASES.items():
        runs, exact = _at_shape(_bench_rows(rows, "moe_experts", "moe_grouped_swiglu", mode),
                                shape)
        where = _shape_note(runs, exact)
        others = ("per-expert loop",) + (("megatron SequentialMLP",) if case == "training"
                                         else ())
        for other in others:
            target = (f"grouped experts ({case}): "
                      f"{'loop' if other == 'per-expert loop' else 'megatron'} / grouped")
            timed = _timed(runs, ("r1fast triton", other))
            if len(timed) < 2:
                out.append(_row(target, ">= 1", _why_missing(runs, ("r1fast triton", other)),
                                None, where))
                continue
            ratio = timed[other]["ms"] / timed["r1fast triton"]["ms"]
            out.append(_row(target, ">= 1", ratio, ratio >= 1, f"{where}; r1fast triton",
                            "r1fast triton"))
    return out


def _shape_note(rows: list[dict], exact: bool) -> str:
    shape = (rows[0].get("shape") if rows else None) or {}
    text = ", ".join(f"{k}={v}" for k, v in shape.items())
    return text if exact else f"{text} (not the issue's shape)"


def target_rows(rows: list[dict]) -> list[dict]:
    """One row per target: ``target``, ``goal``, ``value`` (a ratio/number, or why not
    measured), ``met`` (True/False, None when not measured) and ``where`` (shape, provider)."""
    return [*_linear_logprob(rows), _fused_loss(rows), *_routing(rows), *_permutation(rows),
            _step(rows), *_experts(rows), _per_row_temperature(rows)]


def render_targets(rows: list[dict]) -> list[str]:
    """The markdown table of :func:`target_rows` (a list of lines)."""
    lines = ["| target | goal | measured | met | shape, provider |", "| --- | --- | --- | --- | --- |"]
    for t in target_rows(rows):
        value = f"{t['value']:.4g}" if isinstance(t["value"], float) else str(t["value"])
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        lines.append(f"| {t['target']} | {t['goal']} | {value} | {met} | {t['where']} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python scripts/gpu_check_targets.py RESULTS/results.jsonl", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in Path(args[0]).read_text().splitlines() if line.strip()]
    print("\n".join(render_targets(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
