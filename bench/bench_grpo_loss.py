"""Benchmark the GRPO policy loss and the fused hidden-states -> loss op.

Two parts, each provider in forward / backward / full (forward + backward) mode:

1. ``grpo_loss``: per-token log-probs in, scalar loss out (ppo + dual clip + k3 KL + TIS,
   token-mean), padded ``[T/1024, 1024]``. Providers: the torch reference, r1fast's Triton
   kernels, and Liger's ``triton_grpo_loss`` when ``liger_kernel`` is importable. Liger's op
   takes LOGITS ``[B, L+1, V]`` (it computes the log-softmax itself), so its row includes a full
   pass over ``T x V`` logits (``--liger-vocab``, default 32768) and its inputs alone are
   ``T*V`` bf16; the comparison says what a logits-based loss costs, not the same work.
   Bytes moved (ours): forward reads logp/old/ref/rollout (fp32) + mask (1 B) and writes the
   saved gradient (fp32): 21 B/token; backward reads it and writes the gradient: 8 B/token.
2. ``fused_linear_policy_loss``: hidden ``[T, H]`` and LM head ``[V, H]`` in, loss out, versus
   "log-probs + separate loss" done the plain way (full logits, ``log_softmax``, gather, then
   the torch loss); on Liger's objective (PPO clip + k3 KL, token-mean) versus Liger's
   ``LigerFusedLinearGRPOLoss``; and ``linear_logprob`` alone on the same inputs, so the loss's
   overhead over it is a ratio from one run. ``grad-in-forward`` rows: the gradients computed
   in the forward (``grad_in_forward=True``, 6THV FLOPs). Every full-mode row carries its
   gradients' error against fp64 (``max_grad_rel_err``). FLOPs: forward 2THV, full 8THV (the
   backward recomputes the logits); grad-in-forward rows 6THV forward and full (their TFLOP/s
   is their own hardware rate; compare arrangements by ``ms``).

CUDA: T in {16384, 262144} for part 1 and T=16384, H=4096, V=151936 bf16 for part 2.
CPU (default when no GPU): small shapes so the whole run takes well under a minute; the Triton
rows appear on a CPU only with ``TRITON_INTERPRET=1`` (and are then interpreter timings).

Usage: ``python bench/bench_grpo_loss.py [--tokens 16384 262144] [--skip-fused]``. Rows are
saved with ``save_rows(rows, "grpo_loss_<device>")``.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Provider, print_table, reference_grads, run_case, save_rows  # noqa: E402

from r1fast.ops._dispatch import triton_missing  # noqa: E402
from r1fast.ops.fused_linear_policy_loss import fused_linear_policy_loss  # noqa: E402
from r1fast.ops.linear_logprob import linear_logprob  # noqa: E402
from r1fast.ops.policy_loss import PolicyLossConfig, policy_loss  # noqa: E402

CONFIG = PolicyLossConfig(loss="ppo", clip_high=0.28, dual_clip=3.0, kl="k3", kl_coef=0.04,
                          tis_cap=2.0)
SEQ_LEN = 1024


def _liger_missing() -> str | None:
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel is not installed"
    if not torch.cuda.is_available():
        return "Liger's Triton kernels need CUDA"
    return None


def loss_inputs(tokens: int, device: torch.device) -> dict:
    b, length = max(1, tokens // SEQ_LEN), min(tokens, SEQ_LEN)
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(b, length, generator=g) * 5
    old = logp + torch.randn(b, length, generator=g) * 0.2
    out = dict(logp=logp, old=old, ref=logp + torch.randn(b, length, generator=g) * 0.2,
               roll=old + torch.randn(b, length, generator=g) * 0.1,
               adv=torch.randn(b, generator=g), mask=torch.rand(b, length, generator=g) > 0.1)
    out = {k: v.to(device) for k, v in out.items()}
    out["logp"].requires_grad_()
    return out


def _ours(impl: str):
    def fn(logp, old, ref, roll, adv, mask):
        return policy_loss(logp, old, adv, mask, CONFIG, ref_logp=ref, rollout_logp=roll,
                           impl=impl)[0]
    return fn


def bench_loss(tokens: int, device: torch.device, liger_vocab: int) -> list[dict]:
    inputs = loss_inputs(tokens, device)
    with torch.no_grad():
        ref64, _ = policy_loss(*(inputs[k].double() for k in ("logp", "old", "adv")),
                               inputs["mask"], CONFIG, ref_logp=inputs["ref"].double(),
                               rollout_logp=inputs["roll"].double(), impl="torch")
    shape = {"T": tokens, "B": inputs["adv"].numel()}
    providers = [
        Provider("torch", _ours("torch")),
        Provider("r1fast-triton", _ours("triton"), lambda: triton_missing(device)),
    ]
    rows = run_case("grpo_loss", shape, inputs, providers, reference=ref64,
                    bytes_moved={"forward": 21 * tokens, "backward": 8 * tokens,
                                 "full": 29 * tokens})
    why = _liger_missing()
    if why is not None:
        rows.append({"op": "grpo_loss", "provider": "liger-triton-grpo (logits)", "shape": shape,
                     "skipped": why})
        return rows
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    b, length = inputs["logp"].shape
    logits = torch.randn(b, length + 1, liger_vocab, device=device, dtype=torch.bfloat16,
                         requires_grad=True)
    ids = torch.randint(0, liger_vocab, (b, length), device=device)

    def liger(logits, ids, old, ref, adv, mask):
        return triton_grpo_loss(logits, old, ref, ids, adv, mask.float(), temperature=1.0,
                                beta=CONFIG.kl_coef, eps_low=CONFIG.clip_low,
                                eps_high=CONFIG.clip_high, inplace=False)[0]

    lig_inputs = dict(logits=logits, ids=ids, old=inputs["old"], ref=inputs["ref"],
                      adv=inputs["adv"], mask=inputs["mask"])
    rows += run_case("grpo_loss", {**shape, "V": liger_vocab},
                     lig_inputs, [Provider("liger-triton-grpo (logits)", liger, peer=True)])
    return rows


# Liger's fused linear GRPO loss computes PPO clipping with a k3 KL, token-mean ("bnpo"); this
# config is the same objective, so its r1fast and Liger rows compare like for like.
LIGER_CONFIG = PolicyLossConfig(loss="ppo", clip_low=0.2, clip_high=0.28, kl="k3",
                                kl_coef=0.04, agg="token-mean")


def _fused(config: PolicyLossConfig, impl: str, grad_in_forward: bool = False):
    def fn(hidden, weight, targets, old, ref, roll, adv, mask, cu):
        return fused_linear_policy_loss(
            hidden, weight, targets, old, adv, mask, ref, config, cu_seqlens=cu,
            rollout_logp=roll if config.tis_cap is not None else None, impl=impl,
            grad_in_forward=grad_in_forward)[0]
    return fn


def _separate(impl: str):
    def fn(hidden, weight, targets, old, ref, roll, adv, mask, cu):
        logits = (hidden @ weight.T).float()  # [T, V] materialised
        logp = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
        return policy_loss(logp, old, adv, mask, CONFIG, ref_logp=ref, rollout_logp=roll,
                           cu_seqlens=cu, impl=impl)[0]
    return fn


def _logprob_alone(impl: str):
    def fn(hidden, weight, targets, old, ref, roll, adv, mask, cu):
        return linear_logprob(hidden, weight, targets, impl=impl)
    return fn


def _liger_fused(hidden, weight, targets, old, ref, roll, adv, mask, cu):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    b = adv.numel()
    loss_fn = LigerFusedLinearGRPOLoss(
        beta=LIGER_CONFIG.kl_coef, epsilon_low=LIGER_CONFIG.clip_low,
        epsilon_high=LIGER_CONFIG.clip_high, loss_type="bnpo", use_ref_model=True)
    out = loss_fn(hidden.view(b, -1, hidden.shape[-1]), weight, targets.view(b, -1),
                  mask.view(b, -1).to(hidden.dtype), adv, ref_per_token_logps=ref.view(b, -1),
                  old_per_token_logps=old.view(b, -1))
    return out[0] if isinstance(out, tuple) else out  # (loss, metrics) in recent versions


def bench_fused(tokens: int, hidden: int, vocab: int, dtype: torch.dtype,
                device: torch.device) -> Iterator[list[dict]]:
    """Three groups, each against its own fp64 loss and gradients, yielded one at a time:
    linear_logprob alone (the yardstick of the fused loss's overhead, same run); the full
    config (fused vs logits + torch loss); Liger's objective (fused vs Liger's fused linear
    GRPO)."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(tokens, hidden, generator=g)).to(device=device, dtype=dtype)
    w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(device=device, dtype=dtype)
    y = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    old = (-torch.rand(tokens, generator=g) * 5).to(device)
    per_seq = min(tokens, SEQ_LEN)
    cu = torch.arange(0, tokens + 1, per_seq, device=device)
    inputs = dict(hidden=x.requires_grad_(), weight=w.requires_grad_(), targets=y, old=old,
                  ref=old + 0.1, roll=old - 0.05,
                  adv=torch.randn(cu.numel() - 1, generator=g).to(device),
                  mask=torch.ones(tokens, dtype=torch.bool, device=device), cu=cu)
    impl = "triton" if device.type == "cuda" else "torch"
    thv = tokens * hidden * vocab
    shape = {"T": tokens, "H": hidden, "V": vocab, "dtype": str(dtype).replace("torch.", "")}
    flops = {"forward": 2 * thv, "backward": 6 * thv, "full": 8 * thv}
    # the fused loss's 3% target is a ratio of two groups' times: enough repeats that their
    # spread is well under 3% (each call is ~0.1-0.3 s at the shape on a GPU)
    reps = 10 if device.type == "cuda" else 2
    def in_forward(config):  # 6THV, all in the forward; its backward scales stored gradients
        return Provider(f"r1fast-fused grad-in-forward ({impl})", _fused(config, impl, True),
                        lambda: None if impl == "triton" else "needs impl='triton' (CUDA)",
                        flops={"forward": 6 * thv, "full": 6 * thv})

    groups = [
        ("linear_logprob (the fused loss's yardstick)", _logprob_alone("torch"),
         [Provider(f"r1fast linear_logprob ({impl})", _logprob_alone(impl))]),
        ("fused_linear_policy_loss", _fused(CONFIG, "torch"),
         [Provider(f"r1fast-fused ({impl})", _fused(CONFIG, impl)), in_forward(CONFIG),
          # the logits kept for the backward: 4THV there, no recompute
          Provider("logits+log_softmax+loss (torch)", _separate(impl),
                   flops={"forward": 2 * thv, "backward": 4 * thv, "full": 6 * thv})]),
        ("fused_linear_policy_loss (liger's objective)", _fused(LIGER_CONFIG, "torch"),
         [Provider(f"r1fast-fused ({impl})", _fused(LIGER_CONFIG, impl)),
          in_forward(LIGER_CONFIG),
          # Liger's gradients are made in its forward (6THV there, nothing after)
          Provider("liger fused-linear grpo (bnpo)", _liger_fused, _liger_missing, peer=True,
                   flops={"forward": 6 * thv, "full": 6 * thv})]),
    ]
    # every fp64 reference before any timing: seconds of fp64 GEMMs between the yardstick's
    # rows and the fused loss's would time them at other clocks
    wanted = [reference_grads(reference_fn, inputs) for _, reference_fn, _ in groups]
    for (op, _, providers), grads in zip(groups, wanted):
        yield run_case(op, shape, inputs, providers, flops=flops, reps=reps, warmup=2,
                       grad_reference=grads,
                       count_launches=False)  # GEMM-bound: a launch count says nothing


def main(argv=None) -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+",
                        default=[16384, 262144] if cuda else [4096, 16384])
    parser.add_argument("--fused-shape", type=int, nargs=3, metavar=("T", "H", "V"),
                        default=[16384, 4096, 151936] if cuda else [512, 128, 4096])
    parser.add_argument("--liger-vocab", type=int, default=32768)
    parser.add_argument("--skip-fused", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    rows: list[dict] = []
    path = None
    # the fused op first (its targets), then the loss alone; saved as each part finishes, so a
    # run stopped at its time limit keeps what it measured
    parts = [] if args.skip_fused else [bench_fused(
        *args.fused_shape, torch.bfloat16 if cuda else torch.float32, device)]

    def loss_part(tokens: int) -> Iterator[list[dict]]:
        yield bench_loss(tokens, device, args.liger_vocab)

    parts += [loss_part(t) for t in args.tokens]
    for part in parts:
        for group in part:
            rows += group
            path = save_rows(rows, f"grpo_loss_{device.type}")
    print_table(rows)
    print(f"saved {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
