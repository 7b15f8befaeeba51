"""``r1fast policy --preset tiny-moe`` (or ``python -m r1fast.policy``): build a tiny policy
on this machine (CPU or one GPU), print its parameter count and the log-probability of a
random sequence; with ``--hf PATH`` load a Hugging Face checkpoint instead of a preset.

Single process by default; under ``torchrun --nproc-per-node N`` pass ``--tp/--pp/--ep``.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, Sequence

from r1fast.cli import ArgumentParser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from r1fast.policy.config import PRESETS

    ap = ArgumentParser(prog="r1fast policy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny-moe", choices=sorted(PRESETS))
    ap.add_argument("--hf", default=None, help="load this HF checkpoint directory instead")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--length", type=int, default=16,
                    help="tokens of the random sequence (at least 2: the first token predicts "
                         "the second; at most the model's max_position_embeddings)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.length < 2:  # length - 1 predicted tokens: none at 1, so the mean would be NaN
        ap.error(f"--length must be >= 2 (the log-prob is of the tokens after the first), "
                 f"got {args.length}")

    import torch

    from r1fast.policy.config import ModelConfig, ParallelConfig
    from r1fast.policy.model import build_policy
    from r1fast.policy.parallel import destroy_parallel

    t0 = time.perf_counter()
    if args.hf:
        from r1fast.policy.hf_checkpoint import load_hf_checkpoint, load_model_config

        cfg = load_model_config(args.hf)
    else:
        cfg = ModelConfig.preset(args.preset)
    if args.length > cfg.max_position_embeddings:  # known before building: no traceback later
        ap.error(f"--length must be <= max_position_embeddings {cfg.max_position_embeddings} of "
                 f"{args.hf or args.preset}, got {args.length}")
    policy = build_policy(cfg, ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep),
                          seed=args.seed, trainable=False)
    if args.hf:
        load_hf_checkpoint(policy, args.hf)
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, cfg.vocab_size, (1, args.length), generator=g)
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = -100
    logp = policy.logprobs(tokens, targets)
    n_params = policy.num_parameters()
    if policy.info.rank == 0:
        kind = f"MoE {cfg.num_experts} experts top-{cfg.moe_router_topk}" if cfg.is_moe \
            else "dense"
        print(f"policy: {args.hf or args.preset} ({kind}), layers={cfg.num_layers}, "
              f"hidden={cfg.hidden_size}, vocab={cfg.vocab_size}, layout tp={args.tp} "
              f"pp={args.pp} ep={args.ep} dp={policy.info.dp}")
        print(f"parameters: {n_params:,}")
        print(f"log-prob of a random {args.length}-token sequence: "
              f"{float(logp[:, :-1].sum()):.4f} (mean per token "
              f"{float(logp[:, :-1].mean()):.4f}; uniform would be "
              f"{-torch.log(torch.tensor(float(cfg.vocab_size))).item():.4f})")
        print(f"built and evaluated in {time.perf_counter() - t0:.1f} s")
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
