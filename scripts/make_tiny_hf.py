#!/usr/bin/env python
"""Make a tiny Hugging Face world offline: a byte-level BPE tokenizer with a ChatML chat
template and a random Qwen3-MoE checkpoint (OUT/model), GSM8K-format JSONL (OUT/gsm8k_train.jsonl,
OUT/gsm8k_test.jsonl) and MATH-format parquet (OUT/math_train.parquet). recipes/hf_tiny.toml
trains on them:

    python scripts/make_tiny_hf.py runs/hf_tiny && r1fast train recipes/hf_tiny.toml
"""
import argparse

from r1fast.data.tiny_hf import build_tiny_hf

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="runs/hf_tiny")
    ap.add_argument("--num-train", type=int, default=400)
    ap.add_argument("--num-test", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for name, path in build_tiny_hf(args.out, num_train=args.num_train, num_test=args.num_test,
                                    seed=args.seed).items():
        print(f"{name:12s} {path}")
