"""Throughput of one GRPO step, split by phase, with r1fast's fused kernels on and off.

Phases: generation (rollout sampling), log-probs (old + reference, trainer side), loss +
forward/backward (megatron schedule with the GRPO loss on the last stage), optimizer step.
"kernels on" computes the update's loss from hidden states with r1fast's fused op; "kernels off"
materialises the full logits of the update and uses the plain PyTorch loss (old/reference
log-probs use the fused log-prob op in both). Tokens/s counts prompt + completion tokens of the
step. Results: bench/results/step_<device>.json.

    python bench/bench_step.py                 # tiny recipe on CPU
    python bench/bench_step.py --recipe recipes/tiny.toml --steps 4 --run.foo=...
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import environment, save_rows  # noqa: E402

PHASES = ("time_generation_s", "time_logprobs_s", "time_fwd_bwd_s", "time_optimizer_s")


def run(recipe: str | None, steps: int, fused: bool, overrides: list[str]) -> dict:
    from r1fast.train.config import load_train_config
    from r1fast.train.grpo import GRPOTrainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_train_config(recipe, [*overrides, f"--run.out_dir={tmp}",
                                         f"--run.steps={steps + 1}", "--run.progress=false",
                                         "--run.tensorboard=false", "--run.resume=false",
                                         f"--algo.use_fused_kernels={'true' if fused else 'false'}"])
        trainer = GRPOTrainer(cfg)
        rows = [trainer.step() for _ in range(steps + 1)][1:]  # the first step warms up
        trainer.task.close()
    out = {k: statistics.median(r[k] for r in rows) for k in PHASES}
    step_s = sum(out.values())
    tokens = statistics.median(r["tokens_per_s"] * (r["time_generation_s"] + r["time_logprobs_s"]
                                                     + r["time_update_s"]) for r in rows)
    out.update(step_s=step_s, tokens=tokens, tokens_per_s=tokens / step_s,
               train_tokens_per_s=tokens / (out["time_logprobs_s"] + out["time_fwd_bwd_s"]
                                            + out["time_optimizer_s"]),
               rollout_tokens_per_s=tokens / out["time_generation_s"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(Path(__file__).resolve().parents[1] / "recipes/tiny.toml"))
    ap.add_argument("--steps", type=int, default=3)
    args, overrides = ap.parse_known_args()
    env = environment()
    rows = []
    for fused in (True, False):
        r = run(args.recipe, args.steps, fused, overrides)
        rows.append({"op": "grpo_step", "provider": "r1fast kernels " + ("on" if fused else "off"),
                     "recipe": args.recipe, **r, **env})
    print(f"GRPO step phases (median of {args.steps} steps after one warm-up), {env['device']}")
    print("kernels | generation s | log-probs s | loss+fwd/bwd s | optimizer s | step s | "
          "tokens/s | rollout tok/s | train tok/s")
    for r in rows:
        print(f"{r['provider'].split()[-1]:>7} | {r['time_generation_s']:.3f} | "
              f"{r['time_logprobs_s']:.3f} | {r['time_fwd_bwd_s']:.3f} | "
              f"{r['time_optimizer_s']:.3f} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
              f"{r['rollout_tokens_per_s']:.0f} | {r['train_tokens_per_s']:.0f}")
    dev = "cpu" if env["device"].startswith("cpu") else "cuda"
    print("saved", save_rows(rows, f"step_{dev}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
