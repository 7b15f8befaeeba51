"""Benchmark of the fused linear log-prob op: time, TFLOP/s, fraction of the bare-GEMM roofline,
peak extra memory and max |logp error| against an fp64 reference.

Providers:
- ``naive torch``: full logits ``hidden @ weight.T`` then ``log_softmax`` / ``gather`` (plain
  autograd, ``[T, V]`` tensors in the input dtype);
- ``r1fast torch``: the chunked reference (``impl="torch"``);
- ``r1fast triton``: the fused kernels (``impl="triton"``; CUDA only, the interpreter is far too
  slow to time);
- ``r1fast triton (gemm tiles)``: ``tiles="gemm"``, cuBLAS fp32 logit tiles reduced by Triton
  row kernels (kernels/linear_logprob_gemm.py), the other arrangement of the same op;
- ``liger flce (sum)``: Liger's fused linear cross-entropy summed over tokens (its supported
  path; = -sum of the log-probs), when ``liger_kernel`` is importable and CUDA is present; its
  forward is checked against the fp64 sum, its gradients are not (another upstream gradient),
  and its TFLOP/s counts the 6THV it does in the forward;
- ``r1fast triton (per-row tau)``: the fused kernels with a ``[T]`` temperature tensor (all
  1.0): what one temperature per sample costs over the scalar;
- ``naive torch.compile``: the naive formula through ``torch.compile`` (CUDA only: inductor's
  CPU compile takes minutes on a two-core machine).

Errors: ``max_abs_err`` is the forward's max |logp - fp64 logp|; in ``full`` mode
``max_grad_rel_err`` compares every provider's gradients of hidden and weight (not Liger's)
with fp64 gradients under the same upstream gradient: max |error| / max |fp64 gradient|.
TFLOP/s counts each provider's own work: the recomputing kernels 2/6/8THV (forward, backward,
full), the naive formulas, which keep the logits, 2/4/6THV.

On CUDA the same run also times the bare GEMMs of the shape with ``torch.matmul`` (forward: one
``[T, H] x [H, V]``; backward: ``dX = G W`` and ``dW = G^T X``; full: all three) as the roofline:
after the fp64 reference and again after r1fast's two arrangements, the faster time of the two
kept (a floor taken on a cold or throttled GPU would flatter the ratio).
The fused op does 2THV FLOPs forward and 8THV forward+backward (the backward recomputes the
logits), so its full-mode fraction of the 3-GEMM roofline is at most 0.75.

Examples:
    python bench/bench_linear_logprob.py                 # CPU acceptance shape / GPU sweep
    python bench/bench_linear_logprob.py --quick
    python bench/bench_linear_logprob.py --T 16384 --H 4096 --V 151936 --dtype bf16 --modes full
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
    environment,
    interpreter_timed,
    print_table,
    reference_grads,
    run_case,
    save_rows,
    time_ms,
)

from r1fast.ops.linear_logprob import linear_logprob, naive_linear_logprob  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", help="token counts (default depends on device)")
    p.add_argument("--H", type=int, nargs="+", help="hidden sizes")
    p.add_argument("--V", type=int, nargs="+", help="vocabulary sizes")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="input dtype (fp32 CPU, bf16 CUDA)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--quick", action="store_true", help="one small shape, few repeats")
    p.add_argument("--reps", type=int, help="timed repeats per mode")
    p.add_argument("--gemm", action="store_true", help="time bare GEMMs on CPU too")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    return p.parse_args(argv)


def shapes(args, cuda: bool) -> list[tuple[int, int, int]]:
    if args.quick:
        default = ([4096], [4096], [32000]) if cuda else ([512], [128], [8192])
    elif cuda:
        default = ([4096, 16384], [4096], [32000, 151936])
    else:
        default = ([4096], [256], [65536])  # acceptance shape: naive logits are 1 GiB in fp32
    Ts, Hs, Vs = args.T or default[0], args.H or default[1], args.V or default[2]
    return [(T, H, V) for T in Ts for H in Hs for V in Vs]


def make_inputs(T, H, V, dtype, device) -> dict:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g) / 2
    weight = torch.randn(V, H, generator=g) * (2.0 / H**0.5)  # logits with std ~1
    targets = torch.randint(0, V, (T,), generator=g)
    return {"hidden": hidden.to(device, dtype).requires_grad_(),
            "weight": weight.to(device, dtype).requires_grad_(),
            "targets": targets.to(device)}


def _reference_logp(hidden, weight, targets):
    return linear_logprob(hidden, weight, targets, impl="torch")


def fp64_reference(inputs, with_grads: bool) -> tuple[torch.Tensor, dict | None]:
    """logp of the same inputs in fp64, streamed by the chunked reference (no [T, V] tensor),
    and (``with_grads``) the fp64 gradients of hidden and weight under the harness's upstream
    gradient."""
    with torch.no_grad():
        logp = _reference_logp(inputs["hidden"].double(), inputs["weight"].double(),
                               inputs["targets"])
    return logp, (reference_grads(_reference_logp, inputs) if with_grads else None)


_compiled_naive = compiled_at_first_call(naive_linear_logprob)
LIGER = "liger flce (sum)"


def _liger_missing(cuda: bool) -> str | None:
    if not cuda:
        return "needs CUDA"
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return "liger_kernel is not installed"
    return None


def _liger_loss(hidden, weight, targets):
    """Liger's fused linear cross-entropy summed over tokens (= -sum of the log-probs): its
    supported path. With reduction="none" and a per-token upstream gradient it folds dW per
    token before the backward (Liger issue #1298): wrong or refused, depending on the
    version. Its gradients are made in the forward whenever the input requires grad."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, targets)


def _per_row_tau_logp(hidden, weight, targets):
    """The fused kernels reading one temperature per row (every row at 1.0, so the fp64
    reference still applies): the cost of a per-sample temperature over the scalar one."""
    tau = torch.ones(targets.shape[0], device=targets.device, dtype=torch.float32)
    return linear_logprob(hidden, weight, targets, impl="triton", temperature=tau)


def providers(cuda: bool, f: float) -> list[Provider]:
    """Most wanted numbers first (a run may be stopped at its time limit): r1fast's two Triton
    arrangements, the peer, then the slow baselines. ``f``: the forward GEMM's FLOPs (2THV);
    the providers that keep the logits do 1f more in the backward than none (no recompute),
    Liger makes its gradients in the forward (3f there, nothing after)."""
    on_gpu = (lambda: None if cuda or interpreter_timed() else
              "needs CUDA (the interpreter is not timed)")
    stored = {"forward": f, "backward": 2 * f, "full": 3 * f}
    return [
        Provider("r1fast triton", lambda hidden, weight, targets:
                 linear_logprob(hidden, weight, targets, impl="triton"), missing=on_gpu),
        Provider("r1fast triton (gemm tiles)", lambda hidden, weight, targets:
                 linear_logprob(hidden, weight, targets, impl="triton", tiles="gemm"),
                 missing=on_gpu),
        Provider(LIGER, _liger_loss, missing=lambda: _liger_missing(cuda), peer=True,
                 flops={"forward": 3 * f, "full": 3 * f}),
        Provider("r1fast triton (per-row tau)", _per_row_tau_logp, missing=on_gpu),
        Provider("naive torch", lambda hidden, weight, targets:
                 naive_linear_logprob(hidden, weight, targets), flops=stored),
        Provider("naive torch.compile", _compiled_naive,
                 missing=lambda: None if cuda else "timed on CUDA only (inductor's CPU compile "
                 "takes minutes on a two-core machine)", peer=True, flops=stored),
        Provider("r1fast torch", lambda hidden, weight, targets:
                 linear_logprob(hidden, weight, targets, impl="torch")),
    ]


#: the last of r1fast's arrangements in :func:`providers`' order: the floor is timed again
#: right after it
R1FAST_LAST = "r1fast triton (gemm tiles)"


def _fractions(rows: list[dict], floor_rows: list[dict]) -> None:
    """``frac_roofline`` of each timed row: the bare GEMMs' time of its mode over its own."""
    floor = {r["mode"]: r["ms"] for r in floor_rows}
    for r in rows:
        if r.get("mode") in floor and "ms" in r:
            r["frac_roofline"] = floor[r["mode"]] / r["ms"]


def gemm_rows(inputs, shape, modes, device, flops, warmup, reps) -> list[dict]:
    """Bare torch.matmul GEMMs of the shape: the roofline rows, timed."""
    rows = [{"op": "linear_logprob", "provider": "bare GEMM (roofline)", "mode": mode,
             "shape": shape, **environment()} for mode in modes]
    time_floor(rows, inputs, device, flops, warmup, reps)
    return rows


def time_floor(rows: list[dict], inputs, device, flops, warmup, reps) -> None:
    """Time the bare GEMMs of each floor row's mode; a row timed before keeps the faster of its
    two times (``ms_first``, ``ms_again`` beside): the floor at the best clocks the run saw,
    never one a cold or throttled GPU flatters r1fast with."""
    x, w = inputs["hidden"].detach(), inputs["weight"].detach()
    grad = torch.randn(x.shape[0], w.shape[0], device=device, dtype=x.dtype)  # [T, V] dlogits
    fns = {"forward": lambda: x @ w.T,
           "backward": lambda: (grad @ w, grad.T @ x),
           "full": lambda: (x @ w.T, grad @ w, grad.T @ x)}
    gemm_flops = {"forward": flops["forward"], "backward": flops["forward"] * 2,
                  "full": flops["forward"] * 3}
    for r in rows:
        ms = time_ms(fns[r["mode"]], device, warmup=warmup, reps=reps)
        if "ms" in r:
            r["ms_first"], r["ms_again"] = r["ms"], ms
            ms = min(ms, r["ms"])
        r["ms"], r["tflops"] = ms, gemm_flops[r["mode"]] / (ms * 1e-3) / 1e12


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    warmup, reps = (1, args.reps or 3) if (args.quick or not cuda) else (2, args.reps or 5)
    all_rows: list[dict] = []
    saved: list = []

    def keep(rows: list[dict]) -> None:
        """Rows are saved as they come: a run stopped at its time limit keeps what it measured
        (providers go from the most wanted numbers to the slowest)."""
        all_rows.extend(rows)
        if not args.no_save:
            saved[:] = [save_rows(all_rows, f"linear_logprob_{device.type}")]

    for T, H, V in shapes(args, cuda):
        shape = {"T": T, "H": H, "V": V, "dtype": str(dtype).replace("torch.", "")}
        print(f"\n== linear_logprob T={T} H={H} V={V} {shape['dtype']} on {device.type}",
              flush=True)
        inputs = make_inputs(T, H, V, dtype, device)
        flops = {"forward": 2.0 * T * H * V, "backward": 6.0 * T * H * V, "full": 8.0 * T * H * V}
        # the fp64 reference first: its seconds of fp64 work do not sit between the floor
        # and the r1fast rows timed against it
        reference, grads = fp64_reference(inputs, with_grads="full" in args.modes)
        g_rows: list[dict] = []
        floor_reps = max(reps, 10)  # each GEMM call is short; the floor sets every fraction
        if cuda or args.gemm:
            g_rows = gemm_rows(inputs, shape, args.modes, device, flops, warmup, floor_reps)
            keep(g_rows)
        first = len(all_rows)
        for p in providers(cuda, flops["forward"]):
            # Liger's loss is the negated sum: its forward against that, no gradient check
            summed = p.name == LIGER
            rows = run_case("linear_logprob", shape, inputs, [p], modes=args.modes,
                            reference=-reference.double().sum() if summed else reference,
                            grad_reference=None if summed else grads, flops=flops,
                            warmup=warmup, reps=reps,
                            count_launches=False)  # GEMM-bound: the count says nothing
            _fractions(rows, g_rows)  # saved with each provider: a cut stage keeps them
            keep(rows)
            if p.name == R1FAST_LAST and g_rows:  # the floor again, at r1fast's clocks
                time_floor(g_rows, inputs, device, flops, warmup, floor_reps)
                _fractions(all_rows[first:], g_rows)
                keep([])  # the rows again, with the floor's second time
        print_table(all_rows[first:], extra=["frac_roofline"])
        _acceptance(all_rows[first:])
        del inputs, reference, grads
    if saved:
        print(f"\nsaved {len(all_rows)} rows to {saved[0]}")
    return all_rows


def _acceptance(rows) -> None:
    """Chunked reference vs naive: peak extra memory ratio (< 1/4 required) and errors."""
    by = {(r["provider"], r.get("mode")): r for r in rows if "ms" in r}
    for mode in MODES:
        ref, naive = by.get(("r1fast torch", mode)), by.get(("naive torch", mode))
        if not ref or not naive or not naive.get("peak_extra_mib"):
            continue
        ratio = ref["peak_extra_mib"] / naive["peak_extra_mib"]
        print(f"acceptance[{mode}]: r1fast torch peak extra {ref['peak_extra_mib']:.1f} MiB vs "
              f"naive {naive['peak_extra_mib']:.1f} MiB -> ratio {ratio:.3f} "
              f"({'PASS' if ratio < 0.25 else 'FAIL'} < 0.25); max |logp err| vs fp64: "
              f"r1fast {ref['max_abs_err']:.2e}, naive {naive['max_abs_err']:.2e}")


if __name__ == "__main__":
    main()
