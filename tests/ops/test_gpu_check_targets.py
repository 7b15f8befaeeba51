"""scripts/gpu_check_targets.py: issue #18's target ratios from one run's bench rows (the table
the README carries), on made-up rows whose answers are known."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from gpu_check_targets import main, render_targets, target_rows  # noqa: E402

LP = {"T": 16384, "H": 4096, "V": 151936, "dtype": "bfloat16"}


def bench(bench_name, op, provider, shape, **fields):
    return {"kind": "bench", "bench": bench_name, "op": op, "provider": provider, "mode": "full",
            "shape": shape, **fields}


def experts_rows(grouped_train_ms=2.0):
    """The grouped experts' rows: a decoding step at two row counts, a training micro-batch."""
    size = {"E": 128, "H": 2048, "F": 768, "dtype": "bfloat16"}
    out = []
    for rows, mode, case, grouped, loop in ((256, "forward", {}, 0.1, 0.9),
                                            (2048, "forward", {}, 0.3, 1.2),
                                            (16384, "full", {"case": "training"},
                                             grouped_train_ms, 3.0)):
        shape = {"rows": rows, **size, **case}
        out += [{**bench("moe_experts", "moe_grouped_swiglu", p, shape, ms=ms), "mode": mode}
                for p, ms in (("r1fast triton", grouped), ("per-expert loop", loop))]
        if case:
            out.append({**bench("moe_experts", "moe_grouped_swiglu", "megatron SequentialMLP",
                                shape, ms=4.0), "mode": mode})
    return out


def run_rows(liger_ms=60.0, step_on=1.0, route_bwd_memsets=0, route_fwd_kernels=1,
             grouped_train_ms=2.0, grad_err=6e-3):
    tiny = {"T": 32, "H": 32, "V": 256, "dtype": "float32"}
    route = [bench("moe_route", "moe_route", p, {"T": 16384, "E": 256, "k": 8, "config": c},
                   ms=ms)
             for c in ("softmax", "dsv3")
             for p, ms in (("r1fast cuda", 0.1), ("r1fast triton", 0.2), ("megatron", 0.6))]
    route_shape = {"T": 16384, "E": 256, "k": 8, "config": "softmax"}
    route += [{**bench("moe_route", "moe_route", p, route_shape, ms=0.05), "mode": mode,
               "launches": n, "memsets": m}
              for p, mode, n, m in (("r1fast cuda", "forward", route_fwd_kernels, 0),
                                    ("r1fast cuda", "backward", 1, route_bwd_memsets),
                                    ("r1fast triton", "forward", 3, 0))]
    route.append({**bench("moe_route", "moe_route", "r1fast cuda",
                          {**route_shape, "config": "dsv3"}, ms=0.05), "mode": "forward",
                  "launches_error": "RuntimeError: CUPTI_ERROR_NOT_INITIALIZED"})
    perm = {"T": 16384, "H": 4096, "k": 8, "E": 256, "dtype": "bfloat16"}
    return [
        {"kind": "env", "device": "NVIDIA H100"},
        bench("linear_logprob", "linear_logprob", "r1fast triton", tiny, ms=1.0),  # other shape
        bench("linear_logprob", "linear_logprob", "bare GEMM (roofline)", LP, ms=30.0),
        bench("linear_logprob", "linear_logprob", "r1fast triton", LP, ms=50.0,
              peak_extra_mib=900.0, max_abs_err=2e-5),
        bench("linear_logprob", "linear_logprob", "r1fast triton (gemm tiles)", LP, ms=48.0,
              peak_extra_mib=1315.0 + 640.0, max_abs_err=3e-5,  # dW + dX: 1315 MiB
              max_grad_rel_err={"hidden": 4e-3, "weight": grad_err, "targets": None}),
        bench("linear_logprob", "linear_logprob", "liger flce (sum)", LP, ms=liger_ms),
        bench("linear_logprob", "linear_logprob", "r1fast triton (per-row tau)", LP, ms=51.0),
        bench("grpo_loss", "linear_logprob (the fused loss's yardstick)",
              "r1fast linear_logprob (triton)", LP, ms=50.0),
        bench("grpo_loss", "fused_linear_policy_loss", "r1fast-fused (triton)", LP, ms=51.0),
        bench("grpo_loss", "fused_linear_policy_loss", "r1fast-fused grad-in-forward (triton)",
              LP, ms=40.0),
        *route,
        bench("moe_permute", "moe_permute", "r1fast cuda", perm, ms=0.1, frac_copy=0.8),
        {"kind": "bench", "bench": "moe_permute", "op": "moe_unpermute",
         "provider": "r1fast cuda", "shape": perm, "skipped": "the extension did not build"},
        {"kind": "bench", "bench": "step", "op": "grpo_step", "provider": "r1fast kernels on",
         "step_s": step_on, "tokens_per_s": 1000.0 / step_on, "recipe": "recipes/tiny.toml",
         "overrides": ["--model.hidden_size=1024", "--model.params_dtype=bfloat16"]},
        {"kind": "bench", "bench": "step", "op": "grpo_step", "provider": "r1fast kernels off",
         "step_s": 1.2, "tokens_per_s": 1000.0 / 1.5},  # fewer tokens in its step
        *experts_rows(grouped_train_ms),
    ]


