"""Throughput of one GRPO step, split by phase, with r1fast's fused kernels on and off.

Phases: generation (rollout sampling), rewards (rule scoring; before time_rewards_s existed it
was counted in log-probs), log-probs (old + reference, trainer side), loss + forward/backward
(megatron schedule with the GRPO loss on the last stage), optimizer step.
"kernels on" computes the update's loss from hidden states with r1fast's fused op and the routed
experts as configured (``parallel.experts`` / ``rollout.experts``: grouped kernels on a GPU);
"kernels off" materialises the full logits of the update, uses the plain PyTorch loss and runs
megatron's per-expert loop in training and decoding (old/reference log-probs use the fused
log-prob op in both; routing and permutation are r1fast's in both). Tokens/s counts prompt + completion tokens of the
step. Results: bench/results/step_<device>.json.

    python bench/bench_step.py                 # tiny recipe on CPU
    python bench/bench_step.py --recipe recipes/tiny.toml --steps 4 --run.foo=...
    python bench/bench_step.py --mix           # the update on a realistic length mix:
                                               # padded vs packed, one run

``--mix`` times the trainer side of a step (old + reference log-probs, then the update) on a
fixed batch whose lengths look like real RL data: prompts of 20-200 tokens, completions
long-tailed (log-normal, median 60, capped at 512), padded rows versus packed micro-batches
under ``--token-budget`` (old/reference log-probs of packed rows run under the trainer's
larger no-grad budget, ``parallel.max_tokens_per_logprob_forward``, by default four times it);
it reports the padding fraction, the times (log-probs and update
apart), the speed-up, the peak memory of each and the loss / grad-norm differences to the padded
layout. Packed rows run twice: attending per sequence (``packed``, the default; attention costs
sum L_i^2) and under the explicit [T, T] block-diagonal mask (``packed-mask``, for comparison).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import environment, save_rows  # noqa: E402

PHASES = ("time_generation_s", "time_rewards_s", "time_logprobs_s", "time_fwd_bwd_s",
          "time_optimizer_s")


def run(recipe: str | None, steps: int, fused: bool, overrides: list[str]) -> dict:
    from r1fast.train.config import load_train_config
    from r1fast.train.grpo import GRPOTrainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_train_config(recipe, [*overrides, f"--run.out_dir={tmp}",
                                         f"--run.steps={steps + 1}", "--run.progress=false",
                                         "--run.tensorboard=false", "--run.resume=false",
                                         f"--algo.use_fused_kernels={'true' if fused else 'false'}",
                                         *([] if fused else ["--parallel.experts=sequential",
                                                             "--rollout.experts=sequential"])])
        trainer = GRPOTrainer(cfg)
        rows = [trainer.step() for _ in range(steps + 1)][1:]  # the first step warms up
        trainer.task.close()
    out = {k: statistics.median(r[k] for r in rows) for k in PHASES}
    step_s = sum(out.values())
    tokens = statistics.median(r["tokens_per_s"] * (r["time_generation_s"] + r["time_rewards_s"]
                                                     + r["time_logprobs_s"] + r["time_update_s"])
                               for r in rows)
    out.update(step_s=step_s, tokens=tokens, tokens_per_s=tokens / step_s,
               train_tokens_per_s=tokens / (out["time_logprobs_s"] + out["time_fwd_bwd_s"]
                                            + out["time_optimizer_s"]),
               rollout_tokens_per_s=tokens / out["time_generation_s"])
    return out


def length_mix(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Prompt and completion lengths of ``n`` rows, as in the module docstring."""
    import random

    rng = random.Random(seed)
    prompts = [rng.randint(20, 200) for _ in range(n)]
    comps = [min(512, max(1, int(rng.lognormvariate(4.1, 0.9)))) for _ in range(n)]
    return prompts, comps


