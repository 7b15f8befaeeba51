"""Rollout throughput on a realistic length mix: the decoder before issue #15 against the ragged
KV-cache loop, in one run, on the same policy, prompts and seeds.

The mix (as bench_step.py's ``--mix``): prompts of 20-200 tokens (uniform), completions
long-tailed (log-normal, median 60, capped at ``--max-new``). A random policy does not stop
where real data does, so each row's length is imposed: a wrapper around the decoder bans the
eos token before the row's target length and forces it there (a few device ops per step, the
same in every provider; the samples otherwise come from the policy). Providers:

``before #15``   the sampler as it was (shared positions: the batch prefills the shortest
                 prompt, then advances one position per step for every row, feeding longer
                 prompts token by token; finished rows stay in the batch; a Python loop over
                 rows draws each row's uniform; fp32 logits come back to the host each step)
                 on the KV-cache decoder as it was (megatron's static inference context,
                 keys re-roped and expanded every step): bench/rollout_before.py, verbatim.
``ragged``       ``generate`` now: left-padded prefill once at each prompt's length, device-side
                 sampling, finished rows dropped every ``--check-every`` steps, one copy back.
``ragged + R3``  the same, recording every token's experts (uint8 tables) for router replay.
``ragged, grouped experts``  ``ragged`` with the routed experts as two grouped Triton launches
                 per MoE layer and the counts kept on the device (``rollout.experts =
                 "grouped"``; where Triton runs: a GPU, or the interpreter in dry mode). The
                 other ragged providers run megatron's per-expert loop ("sequential").

Reported per provider: generated tokens/s (and prompt + completion tokens/s), the padding
fraction (token slots the model ran that were not a prompt or fed completion token), the time
(median of ``--reps`` runs, providers interleaved; on a GPU the wall clock, on a CPU the CPU
time of this process at ``--threads`` 1, because the CPU machines are shared and their wall
clock mostly measures the neighbours -- both are in the rows), the peak extra memory (CUDA
``max_memory_allocated``, CPU peak RSS) and whether the completions equal the old decoder's.
Results: bench/results/rollout_mix_<device>.json.

    python bench/bench_rollout.py                      # CPU, the tiny MoE widened (see --help)
    python bench/bench_rollout.py --rows 8 --max-new 16 --prompt-range 4 12   # dry-mode sizes
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import environment, peak_extra_bytes, save_rows  # noqa: E402
from rollout_before import KVCacheDecoder as KVCacheDecoderBefore  # noqa: E402
from rollout_before import generate_before  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ForcedLengths:
    """Wraps a decoder (either protocol): row i's completion is exactly ``targets[i]`` tokens,
    the last one eos. Counts the token slots the model runs (``computed``)."""

    def __init__(self, inner, prompt_lens, targets, eos: int):
        self.inner, self.eos = inner, eos
        self.device = inner.policy.device
        self.ragged = getattr(inner, "ragged", False)
        self.plens = torch.tensor(prompt_lens, device=self.device)
        self.last = torch.tensor(targets, device=self.device) - 1  # index of the eos token
        self.computed = 0
        self.rows = torch.arange(len(prompt_lens), device=self.device)
        self.j = 0

    def _force(self, logits: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """logits [B', V] predicting token j [B'|1] of each row."""
        top = logits.max(-1).values + 50.0
        eos_logit = torch.where(j == self.last[self.rows], top, torch.full_like(top, -1e30))
        logits[:, self.eos] = eos_logit
        return logits

    # ragged protocol
    def prefill(self, tokens, pads, max_len, dest=None):
        self.rows, self.j = torch.arange(tokens.shape[0], device=self.device), 0
        self.computed += tokens.numel()
        return self._force(self.inner.prefill(tokens, pads, max_len, dest), torch.tensor(0))

    def decode(self, tokens, dest=None):
        self.j += 1
        self.computed += tokens.shape[0]
        return self._force(self.inner.decode(tokens, dest), torch.tensor(self.j))

    def keep(self, rows):
        self.rows = self.rows[rows]
        self.inner.keep(rows)

    def share(self, tokens, logp):
        return self.inner.share(tokens, logp)

    def session(self):
        return self.inner.session()

    def start_recording(self, total):
        self.inner.start_recording(total)

    def finish_recording(self):
        return self.inner.finish_recording()

    @property
    def policy(self):
        return self.inner.policy

    # shared-position protocol
    def reset(self, batch_size, max_len):
        self.rows = torch.arange(batch_size, device=self.device)
        self.inner.reset(batch_size, max_len)

    def step(self, tokens, offset):
        self.computed += tokens.numel()
        logits = self.inner.step(tokens, offset)  # [B, n, V] on tokens.device
        j = (offset + tokens.shape[1] - self.plens).to(logits.device)  # next token's index
        self.last, self.rows = self.last.to(logits.device), self.rows.to(logits.device)
        logits[:, -1] = self._force(logits[:, -1], j)
        return logits




def length_mix(rows: int, prompt_range: tuple[int, int], max_new: int, seed: int = 0):
    """Prompt lengths uniform in ``prompt_range``, completion lengths log-normal (median 60)
    capped at ``max_new``."""
    import random

    rng = random.Random(seed)
    prompts = [rng.randint(*prompt_range) for _ in range(rows)]
    comps = [min(max_new, max(1, int(rng.lognormvariate(4.1, 0.9)))) for _ in range(rows)]
    return prompts, comps


def build(args):
    from r1fast.policy.config import ModelConfig, ParallelConfig
    from r1fast.policy.model import build_policy

    heads = max(4, args.hidden // 64)
    cfg = dataclasses.replace(
        ModelConfig.preset("tiny-moe"), hidden_size=args.hidden, num_layers=args.layers,
        num_attention_heads=heads, num_query_groups=heads // 2, head_dim=args.hidden // heads,
        vocab_size=args.vocab, ffn_hidden_size=2 * args.hidden,
        moe_ffn_hidden_size=args.hidden // 2, num_experts=args.experts,
        max_position_embeddings=args.prompt_range[1] + args.max_new,
        params_dtype=args.dtype).validate()
    return build_policy(cfg, ParallelConfig(), seed=0, trainable=False)


def timed(fn, dec, prompts, seeds, dev, peak: bool) -> dict:
    """One rollout: wall time, result, token slots run, and (``peak``) the peak extra memory."""
    box: dict = {}

    def once():
        sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        box["result"] = fn(dec, prompts, seeds)
        sync(dev)
        box["wall_s"], box["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        # a GPU run is timed by the wall clock; a CPU run by the CPU time this process used
        # (one thread): on a shared CPU machine the wall clock mostly measures the neighbours
        box["s"] = box["wall_s"] if dev.type == "cuda" else box["cpu_s"]

    box["peak"] = peak_extra_bytes(once, dev) if peak else once()
    box["computed"] = dec.computed
    return box


def run(args) -> list[dict]:
    from r1fast.ops._dispatch import triton_missing
    from r1fast.rollout.kv_cache import KVCacheDecoder
    from r1fast.rollout.sampler import SamplingConfig, generate

    policy = build(args)
    dev = policy.device
    p_len, c_len = length_mix(args.rows, tuple(args.prompt_range), args.max_new)
    g = torch.Generator().manual_seed(1)
    eos = 1
    prompts = [torch.randint(2, args.vocab, (n,), generator=g).tolist() for n in p_len]
    seeds = list(range(args.rows))
    cfg = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new)
    useful = sum(p_len) + sum(c_len) - args.rows  # token slots a perfect engine would run
    providers = {
        "before #15 (shared positions)":
            lambda d, p, s: generate_before(d, p, cfg, eos, s),
        "ragged KV cache":
            lambda d, p, s: generate(d, p, cfg, eos, row_seeds=s, check_every=args.check_every),
        "ragged KV cache + R3 capture":
            lambda d, p, s: generate(d, p, cfg, eos, row_seeds=s, check_every=args.check_every,
                                     record_routing=True),
    }
    no_triton = triton_missing(dev)
    if no_triton is None:  # GPU, or the interpreter (dry mode)
        providers["ragged KV cache, grouped experts"] = providers["ragged KV cache"]
    else:
        print(f"ragged KV cache, grouped experts: skipped ({no_triton})")
    decoders = {name: KVCacheDecoderBefore(policy) if name.startswith("before")
                else KVCacheDecoder(policy, experts="grouped" if "grouped" in name
                                    else "sequential") for name in providers}
    for name, fn in providers.items():  # warm-up on two short rows (first launches, allocator)
        fn(ForcedLengths(decoders[name], p_len[:2], [min(c, 4) for c in c_len[:2]], eos),
           prompts[:2], seeds[:2])
    runs = {name: [] for name in providers}
    for rep in range(args.reps):  # providers interleaved: a busy machine slows all alike
        for name, fn in providers.items():
            runs[name].append(timed(fn, ForcedLengths(decoders[name], p_len, c_len, eos),
                                    prompts, seeds, dev, peak=rep == args.reps - 1))
    out, reference = [], None
    for name, reps in runs.items():
        result, computed, peak = reps[-1]["result"], reps[-1]["computed"], reps[-1]["peak"]
        got = [len(c) for c in result.completion_ids]
        if got != c_len:
            raise RuntimeError(f"{name}: completion lengths {got[:8]}... differ from the "
                               f"targets {c_len[:8]}...")
        reference = reference or result
        s = statistics.median(r["s"] for r in reps)
        out.append({"op": "rollout_mix", "provider": name, "rows": args.rows,
                    "prompt_tokens": sum(p_len), "completion_tokens": sum(c_len),
                    "max_completion": max(c_len), "computed_tokens": computed,
                    "padding_frac": 1 - useful / computed, "s": s,
                    "timer": "wall" if dev.type == "cuda" else "process cpu time, 1 thread",
                    "s_all": [r["s"] for r in reps],
                    "wall_s_all": [r["wall_s"] for r in reps],
                    "tokens_per_s": sum(c_len) / s, "total_tokens_per_s": (sum(p_len)
                                                                           + sum(c_len)) / s,
                    "peak_extra_mib": None if peak is None else peak / 2**20,
                    "same_completions_as_before": result.completion_ids
                    == reference.completion_ids,
                    "check_every": args.check_every, "reps": args.reps,
                    "model": {"hidden": args.hidden, "layers": args.layers,
                              "heads": max(4, args.hidden // 64), "vocab": args.vocab,
                              "experts": args.experts, "topk": 2,
                              "dtype": str(policy.config.params_dtype)}})
    for r in out[1:]:
        r["speedup_vs_before"] = out[0]["s"] / r["s"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32, help="completions sampled together")
    ap.add_argument("--prompt-range", type=int, nargs=2, default=[20, 200])
    ap.add_argument("--max-new", type=int, default=512, help="completion length cap")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--check-every", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3, help="runs per provider (median)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    env = environment()
    rows = [{**r, **env} for r in run(args)]
    print(f"Rollout on a length mix ({args.rows} rows; prompts {args.prompt_range[0]}-"
          f"{args.prompt_range[1]}, completions log-normal median 60, max "
          f"{rows[0]['max_completion']}), {env['device']}")
    print(f"provider | gen tok/s | all tok/s | padding | time s ({rows[0]['timer']}) | "
          f"peak extra MiB | speed-up | same samples")
    for r in rows:
        peak = "n/a" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
        print(f"{r['provider']} | {r['tokens_per_s']:.0f} | {r['total_tokens_per_s']:.0f} | "
              f"{r['padding_frac']:.2f} | {r['s']:.2f} | {peak} | "
              f"{r.get('speedup_vs_before', 1.0):.2f}x | {r['same_completions_as_before']}")
    dev = "cpu" if env["device"].startswith("cpu") else "cuda"
    print("saved", save_rows(rows, f"rollout_mix_{dev}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
