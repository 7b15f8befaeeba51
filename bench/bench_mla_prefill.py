"""Benchmark of MLA's prefill over a latent cache: the absorbed form against the expanded one
(r1fast/rollout/mla_latent.py), at DeepSeek-V3's per-head sizes (kv_lora 512, nope 128, rope
64, dv 128) and a rank's share of its heads.

A prefill has as many queries as cached tokens, so absorbing ``W_uk``/``W_uv`` costs more
multiply-adds per (query, key) pair than expanding each token's keys and values once:

    absorbed  P kv_lora (nope + dv) + P^2 (2 kv_lora + rope)    per head
    expanded  P kv_lora (nope + dv) + P^2 (nope + rope + dv)

(V3: 2.7x fewer at P = 1024.) The decoder picks the form per forward (``expands``); this
measures both on the same inputs: time, peak extra memory, max error against an fp64
attention with explicit per-head keys and values. Forward only (decoding takes no gradient).
``--queries 1`` times a decode step instead (op ``mla_decode``: one query per row over ``P``
cached tokens, where the absorbed form is the cheaper one and the one the decoder runs).

Examples:
    python bench/bench_mla_prefill.py                # CPU: B=1, 16 heads, P=256 and 1024
    python bench/bench_mla_prefill.py --P 4096 --heads 16 --B 4
    python bench/bench_mla_prefill.py --queries 0 1  # the prefill (0: P queries) and a decode
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from harness import Provider, print_table, run_case, save_rows  # noqa: E402

from r1fast.rollout.mla_latent import attend_absorbed, attend_expanded  # noqa: E402

KV_LORA, NOPE, ROPE, DV = 512, 128, 64, 128  # DeepSeek-V3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, nargs="+", help="sequences")
    p.add_argument("--P", type=int, nargs="+", help="prompt lengths")
    p.add_argument("--heads", type=int, default=16, help="heads on this rank (V3: 128 / tp)")
    p.add_argument("--queries", type=int, nargs="+", default=[0],
                   help="queries per row at the end of the P tokens (0: P, a prefill)")
    p.add_argument("--reps", type=int, help="timed repeats")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    return p.parse_args(argv)


def make_inputs(B: int, h: int, P: int, Q: int, device) -> dict:
    """``Q`` queries per row, the last ``Q`` of ``P`` cached tokens."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    # True = hidden: query i sits at slot P - Q + i
    causal = torch.ones(P, P, dtype=torch.bool).triu(1)[P - Q:][None, None].to(device)
    return {"q_nope": randn(B, h, Q, NOPE), "q_rope": randn(B, h, Q, ROPE),
            "keys": randn(B, P, KV_LORA + ROPE), "mask": causal,
            "w_uk": randn(h, NOPE, KV_LORA, scale=KV_LORA ** -0.5),
            "w_uv": randn(h, DV, KV_LORA, scale=KV_LORA ** -0.5),
            "scale": (NOPE + ROPE) ** -0.5}


def fp64_reference(q_nope, q_rope, keys, mask, w_uk, w_uv, scale) -> torch.Tensor:
    """Per-head keys and values, scores, softmax and the weighted sum, all in fp64, written
    out: [P, B, h, dv]."""
    q_nope, q_rope, keys, w_uk, w_uv = (t.double() for t in (q_nope, q_rope, keys, w_uk, w_uv))
    c, k_rope = keys[..., :KV_LORA], keys[..., KV_LORA:]  # [B, P, kv_lora], [B, P, rope]
    k_nope = torch.einsum("btc,hdc->bhtd", c, w_uk)
    v = torch.einsum("btc,hdc->bhtd", c, w_uv)
    scores = (q_nope @ k_nope.transpose(-1, -2) + q_rope @ k_rope[:, None].transpose(-1, -2))
    probs = torch.softmax((scores * scale).masked_fill(mask, float("-inf")), dim=-1)
    return (probs @ v).permute(2, 0, 1, 3)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    Bs, Ps = args.B or ([4] if cuda else [1]), args.P or ([1024, 4096] if cuda else [256, 1024])
    reps = args.reps or (10 if cuda else 5)
    providers = [Provider("absorbed", attend_absorbed), Provider("expanded", attend_expanded)]
    rows: list[dict] = []
    for B, P, queries in ((B, P, q) for B in Bs for P in Ps for q in args.queries):
        Q = queries or P
        op = "mla_prefill" if Q == P else "mla_decode"
        shape = {"B": B, "heads": args.heads, "P": P, "queries": Q, "kv_lora": KV_LORA,
                 "nope": NOPE, "rope": ROPE, "dv": DV, "dtype": "float32"}
        print(f"\n== {op} B={B} heads={args.heads} P={P} queries={Q} fp32 on {device.type}")
        inputs = make_inputs(B, args.heads, P, Q, device)
        # absorbing W_uk / W_uv costs per query, expanding per cached token; then each pair
        macs = {form: B * args.heads * (tokens * KV_LORA * (NOPE + DV) + Q * P * per_pair)
                for form, tokens, per_pair in (("absorbed", Q, 2 * KV_LORA + ROPE),
                                               ("expanded", P, NOPE + ROPE + DV))}
        case = run_case(op, shape, inputs, providers, modes=["forward"],
                        reference=fp64_reference(**inputs), warmup=1, reps=reps)
        for r in case:
            if "ms" in r:
                r["gmacs"] = macs[r["provider"]] / 1e9
        print_table(case, extra=["gmacs"])
        rows += case
        if not args.no_save:  # after each case: a run cut short keeps it
            print(f"saved {save_rows(rows, 'mla_prefill_' + device.type, with_autotune=False)}")
    return rows


if __name__ == "__main__":
    main()