def _mix_batch(rows: int):
    """The fixed update batch of the length mix (random tokens, one advantage per row)."""
    import torch

    from r1fast.train.batch import build_update_batch

    p_len, c_len = length_mix(rows)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 90, (n,), generator=g).tolist() for n in p_len]
    comps = [torch.randint(3, 90, (n,), generator=g).tolist() for n in c_len]
    return build_update_batch(prompts, comps, [[-1.0] * n for n in c_len],
                              torch.randn(rows, generator=g), torch.ones(rows, dtype=torch.bool),
                              pad_id=0)


LAYOUTS = {"padded": (False, None), "packed-mask": (True, "mask"), "packed": (True, "segments")}
"""layout -> (packed under the token budget, Policy.packed_attention)."""


def _mix_trainer(recipe: str, layout: str, budget: int, overrides: list[str], tmp: str):
    """A GRPO trainer of ``layout`` whose updates leave the weights put (lr 1e-12)."""
    from r1fast.train.config import load_train_config
    from r1fast.train.grpo import GRPOTrainer

    packed, attention = LAYOUTS[layout]
    cfg = load_train_config(recipe, [
        *overrides, f"--parallel.max_tokens_per_microbatch={budget if packed else 0}",
        f"--run.out_dir={tmp}", "--run.progress=false", "--run.tensorboard=false",
        "--model.aux_loss_coef=0.0", "--optim.lr=1e-12"])
    tr = GRPOTrainer(cfg)
    for pol in (tr.policy, tr.reference):
        if attention is not None and pol is not None:
            pol.packed_attention = attention
    return tr


def mix_peak_mib(recipe: str, layout: str, rows: int, budget: int, overrides: list[str]) -> float:
    """Peak RSS above the start of one log-probs + update of ``layout`` (after a warm-up), in
    THIS process: call it in a fresh one per layout (``--mix-peak``), since memory an earlier
    layout left in the heap would hide a later one's peak. glibc is told first to return freed
    large blocks to the OS, so the RSS follows what is live."""
    import torch

    from harness import peak_extra_bytes

    peak_extra_bytes(lambda: None, torch.device("cpu"))  # malloc tuning before any allocation
    batch = _mix_batch(rows)
    with tempfile.TemporaryDirectory() as tmp:
        tr = _mix_trainer(recipe, layout, budget, overrides, tmp)

        def once():
            old, ref = tr._old_and_ref_logprobs(batch, None)
            return tr._update(batch, old, ref)

        once()  # warm-up
        mem = peak_extra_bytes(once, torch.device("cpu"))
        tr.task.close()
    return mem / 2**20


def update_mix(recipe: str, rows: int, budget: int, reps: int, overrides: list[str]) -> list[dict]:
    """Old/ref log-probs + one update on the length mix, padded and packed (same batch): times
    here, one after the other; peak memory in a fresh process per layout."""
    import subprocess
    import time

    batch = _mix_batch(rows)
    real = int(batch.lengths.sum())
    out = []
    for layout in LAYOUTS:
        with tempfile.TemporaryDirectory() as tmp:
            tr = _mix_trainer(recipe, layout, budget, overrides, tmp)
            phases: list[tuple[float, float]] = []

            def once():
                t0 = time.perf_counter()
                old, ref = tr._old_and_ref_logprobs(batch, None)
                t1 = time.perf_counter()
                upd = tr._update(batch, old, ref)
                phases.append((t1 - t0, time.perf_counter() - t1))
                return upd

            once()  # warm-up
            phases.clear()
            upd = None
            for _ in range(reps):
                upd = once()
            packs = tr._packs(batch)
            computed = (len(packs) * packs[0].length if packs else batch.tokens.numel())
            tr.task.close()
        child = subprocess.run(
            [sys.executable, __file__, "--mix-peak", layout, "--recipe", recipe, "--rows",
             str(rows), "--token-budget", str(budget), *overrides],
            capture_output=True, text=True, check=True)
        mem = float(child.stdout.strip().splitlines()[-1])
        out.append({"op": "grpo_update_mix", "provider": layout, "rows": rows,
                    "real_tokens": real, "computed_tokens": computed,
                    "padding_frac": 1 - real / computed,
                    "s": statistics.median(a + b for a, b in phases),
                    "s_logprobs": statistics.median(a for a, _ in phases),
                    "s_update": statistics.median(b for _, b in phases),
                    "peak_extra_mib": mem, "loss": upd["loss"],
                    "grad_norm": upd["grad_norm"], "token_budget": budget})
    for r in out[1:]:
        r["speedup_vs_padded"] = out[0]["s"] / r["s"]
        r["loss_abs_diff"] = abs(out[0]["loss"] - r["loss"])
        r["grad_norm_rel_diff"] = abs(out[0]["grad_norm"] - r["grad_norm"]) / \
            max(out[0]["grad_norm"], 1e-12)
    return out


