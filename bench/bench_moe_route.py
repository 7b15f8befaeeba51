"""Benchmark of MoE routing (top-k with score function, groups, bias, weights, counts): time,
GB/s, fraction of the device's copy bandwidth measured in the same run, peak extra memory,
max |weight error| against an fp64 reference and (r1fast's providers, full mode) the
relative error of d(logits) against fp64.

Routing is memory/launch bound (ANCHORS §3C: T=16384, E=256, k=8 moves ~18 MB forward), so the
yardstick is ``dst.copy_(src)`` of the same number of bytes (a copy reads and writes, so a
buffer of half the op's bytes is copied): ``frac_copy = copy_ms / ms``.

Bytes counted (the op's minimum traffic, the same for every provider): forward reads the
logits (+ bias) and writes weights fp32, indices int64 and counts; backward reads the weight
gradient, logits and indices and writes dlogits.

Providers (same config, same logits):
- ``r1fast cuda``: csrc/moe_route.cu (warp per token), CUDA only;
- ``r1fast triton``: kernels/moe_route.py, CUDA only (the CPU interpreter is far too slow);
- ``reference``: ``impl="torch"`` (fp32 torch ops: sort-based top-k, gather, softmax);
- ``megatron``: megatron-core's ``topk_routing_with_score_function`` (unfused), which returns
  dense probs/routing map [T, E]; its error is measured after gathering its probs;
- ``megatron torch.compile``: the same function through ``torch.compile`` (CUDA only).

Configs: ``softmax`` = softmax after top-k (Qwen3/Mixtral), ``dsv3`` = sigmoid with expert bias,
8 groups (topk_groups = min(4, k)), normalised, scaling 2.5 (DeepSeek-V3). Megatron takes the
bias with sigmoid only, which ``dsv3`` is.

Examples:
    python bench/bench_moe_route.py            # CPU: small quick shapes; CUDA: T=16384 sweep
    python bench/bench_moe_route.py --T 16384 --E 256 --k 8 --configs dsv3 --modes forward
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from harness import (  # noqa: E402
    MODES,
    Provider,
    compiled_at_first_call,
    interpreter_timed,
    print_table,
    reference_grads,
    run_case,
    save_rows,
    time_ms,
)

from r1fast.ops._dispatch import cuda_missing, triton_missing  # noqa: E402
from r1fast.ops.moe_route import moe_route, routing_to_dense  # noqa: E402

CONFIGS = ("softmax", "dsv3")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", help="token counts")
    p.add_argument("--E", type=int, nargs="+", help="expert counts")
    p.add_argument("--k", type=int, nargs="+", help="experts per token")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="logits dtype")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--reps", type=int, help="timed repeats per mode")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- shared helpers

def copy_floor_ms(nbytes: float, device: torch.device, reps: int) -> float:
    """Time to move ``nbytes`` (read + write) with ``copy_``: a buffer of nbytes/2 copied."""
    n = max(int(nbytes // 2), 16)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src), device, warmup=3, reps=reps)


def fast_missing(impl: str, device: torch.device, op: str):
    """Provider.missing for r1fast's fast paths: the dispatcher's reason, and the interpreter
    is refused (timing it says nothing about the kernels)."""
    def why():
        if device.type != "cuda":
            if impl == "triton" and interpreter_timed():
                return triton_missing(device)
            return f"needs CUDA (the Triton interpreter / no GPU on {device.type})"
        return triton_missing(device) if impl == "triton" else cuda_missing(device, op)
    return why


def megatron_missing() -> str | None:
    try:
        import megatron.core.transformer.moe.moe_utils  # noqa: F401
    except ImportError as e:
        return f"megatron-core not importable ({e})"
    return None


def add_copy_fraction(rows: list[dict], bytes_moved: dict, device: torch.device, reps: int):
    floor = {mode: copy_floor_ms(b, device, reps) for mode, b in bytes_moved.items()}
    for r in rows:
        if "ms" in r and r.get("mode") in floor:
            r["copy_ms"] = floor[r["mode"]]
            r["frac_copy"] = floor[r["mode"]] / r["ms"]


# ----------------------------------------------------------------------------- routing

def route_kwargs(config: str, E: int, k: int, device: torch.device) -> dict:
    if config == "softmax":
        return dict(score="softmax", pre_softmax=False)
    g = torch.Generator().manual_seed(1)
    return dict(score="sigmoid", n_groups=8, topk_groups=min(4, k), normalize=True,
                scaling_factor=2.5, expert_bias=(torch.randn(E, generator=g) * 1e-2).to(device))


def megatron_route(logits, k, kw):
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    return topk_routing_with_score_function(
        logits, k, use_pre_softmax=kw.get("pre_softmax", False), num_groups=kw.get("n_groups"),
        group_topk=kw.get("topk_groups"), scaling_factor=kw.get("scaling_factor"),
        score_function=kw["score"], expert_bias=kw.get("expert_bias"))


compiled_megatron_route = compiled_at_first_call(megatron_route)


def max_error(p: Provider, logits, k, kw, ref_dense, failed: set[str]) -> float | None:
    if p.missing() is not None or p.name in failed:  # a failed peer's row says why already
        return None
    with torch.no_grad():
        out = p.fn(logits=logits)
    dense = out[0] if p.name.startswith("megatron") else routing_to_dense(out[0], out[1],
                                                                          logits.shape[1])[0]
    return (dense.double() - ref_dense).abs().max().item()


def bench_case(T, E, k, config, dtype, device, modes, reps, saved=None, compiled=False
               ) -> list[dict]:
    """The case's rows, provider by provider; ``saved(rows)`` after each, so a stage cut at
    its time limit keeps every provider it measured. ``compiled``: the torch.compile peer
    alone (main() runs it after every config's other providers: its compiles take the longest
    and no target reads it)."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(T, E, generator=g) * 2).to(dtype).to(device).requires_grad_()
    kw = route_kwargs(config, E, k, device)

    def ours(impl):
        return lambda logits: moe_route(logits, k, impl=impl, **kw)

    providers = [
        Provider("r1fast cuda", ours("cuda"), fast_missing("cuda", device, "moe_route")),
        Provider("r1fast triton", ours("triton"), fast_missing("triton", device, "moe_route")),
        Provider("reference", ours("torch")),
        Provider("megatron", lambda logits: megatron_route(logits, k, kw), megatron_missing,
                 peer=True),
    ]
    if compiled:
        providers = [Provider(
            "megatron torch.compile", lambda logits: compiled_megatron_route(logits, k, kw),
            lambda: megatron_missing() or (None if device.type == "cuda" else
                                           "timed on CUDA only (inductor's CPU compile "
                                           "takes minutes on a two-core machine)"),
            peer=True)]
    elt = logits.element_size()
    fwd = T * E * elt + E * 4 + T * k * (4 + 8) + E * 8
    bwd = T * k * (4 + 8) + 2 * T * E * elt
    bytes_moved = {"forward": fwd, "backward": bwd, "full": fwd + bwd}
    shape = {"T": T, "E": E, "k": k, "config": config, "dtype": str(dtype).split(".")[-1]}
    # Error of each provider's dense probs against fp64 weights of the reference's selection
    # (replayed, so a near-tie decided differently in fp64 does not count as an error).
    with torch.no_grad():
        sel = moe_route(logits.detach(), k, impl="torch", **kw).indices
        ref = moe_route(logits.detach().double(), k, impl="torch", replay_indices=sel, **kw)
    ref_dense = routing_to_dense(ref.weights, ref.indices, E)[0]
    # fp64 d(logits) of the [T, k] weights under the harness's fixed upstream gradient, for
    # r1fast's providers (megatron returns dense [T, E] probs: another upstream, no check;
    # the compiled pass holds megatron's only)
    grads = reference_grads(lambda logits: moe_route(logits, k, impl="torch",
                                                     replay_indices=sel, **kw),
                            {"logits": logits}) if "full" in modes and not compiled else None
    floor = {m: copy_floor_ms(bytes_moved[m], device, reps) for m in modes}
    rows: list[dict] = []
    for p in providers:
        got = run_case("moe_route", shape, {"logits": logits}, [p], modes=modes,
                       bytes_moved=bytes_moved, reps=reps, measure_memory=True,
                       grad_reference=None if p.name.startswith("megatron") else grads)
        failed = {r["provider"] for r in got if "the peer failed" in str(r.get("skipped", ""))}
        err = max_error(p, logits.detach(), k, kw, ref_dense, failed)
        for r in got:
            if "ms" in r:
                r["max_abs_err"] = err
                r["copy_ms"], r["frac_copy"] = floor[r["mode"]], floor[r["mode"]] / r["ms"]
        rows += got
        if saved is not None:
            saved(rows)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    Ts = args.T or ([16384] if cuda else [1024])
    if args.E or args.k or cuda:
        pairs = [(E, k) for E in (args.E or [64, 128, 256]) for k in (args.k or [2, 6, 8])]
    else:  # CPU default: two quick shapes (CPU timings only speak for the torch paths)
        pairs = [(64, 2), (256, 8)]
    reps = args.reps or (20 if cuda else 3)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    all_rows = []
    for compiled in (False, True):  # the compiled peer after every case's other providers
        for T in Ts:
            for E, k in pairs:
                for config in args.configs:
                    print(f"\n== moe_route T={T} E={E} k={k} {config} {args.dtype} on "
                          f"{device.type}" + (" (torch.compile)" if compiled else ""))
                    done = list(all_rows)
                    # after each provider: a stage cut at its limit keeps what it measured
                    save = None if args.no_save else (
                        lambda rows, done=done: save_rows(done + rows, "moe_route_" + device.type))
                    rows = bench_case(T, E, k, config, dtype, device, args.modes, reps, save,
                                      compiled=compiled)
                    print_table(rows, extra=["copy_ms", "frac_copy"])
                    all_rows += rows


if __name__ == "__main__":
    main()
