"""Benchmark of the routed experts of one MoE layer: ``moe_grouped_swiglu`` (grouped Triton
launches, the row counts read on the device) against the per-expert loop (megatron's sequential
experts' arithmetic, ``impl="torch"``: the counts read on the host, then ~7 launches per expert
forward and more backward).

Decoding (``--rows``, forward only): a step has few rows per expert, so the work is reading
every chosen expert's weights once: the yardstick is ``copy_`` of the bytes moved (the weights
of the experts with rows, the rows in and out, the activation h written and read back),
``frac_copy = copy_ms / ms``.

Training (``--train-rows``, forward + backward, mode ``full``): a micro-batch's routed rows
through one MoE layer's experts module as the trainer builds it (megatron's SequentialMLP with
r1fast's lean forward), ``18 n H F`` FLOPs (the forward's three ``n x H x F`` GEMMs, the
backward's six) as TFLOP/s: the grouped kernels, r1fast's per-expert loop, and megatron's own
SequentialMLP forward (the peer, with its per-linear bookkeeping); the gradients of the rows
and routing weights against fp64 (every provider also makes the weight gradients).

Reported also: peak extra memory and the max error against the fp64 loop.

Examples:
    python bench/bench_moe_experts.py        # CPU: the loop only (the interpreter is no timing)
    python bench/bench_moe_experts.py --rows 256 2048 --train-rows 16384 --E 128 --H 2048 \
        --F 768                              # Qwen3-30B-A3B
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from bench_moe_route import add_copy_fraction, fast_missing, megatron_missing  # noqa: E402
from harness import Provider, environment, print_table, run_case, save_rows  # noqa: E402

from r1fast.ops.moe_experts import ExpertTable, moe_grouped_swiglu  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", help="routed rows of a decoding step "
                   "(tokens x top-k), forward only")
    p.add_argument("--train-rows", type=int, nargs="*", help="routed rows of a training "
                   "micro-batch, forward + backward")
    p.add_argument("--E", type=int, help="experts")
    p.add_argument("--H", type=int, help="hidden size")
    p.add_argument("--F", type=int, help="expert FFN size")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="fp32 CPU, bf16 CUDA by default")
    p.add_argument("--reps", type=int, help="timed repeats")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    return p.parse_args(argv)


def bench_case(n: int, E: int, H: int, F: int, dtype, device, reps: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    counts = torch.multinomial(torch.ones(E), n, replacement=True, generator=g).bincount(
        minlength=E).to(device)  # [E] rows per expert, uniform routing
    x = torch.randn(n, H, generator=g).to(dtype).to(device)
    fc1 = [(torch.randn(2 * F, H, generator=g) / H ** 0.5).to(dtype).to(device)
           for _ in range(E)]
    fc2 = [(torch.randn(H, F, generator=g) / F ** 0.5).to(dtype).to(device) for _ in range(E)]
    probs = torch.rand(n, generator=g).to(device)
    table = ExpertTable(fc1, fc2)
    with torch.no_grad():
        reference = moe_grouped_swiglu(x.double(), counts.cpu(), ExpertTable(
            [w.double() for w in fc1], [w.double() for w in fc2]), probs.double(), impl="torch")

    def run(impl):
        def fn(x):
            with torch.no_grad():
                return moe_grouped_swiglu(x, counts, table, probs, impl=impl)
        return fn

    elt = torch.finfo(dtype).bits // 8
    used = int((counts > 0).sum())  # an expert no row chose is never read (~17 of 128 here)
    moved = {"forward": (3 * used * H * F + 2 * n * H + 2 * n * F) * elt}
    providers = [Provider("r1fast triton", run("triton"),
                          fast_missing("triton", device, "moe_grouped_swiglu")),
                 Provider("per-expert loop", run("torch"))]
    shape = {"rows": n, "E": E, "H": H, "F": F, "dtype": str(dtype).split(".")[-1]}
    rows = run_case("moe_grouped_swiglu", shape, {"x": x}, providers, modes=["forward"],
                    reference=reference, bytes_moved=moved, reps=reps)
    add_copy_fraction(rows, moved, device, reps)
    return rows


def experts_module(E: int, H: int, F: int, dtype):
    """The routed experts of one MoE layer as the trainer builds them: megatron's SequentialMLP
    with r1fast's lean forward (``LeanSequentialMLP``), its weights trainable."""
    from r1fast.policy.config import ModelConfig, ParallelConfig
    from r1fast.policy.local_experts import LeanSequentialMLP
    from r1fast.policy.model import build_policy

    heads = max(1, H // 128)
    model = ModelConfig.preset("tiny-moe").replace(
        hidden_size=H, num_layers=1, num_attention_heads=heads, num_query_groups=heads,
        head_dim=H // heads, num_experts=E, moe_ffn_hidden_size=F, moe_router_topk=min(8, E),
        params_dtype={torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype])
    policy = build_policy(model, ParallelConfig(experts="sequential"), seed=0, trainable=False)
    experts = next(m for m in policy.gpt.modules() if isinstance(m, LeanSequentialMLP))
    for p in experts.parameters():
        p.requires_grad_(True)
    return experts


def bench_training_case(n: int, E: int, H: int, F: int, dtype, device,
                        reps: int) -> list[dict]:
    """Forward + backward of ``n`` routed rows through one MoE layer's experts module (module
    doc): r1fast's grouped kernels, r1fast's per-expert loop, megatron's own SequentialMLP
    forward; the gradients of the rows and routing weights checked against fp64 (the weight
    gradients are computed by all three, not compared)."""
    shape = {"rows": n, "E": E, "H": H, "F": F, "dtype": str(dtype).split(".")[-1],
             "case": "training"}
    why = megatron_missing()  # the decoding case runs without it
    if why is not None:
        return [{"op": "moe_grouped_swiglu", "provider": p, "shape": shape, "skipped": why,
                 **environment()}
                for p in ("r1fast triton", "per-expert loop", "megatron SequentialMLP")]
    from megatron.core.transformer.moe.experts import SequentialMLP

    from harness import reference_grads
    from r1fast.policy.local_experts import LeanSequentialMLP
    from r1fast.policy.parallel import destroy_parallel

    experts = experts_module(E, H, F, dtype)
    try:
        g = torch.Generator().manual_seed(1)
        counts = torch.multinomial(torch.ones(E), n, replacement=True, generator=g).bincount(
            minlength=E).to(device)
        inputs = {"x": torch.randn(n, H, generator=g).to(dtype).to(device).requires_grad_(),
                  "probs": torch.rand(n, generator=g).to(device).requires_grad_()}
        fc1 = [e.linear_fc1.weight for e in experts.local_experts]
        fc2 = [e.linear_fc2.weight for e in experts.local_experts]
        table64 = ExpertTable([w.detach().double() for w in fc1],
                              [w.detach().double() for w in fc2])
        offset = experts.config.glu_linear_offset

        def fp64(x, probs):
            return moe_grouped_swiglu(x, counts, table64, probs, glu_offset=offset,
                                      impl="torch")

        def run(forward, grouped):
            def fn(x, probs):
                experts.grouped_impl = "triton" if grouped else None
                for w in fc1 + fc2:  # each call makes its weight gradients afresh
                    w.grad = None
                return forward(experts, x, counts, probs)[0]
            return fn

        with torch.no_grad():
            reference = fp64(**{k: v.detach().double() for k, v in inputs.items()})
        grads = reference_grads(fp64, inputs)
        providers = [
            Provider("r1fast triton", run(LeanSequentialMLP.forward, True),
                     fast_missing("triton", device, "moe_grouped_swiglu")),
            Provider("per-expert loop", run(LeanSequentialMLP.forward, False)),
            Provider("megatron SequentialMLP", run(SequentialMLP.forward, False), peer=True)]
        return run_case("moe_grouped_swiglu", shape, inputs, providers, modes=["full"],
                        reference=reference, grad_reference=grads,
                        flops={"full": 18.0 * n * H * F}, reps=reps)
    finally:
        experts.grouped_impl = None
        destroy_parallel()


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or
                                                             ("bf16" if cuda else "fp32")]
    E, H, F = args.E or (128 if cuda else 16), args.H or (2048 if cuda else 256), \
        args.F or (768 if cuda else 128)
    reps = args.reps or (20 if cuda else 3)
    all_rows = []
    for n in args.rows or ([256, 2048] if cuda else [64]):
        print(f"\n== moe_grouped_swiglu rows={n} E={E} H={H} F={F} {dtype} on {device.type}")
        rows = bench_case(n, E, H, F, dtype, device, reps)
        print_table(rows, extra=["copy_ms", "frac_copy"])
        all_rows += rows
        if not args.no_save:  # after each case: a run cut short keeps it
            print(f"saved {save_rows(all_rows, 'moe_experts_' + device.type)}")
    for n in args.train_rows if args.train_rows is not None else ([16384] if cuda else [48]):
        print(f"\n== moe_grouped_swiglu training rows={n} E={E} H={H} F={F} {dtype} on "
              f"{device.type}")
        rows = bench_training_case(n, E, H, F, dtype, device, reps)
        print_table(rows)
        all_rows += rows
        if not args.no_save:
            print(f"saved {save_rows(all_rows, 'moe_experts_' + device.type)}")


if __name__ == "__main__":
    main()