def main_mix(args, overrides) -> int:
    env = environment()
    rows = [{**r, **env} for r in update_mix(args.recipe, args.rows, args.token_budget,
                                               args.steps, overrides)]
    print(f"GRPO update on a realistic length mix ({args.rows} rows; prompts 20-200, "
          f"completions log-normal), {env['device']}")
    print("layout | computed tokens | padding | time s (log-probs + update) | peak extra MiB | "
          "loss | grad norm")
    for r in rows:
        print(f"{r['provider']:>11} | {r['computed_tokens']} | {r['padding_frac']:.2f} | "
              f"{r['s']:.3f} ({r['s_logprobs']:.3f} + {r['s_update']:.3f}) | "
              f"{r['peak_extra_mib']:.0f} | {r['loss']:.6f} | {r['grad_norm']:.6f}")
    for p in rows[1:]:
        print(f"{p['provider']} vs padded: {p['speedup_vs_padded']:.2f}x faster, |loss diff| "
              f"{p['loss_abs_diff']:.2e}, grad-norm rel diff {p['grad_norm_rel_diff']:.2e}")
    dev = "cpu" if env["device"].startswith("cpu") else "cuda"
    stem = Path(args.recipe).stem
    name = f"step_mix_{dev}" if stem == "tiny" else f"step_mix_{stem}_{dev}"  # one file a recipe
    print("saved", save_rows(rows, name))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(Path(__file__).resolve().parents[1] / "recipes/tiny.toml"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mix", action="store_true", help="padded vs packed update, length mix")
    ap.add_argument("--rows", type=int, default=32, help="rows of the --mix batch")
    ap.add_argument("--token-budget", type=int, default=2048, help="packed micro-batch budget")
    ap.add_argument("--mix-peak", choices=tuple(LAYOUTS), help=argparse.SUPPRESS)  # a child
    args, overrides = ap.parse_known_args()
    if args.mix_peak:  # print this layout's peak memory (MiB) on the last line
        print(mix_peak_mib(args.recipe, args.mix_peak, args.rows, args.token_budget, overrides))
        return 0
    if args.mix:
        return main_mix(args, overrides)
    env = environment()
    dev = "cpu" if env["device"].startswith("cpu") else "cuda"
    rows = []
    for fused in (True, False):
        r = run(args.recipe, args.steps, fused, overrides)
        rows.append({"op": "grpo_step", "provider": "r1fast kernels " + ("on" if fused else "off"),
                     "recipe": args.recipe, "overrides": overrides, **r, **env})
        save_rows(rows, f"step_{dev}")  # after each provider: a run cut short keeps it
    print(f"GRPO step phases (median of {args.steps} steps after one warm-up), {env['device']}")
    print("kernels | generation s | rewards s | log-probs s | loss+fwd/bwd s | optimizer s | "
          "step s | tokens/s | rollout tok/s | train tok/s")
    for r in rows:
        print(f"{r['provider'].split()[-1]:>7} | {r['time_generation_s']:.3f} | "
              f"{r['time_rewards_s']:.3f} | "
              f"{r['time_logprobs_s']:.3f} | {r['time_fwd_bwd_s']:.3f} | "
              f"{r['time_optimizer_s']:.3f} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
              f"{r['rollout_tokens_per_s']:.0f} | {r['train_tokens_per_s']:.0f}")
    print("saved", save_rows(rows, f"step_{dev}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
