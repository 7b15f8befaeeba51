"""Benchmark of MoE token permutation: ``moe_permute`` (token rows -> expert-contiguous rows)
and ``moe_unpermute`` (weighted combine back), forward and backward: time, GB/s, fraction of
the device's copy bandwidth measured in the same run, peak extra memory, max error of the
output and (full mode) of the gradients against fp64.

Both are bandwidth bound (ANCHORS §3C: T=16384, H=4096, k=8 moves 1.21 GB -> 0.40 ms on an
H100), so the yardstick is ``copy_`` of the same bytes (``frac_copy = copy_ms / ms``).
Bytes counted: permute forward reads x [T, H] and writes T*k rows, backward the reverse;
unpermute forward reads T*k rows and writes [T, H], backward reads dout and the T*k rows
(for the weight gradient) and writes the T*k row gradients.

Providers (same tokens, same routing):
- ``r1fast cuda`` / ``r1fast triton``: our kernels (CUDA only; the interpreter is too slow);
- ``reference``: ``impl="torch"`` (index gathers);
- ``megatron``: megatron-core's ``permute`` / ``unpermute`` (unfused, routing-map based),
  given its dense routing map and probs built from the same routing outside the timing
  (the probs scatter of the weights is inside, so its weight gradient is timed too).
Our timings include building the row map (a stable argsort of T*k ids) and the host-side
index checks (one sync each), as a caller pays them.

Examples:
    python bench/bench_moe_permute.py          # CPU: small quick shapes; CUDA: T=16384 sweep
    python bench/bench_moe_permute.py --T 16384 --H 7168 --k 8 --ops unpermute
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from bench_moe_route import add_copy_fraction, fast_missing, megatron_missing  # noqa: E402
from harness import (MODES, Provider, print_table, reference_grads, run_case,  # noqa: E402
                     save_rows)

from r1fast.ops.moe_permute import _unpermute_reference, moe_permute, moe_unpermute  # noqa: E402
from r1fast.ops.moe_route import moe_route, routing_to_dense  # noqa: E402

OPS = ("permute", "unpermute")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", help="token counts")
    p.add_argument("--H", type=int, nargs="+", help="hidden sizes")
    p.add_argument("--k", type=int, nargs="+", help="experts per token")
    p.add_argument("--E", type=int, default=256, help="experts")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="rows dtype (fp32 CPU, bf16 CUDA)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--reps", type=int, help="timed repeats per mode")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    return p.parse_args(argv)


def megatron_permute(x, routing_map, num_out):
    from megatron.core.transformer.moe.moe_utils import permute

    return permute(x, routing_map, num_out_tokens=num_out)


def megatron_unpermute(y, weights, indices, routing_map, sorted_indices):
    from megatron.core.transformer.moe.moe_utils import unpermute

    T, E = routing_map.shape
    probs = weights.new_zeros((T, E)).scatter(1, indices, weights)  # its dense format
    return unpermute(y, sorted_indices, torch.Size((T, y.shape[1])), probs=probs,
                     routing_map=routing_map)


def bench_case(op, T, H, k, E, dtype, device, modes, reps) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    routing = moe_route(torch.randn(T, E, generator=g).to(device), k, score="sigmoid",
                        impl="torch")
    idx, w = routing.indices, routing.weights  # [T, k]
    _, rmap = routing_to_dense(w, idx, E)
    elt = torch.finfo(dtype).bits // 8
    shape = {"T": T, "H": H, "k": k, "E": E, "dtype": str(dtype).split(".")[-1]}
    rows_bytes = T * k * H * elt
    tok_bytes = T * H * elt
    if op == "permute":
        x = torch.randn(T, H, generator=g).to(dtype).to(device).requires_grad_()
        inputs = {"x": x}

        def ours(impl):
            return lambda x: moe_permute(x, idx, E, impl=impl)

        def mega(x):
            return megatron_permute(x, rmap, T * k)
        with torch.no_grad():
            reference = moe_permute(x.detach(), idx, E, impl="torch").permuted

        def exact(x):
            return moe_permute(x, idx, E, impl="torch").permuted
        bytes_moved = {"forward": tok_bytes + rows_bytes, "backward": rows_bytes + tok_bytes}
    else:
        _, row_map, _ = moe_permute(torch.empty(T, 1, device=device), idx, E, impl="torch")
        y = torch.randn(T * k, H, generator=g).to(dtype).to(device).requires_grad_()
        wl = w.detach().clone().requires_grad_()
        inputs = {"y": y, "weights": wl}

        def ours(impl):
            return lambda y, weights: moe_unpermute(y, row_map, weights, impl=impl)

        # Megatron's token of each permuted row (expert-major), as its permute returns it
        sorted_idx = torch.arange(T, device=device).expand(E, T).masked_select(rmap.T)

        def mega(y, weights):
            return megatron_unpermute(y, weights, idx, rmap, sorted_idx)
        with torch.no_grad():
            reference = _unpermute_reference(y.detach().double(), row_map, w.double())

        def exact(y, weights):
            return _unpermute_reference(y, row_map, weights)
        bytes_moved = {"forward": rows_bytes + tok_bytes,
                       "backward": tok_bytes + 2 * rows_bytes}
    bytes_moved["full"] = bytes_moved["forward"] + bytes_moved["backward"]
    providers = [
        Provider("r1fast cuda", ours("cuda"), fast_missing("cuda", device, f"moe_{op}")),
        Provider("r1fast triton", ours("triton"), fast_missing("triton", device, f"moe_{op}")),
        Provider("reference", ours("torch")),
        Provider("megatron", mega, megatron_missing, peer=True),
    ]
    # every provider's rows are in the same order and its gradients against the same
    # upstream, so each is checked against the fp64 gradients (megatron's too)
    grads = reference_grads(exact, inputs) if "full" in modes else None
    rows = run_case(f"moe_{op}", shape, inputs, providers, modes=modes, reference=reference,
                    grad_reference=grads, bytes_moved=bytes_moved, reps=reps)
    add_copy_fraction(rows, {m: bytes_moved[m] for m in modes}, device, reps)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    Ts = args.T or ([16384] if cuda else [512])
    Hs = args.H or ([4096, 7168] if cuda else [256])
    ks = args.k or ([2, 6, 8] if cuda else [2, 8])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or
                                                             ("bf16" if cuda else "fp32")]
    reps = args.reps or (20 if cuda else 3)
    all_rows = []
    for H in Hs:  # the first H (the target's 4096) for both ops before the next one
        for op in args.ops:
            for T in Ts:
                for k in ks:
                    print(f"\n== moe_{op} T={T} H={H} k={k} E={args.E} {dtype} on {device.type}")
                    rows = bench_case(op, T, H, k, args.E, dtype, device, args.modes, reps)
                    print_table(rows, extra=["copy_ms", "frac_copy"])
                    all_rows += rows
                    if not args.no_save:  # after each case: a run cut short keeps it
                        print(f"saved {save_rows(all_rows, 'moe_permute_' + device.type)}")


if __name__ == "__main__":
    main()
