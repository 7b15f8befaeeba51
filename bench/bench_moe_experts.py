"""Benchmark of the routed experts of one MoE layer: ``moe_grouped_swiglu`` (grouped Triton
launches, the row counts read on the device) against the per-expert loop (megatron's sequential
experts' arithmetic, ``impl="torch"``: the counts read on the host, then ~7 launches per expert
forward and more backward).

Decoding (``--rows``, forward only): a step has few rows per expert, so the work is reading
every expert's weights once: the yardstick is ``copy_`` of the bytes moved (all weights, the
rows in and out, the activation h written and read back), ``frac_copy = copy_ms / ms``.

Training (``--train-rows``, forward + backward, mode ``full``): a micro-batch's routed rows,
``18 n H F`` FLOPs (the forward's three ``n x H x F`` GEMMs, the backward's six), reported as
TFLOP/s, with the error of every gradient against fp64. The weights are one stacked leaf per
projection viewed per expert, so both providers pay autograd's stacking of the per-expert
weight gradients.

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
from bench_moe_route import add_copy_fraction, fast_missing  # noqa: E402
from harness import Provider, print_table, run_case, save_rows  # noqa: E402

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
    moved = {"forward": (3 * E * H * F + 2 * n * H + 2 * n * F) * elt}
    providers = [Provider("r1fast triton", run("triton"),
                          fast_missing("triton", device, "moe_grouped_swiglu")),
                 Provider("per-expert loop", run("torch"))]
    shape = {"rows": n, "E": E, "H": H, "F": F, "dtype": str(dtype).split(".")[-1]}
    rows = run_case("moe_grouped_swiglu", shape, {"x": x}, providers, modes=["forward"],
                    reference=reference, bytes_moved=moved, reps=reps)
    add_copy_fraction(rows, moved, device, reps)
    return rows


def bench_training_case(n: int, E: int, H: int, F: int, dtype, device,
                        reps: int) -> list[dict]:
    """Forward + backward of ``n`` routed rows (module doc), the gradients of the rows, the
    routing weights and both projections checked against fp64."""
    from harness import reference_grads

    g = torch.Generator().manual_seed(1)
    counts = torch.multinomial(torch.ones(E), n, replacement=True, generator=g).bincount(
        minlength=E).to(device)
    inputs = {
        "x": torch.randn(n, H, generator=g).to(dtype).to(device).requires_grad_(),
        "probs": torch.rand(n, generator=g).to(device).requires_grad_(),
        "fc1": (torch.randn(E, 2 * F, H, generator=g) / H ** 0.5).to(dtype).to(device)
        .requires_grad_(),
        "fc2": (torch.randn(E, H, F, generator=g) / F ** 0.5).to(dtype).to(device)
        .requires_grad_()}
    tables: dict[tuple, ExpertTable] = {}

    def run(impl):
        def fn(x, probs, fc1, fc2):
            views1, views2 = list(fc1.unbind(0)), list(fc2.unbind(0))  # [2F, H], [H, F] each
            key = (fc1.data_ptr(), fc2.data_ptr())
            if key not in tables:  # once per stack: the address table stays valid
                tables[key] = ExpertTable(views1, views2)
            table = tables[key]
            table.fc1, table.fc2 = views1, views2  # this call's autograd views, same addresses
            # the loop reads the device counts on the host each call, as megatron's does
            return moe_grouped_swiglu(x, counts, table, probs, impl=impl)
        return fn

    with torch.no_grad():
        fp64 = {k: v.detach().double() for k, v in inputs.items()}
        reference = run("torch")(**fp64)
    grads = reference_grads(run("torch"), inputs)
    providers = [Provider("r1fast triton", run("triton"),
                          fast_missing("triton", device, "moe_grouped_swiglu")),
                 Provider("per-expert loop", run("torch"))]
    shape = {"rows": n, "E": E, "H": H, "F": F, "dtype": str(dtype).split(".")[-1],
             "case": "training"}
    return run_case("moe_grouped_swiglu", shape, inputs, providers, modes=["full"],
                    reference=reference, grad_reference=grads,
                    flops={"full": 18.0 * n * H * F}, reps=reps)


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
    for n in args.train_rows if args.train_rows is not None else ([16384] if cuda else [48]):
        print(f"\n== moe_grouped_swiglu training rows={n} E={E} H={H} F={F} {dtype} on "
              f"{device.type}")
        rows = bench_training_case(n, E, H, F, dtype, device, reps)
        print_table(rows)
        all_rows += rows
    if not args.no_save:
        print(f"\nsaved {save_rows(all_rows, 'moe_experts_' + device.type)}")


if __name__ == "__main__":
    main()