def test_each_ratio_is_taken_from_the_rows_of_its_target():
    got = {t["target"]: t for t in target_rows(run_rows())}
    floor = got["linear_logprob fwd+bwd / 8THV floor"]
    # the faster arrangement over the bare GEMMs' 6THV time scaled to 8THV
    assert floor["value"] == pytest.approx(48.0 / (30.0 * 8 / 6)) and floor["met"] is True
    assert "r1fast triton (gemm tiles)" in floor["where"] and "T=16384" in floor["where"]
    assert got["Liger FLCE / linear_logprob"]["value"] == pytest.approx(60.0 / 48.0)
    # the gradients the op must return (dW [V, H], dX [T, H] in bf16) are not its overhead
    assert got["linear_logprob extra memory beyond dW, dX (MiB)"]["value"] == 640.0
    assert got["linear_logprob logp error vs fp64"]["met"] is True
    grads = got["linear_logprob dX, dW error vs fp64 (relative to the largest)"]
    assert grads["value"] == 6e-3 and grads["met"] is True  # the larger of dX's and dW's
    fused = got["fused policy loss / linear_logprob alone"]
    # the fused path itself: grad-in-forward (faster here) is another algorithm, not this one
    assert fused["value"] == pytest.approx(51.0 / 50.0) and "grad-in-forward" not in fused["where"]
    for config in ("softmax", "dsv3"):
        route = got[f"routing ({config}) megatron / r1fast"]
        assert route["value"] == pytest.approx(6.0) and route["met"] is True
        assert "r1fast cuda" in route["where"]
    # launches of the fastest provider (cuda), not of the slower triton rows
    assert got["routing (softmax) launches forward, backward"]["value"] == "1, 1"
    assert got["routing (softmax) launches forward, backward"]["met"] is True
    dsv3 = got["routing (dsv3) launches forward, backward"]
    assert dsv3["met"] is None and "CUPTI_ERROR_NOT_INITIALIZED" in dsv3["value"]
    assert got["permute / copy bandwidth"]["value"] == 0.8
    unpermute = got["unpermute / copy bandwidth"]
    assert unpermute["met"] is None and "the extension did not build" in unpermute["value"]
    step = got["GRPO step tokens/s, fused loss + grouped experts on / off"]
    assert step["value"] == pytest.approx(1.5)  # tokens per second, not step times
    assert step["where"] == \
        "tiny.toml model.hidden_size=1024 model.params_dtype=bfloat16"
    # the decoding step of 256 rows (not 2048), the training micro-batch
    assert got["grouped experts (decoding): loop / grouped"]["value"] == pytest.approx(9.0)
    training = got["grouped experts (training): loop / grouped"]
    assert training["value"] == pytest.approx(1.5) and training["met"] is True
    assert "rows=16384" in training["where"]
    megatron = got["grouped experts (training): megatron / grouped"]
    assert megatron["value"] == pytest.approx(2.0) and megatron["met"] is True
    # per-row temperatures against the same fused arrangement, not the faster gemm tiles
    tau = got["per-row temperature / one temperature"]
    assert tau["value"] == pytest.approx(51.0 / 50.0) and tau["met"] is True


def test_misses_are_shown_as_misses():
    got = {t["target"]: t for t in target_rows(run_rows(liger_ms=40.0, step_on=1.4))}
    assert got["Liger FLCE / linear_logprob"]["met"] is False
    assert got["GRPO step tokens/s, fused loss + grouped experts on / off"]["met"] is False
    rough = {t["target"]: t for t in target_rows(run_rows(grad_err=2e-2))}
    assert rough["linear_logprob dX, dW error vs fp64 (relative to the largest)"]["met"] is False
    slow = {t["target"]: t for t in target_rows(run_rows(grouped_train_ms=4.0))}
    assert slow["grouped experts (training): loop / grouped"]["met"] is False
    zeroed = {t["target"]: t for t in target_rows(run_rows(route_bwd_memsets=1))}
    launches = zeroed["routing (softmax) launches forward, backward"]
    assert (launches["value"], launches["met"]) == ("1, 1 (+1 memset)", True)  # shown
    two = {t["target"]: t for t in target_rows(run_rows(route_fwd_kernels=2))}
    launches = two["routing (softmax) launches forward, backward"]
    assert (launches["value"], launches["met"]) == ("2, 1", False)
    unrouted = {t["target"]: t for t in target_rows([r for r in run_rows()
                                                     if r.get("bench") != "moe_route"])}
    for config in ("softmax", "dsv3"):  # a stage that wrote nothing still has its rows
        speed = unrouted[f"routing ({config}) megatron / r1fast"]
        assert speed["met"] is None and speed["value"].startswith("not measured")
    table = "\n".join(render_targets(run_rows(liger_ms=40.0)))
    assert "| Liger FLCE / linear_logprob | > 1 | 0.8333 | **no** |" in table


def test_a_run_without_the_issue_shapes_says_so(tmp_path, capsys):
    tiny = {"T": 32, "H": 32, "V": 256, "dtype": "float32"}
    rows = [bench("linear_logprob", "linear_logprob", "r1fast triton", tiny, ms=1.0,
                  peak_extra_mib=0.0, max_abs_err=1e-6)]
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "T=32, H=32, V=256, dtype=float32 (not the issue's shape)" in out
    assert ("| GRPO step tokens/s, fused loss + grouped experts on / off | >= 1.3 | not measured "
            "(no step rows) | - |") in out
    assert "| linear_logprob dX, dW error vs fp64 (relative to the largest) | <= 1e-2 | " \
        "not measured (no gradient check in the row) |" in out
    assert "| grouped experts (training): loop / grouped | >= 1 | not measured (no rows) |" in out
