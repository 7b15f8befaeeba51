"""Shared benchmark harness: providers x modes (forward / backward / full), median of repeats,
peak extra memory, max error against an fp64 reference, machine-readable JSON rows.

A benchmark script builds inputs once per shape, lists :class:`Provider` objects (ours, the
torch reference, peers such as Liger when installed) and calls :func:`run_case`. Each row
records the device, library versions and git commit so results in ``bench/results/`` can be
compared across runs. Speed is only compared as ratios within one run.

Where rows go: ``bench/results/<name>.json``, or the folder named by ``R1FAST_BENCH_RESULTS``
(how ``scripts/gpu_check.py`` collects them). Each row carries :func:`environment`: device,
clocks (``nvidia-smi``, on CUDA), versions, commit, and the Triton autotuner's choices made so
far in the process (``autotune``).

Memory: on CUDA, ``max_memory_allocated`` above the allocation before the call. On CPU, the
Linux peak-RSS counter (``VmHWM``) reset through ``/proc/self/clear_refs`` before the call,
with glibc's mmap threshold lowered so freed blocks go back to the OS between measurements.

Launches (CUDA only): one more call of each mode runs under the profiler, and the row counts
what reached the GPU (:func:`device_activity`): kernels, memsets, and copies to the host. A
copy to the host means the CPU waited for the GPU (``.item()``, ``bool(t)``, ``nonzero``), so
``copies_to_host > 0`` is a host sync on that op's path; a target like "one launch each way"
is read off ``launches``.
"""
from __future__ import annotations

import ctypes
import dataclasses
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

MODES = ("forward", "backward", "full")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass
class Provider:
    """One implementation under test. ``fn(**inputs)`` returns a tensor or a tuple of tensors;
    the first tensor is compared to the reference, all floating outputs feed the backward."""

    name: str
    fn: Callable[..., Any]
    #: returns why this provider cannot run here (shown in the table), or None
    missing: Callable[[], str | None] = lambda: None
    #: another project's implementation: if it raises, its row records the error and the
    #: benchmark goes on (an r1fast provider that raises stops the run)
    peer: bool = False
    #: FLOPs per mode where this provider does other work than the case's ``flops`` say (an
    #: arrangement that skips a GEMM): its TFLOP/s is then its own hardware rate. A mode
    #: missing here gets no TFLOP/s.
    flops: dict[str, float] | None = None


def compiled_at_first_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn)``, made at the first call: a run that skips the provider does not
    import the compiler, and the compilation falls in the harness's untimed first call."""
    compiled: list[Callable[..., Any]] = []

    def call(*args, **kwargs):
        if not compiled:
            compiled.append(torch.compile(fn))
        return compiled[0](*args, **kwargs)

    return call


# ----------------------------------------------------------------------------- environment

def _git_commit() -> str:
    """HEAD of the checkout, else ``$R1FAST_GIT_COMMIT`` (a copy sent to a GPU machine travels
    without .git: the command that sends it names the commit), else "unknown"."""
    if os.environ.get("R1FAST_GIT_COMMIT"):
        return os.environ["R1FAST_GIT_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"],
                                       cwd=Path(__file__).parent, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gpu_clocks() -> dict | None:
    """SM/memory clocks (current and max), power, temperature and driver of GPU 0 from
    ``nvidia-smi``; None where it is absent or fails."""
    fields = ["clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem", "power.draw",
              "temperature.gpu", "driver_version"]
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}",
                              "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(fields, values))


def autotune_choices() -> dict:
    """The configs Triton's autotuners of r1fast picked so far in this process:
    ``{kernel: {key: config}}`` (empty under the interpreter, which does not autotune)."""
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return {}
    found: dict[str, dict] = {}

    def visit(name, obj):
        if isinstance(obj, Autotuner) and getattr(obj, "cache", None):
            found[name] = {str(k): str(v) for k, v in obj.cache.items()}

    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("r1fast.kernels") or mod is None:
            continue
        for attr, value in list(vars(mod).items()):
            if isinstance(value, dict):
                for k, v in value.items():
                    visit(f"{mod_name}.{attr}[{k}]", v)
            else:
                visit(f"{mod_name}.{attr}", value)
    return found


def interpreter_timed() -> bool:
    """Whether benchmarks also run the Triton paths under the interpreter on a CPU
    (``R1FAST_BENCH_INTERPRET=1``, set by the dry mode of scripts/gpu_check.py at tiny shapes:
    the numbers mean nothing, the code path is exercised)."""
    return (os.environ.get("R1FAST_BENCH_INTERPRET", "0") == "1"
            and os.environ.get("TRITON_INTERPRET", "0") == "1")


def environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "git_commit": _git_commit(), "host": platform.node(),
           "cuda_runtime": torch.version.cuda}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["clocks"] = gpu_clocks()
    else:
        env["device"] = f"cpu ({os.cpu_count()} cores)"
    env["autotune"] = autotune_choices()
    return env


# ----------------------------------------------------------------------------- timing, memory

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_L2_FLUSH: dict[str, torch.Tensor] = {}


def _flush_l2(device: torch.device) -> None:
    """Evict the GPU's L2 (50-60 MB on Hopper) by writing 256 MiB, as triton.testing.do_bench
    does: the routing logits (18 MB) or a GRPO loss's inputs (a few MB) would otherwise be
    read from cache in every repeat after the first, and their GB/s would not be HBM's."""
    if device.type != "cuda":
        return
    key = str(device)
    if key not in _L2_FLUSH:
        _L2_FLUSH[key] = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    _L2_FLUSH[key].zero_()


#: GPU cycles of the spin queued before each timed repeat (about 1 ms on an H100/H200): the
#: host enqueues the timed call while the GPU spins, so a microsecond op is timed as its
#: kernels, not as Python's launch overhead between two events on an idle GPU
SPIN_CYCLES = 2_000_000
HIDES_LAUNCH = hasattr(torch.cuda, "_sleep")
"""Whether CUDA timings hide the launch overhead (rows say so as ``launch_hidden``)."""


def time_ms(fn: Callable[[], Any], device: torch.device, *, warmup: int = 2, reps: int = 5,
            setup: Callable[[], Any] | None = None, stats: dict | None = None) -> float:
    """Median time of ``fn`` in milliseconds: on a GPU the kernels' time between CUDA events,
    the L2 flushed (:func:`_flush_l2`) and the launch hidden behind a spin (``SPIN_CYCLES``)
    before each repeat; on a CPU wall time. ``setup`` runs before each repeat, outside the
    timed region. ``stats``, if given, receives ``ms_min``, ``ms_max`` and ``ms_all`` (every
    repeat), the spread a comparison of two medians is judged against."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if setup:
            setup()
        _flush_l2(device)
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if HIDES_LAUNCH:
                torch.cuda._sleep(SPIN_CYCLES)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    if stats is not None:
        stats.update(ms_min=min(times), ms_max=max(times), ms_all=[round(t, 5) for t in times])
    return statistics.median(times)


_MALLOC_TUNED = False


def _tune_glibc_malloc() -> None:
    """Make freed large blocks return to the OS so the RSS peak of one call is not hidden by
    memory a previous call left in the heap (M_MMAP_THRESHOLD = -3)."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED or sys.platform != "linux":
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)
    except OSError:
        pass
    _MALLOC_TUNED = True


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak memory above what was allocated before ``fn`` ran (outputs kept alive count)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak
    if sys.platform != "linux":
        return None
    _tune_glibc_malloc()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    out = fn()
    peak = (_status_kib("VmHWM") - base) * 1024
    del out
    return max(peak, 0)


def summarize_device_events(events: Iterable[Any]) -> dict:
    """``launches`` / ``memsets`` / ``copies_to_host`` / ``kernels {name: count}`` of the
    profiler events that ran on the GPU (each has ``.name`` and ``.device_type``). CUPTI
    names memory operations "Memcpy <kind> (...)" and "Memset (...)"; every other device
    event is a kernel."""
    from torch.autograd import DeviceType

    on_gpu = [e.name for e in events if e.device_type == DeviceType.CUDA]
    copies = [n for n in on_gpu if n.startswith("Memcpy")]
    memsets = [n for n in on_gpu if n.startswith("Memset")]
    kernels = [n for n in on_gpu if not n.startswith(("Memcpy", "Memset"))]
    return {"launches": len(kernels), "memsets": len(memsets),
            "copies_to_host": sum("DtoH" in n for n in copies),
            "kernels": dict(Counter(n[:100] for n in kernels))}


def device_activity(fn: Callable[[], Any], device: torch.device,
                    setup: Callable[[], Any] | None = None) -> dict:
    """:func:`summarize_device_events` of one call of ``fn`` (``setup`` runs before it,
    outside the profile). Empty off CUDA. A profiler that fails (no CUPTI, a trace it cannot
    parse) gives ``{"launches_error": why}``: the row says the count is missing rather than
    zero, and the benchmark's timed numbers are kept (``fn`` itself already ran untraced)."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    if setup:
        setup()
    try:
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        return summarize_device_events(prof.events())
    except Exception as e:  # noqa: BLE001 -- recorded in the row, never swallowed
        return {"launches_error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"}


# ----------------------------------------------------------------------------- one case

def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def _float_outputs(out: Any) -> list[torch.Tensor]:
    return [t for t in _tensors(out) if t.is_floating_point() and t.requires_grad]


def _upstream(out: Any, grads: dict[tuple, torch.Tensor]
              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the floating outputs, a fixed random upstream gradient for each, in its own dtype and
    device): made once and cached in ``grads``, so that the timed backward is the op's own
    (``torch.autograd.backward(outputs, gradients)``: no loss, cast or product of the
    harness's in it). The values, multiples of 1/64 in [-4, 4], are exact in every float
    dtype, so a bf16 provider and the fp64 reference get the same gradients."""
    outs = _float_outputs(out)
    if not outs:
        raise RuntimeError("provider output has nothing to differentiate")
    for i, t in enumerate(outs):
        key = (i, t.dtype, t.device)
        if key not in grads:
            g = torch.Generator(device="cpu").manual_seed(1234 + i)
            grads[key] = (torch.randint(-256, 257, t.shape, generator=g) / 64.0).to(
                device=t.device, dtype=t.dtype)
    return outs, [grads[(i, t.dtype, t.device)] for i, t in enumerate(outs)]


def reference_grads(fn: Callable[..., Any], inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """fp64 gradients of ``fn`` for every input that requires grad, under the same fixed
    upstream gradients the timed providers get: what ``run_case(grad_reference=...)`` compares
    their gradients with. ``fn`` must accept fp64 copies of those inputs."""
    leaves = {k: v.detach().double().requires_grad_() for k, v in inputs.items()
              if isinstance(v, torch.Tensor) and v.requires_grad}
    torch.autograd.backward(*_upstream(fn(**{**inputs, **leaves}), {}))
    return {k: v.grad for k, v in leaves.items()}


def _grad_errors(leaves: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict:
    """max |grad - fp64 grad| / max |fp64 grad| per input (a relative error of the largest
    entries, the same yardstick for every provider)."""
    out = {}
    for k, ref in want.items():
        got = leaves[k].grad
        if got is None:
            out[k] = None
            continue
        scale = ref.abs().max().item() or 1.0
        out[k] = (got.double() - ref.to(got.device)).abs().max().item() / scale
    return out


def _mode_functions(p: "Provider", inputs: dict[str, Any], grad_leaves: list[torch.Tensor],
                    grads: dict[tuple, torch.Tensor]):
    """``(clear_grads, {mode: (timed fn, untimed setup or None)})`` for one provider: forward
    under no_grad, full = forward + backward, backward = the backward of a fresh forward."""
    state: dict[str, Any] = {}

    def clear_grads():
        for leaf in grad_leaves:
            leaf.grad = None

    def full():
        out = p.fn(**inputs)
        torch.autograd.backward(*_upstream(out, grads))
        return out

    def backward_setup():
        clear_grads()
        state["upstream"] = _upstream(p.fn(**inputs), grads)

    def backward():
        torch.autograd.backward(*state["upstream"])

    return clear_grads, {"forward": ((lambda: _run_no_grad(p, inputs)), None),
                         "full": (full, clear_grads), "backward": (backward, backward_setup)}


@dataclasses.dataclass(frozen=True)
class _Case:
    """What every provider of one :func:`run_case` call shares."""

    op: str
    shape: dict
    inputs: dict[str, Any]
    named_leaves: dict[str, torch.Tensor]
    device: torch.device
    modes: tuple[str, ...]
    reference: torch.Tensor | None
    grad_reference: dict[str, torch.Tensor] | None
    flops: dict[str, float] | None
    bytes_moved: dict[str, float] | None
    warmup: int
    reps: int
    measure_memory: bool
    count_launches: bool
    env: dict


def run_case(
    op: str,
    shape: dict,
    inputs: dict[str, Any],
    providers: Sequence[Provider],
    *,
    modes: Iterable[str] = MODES,
    reference: torch.Tensor | None = None,
    grad_reference: dict[str, torch.Tensor] | None = None,
    flops: dict[str, float] | None = None,
    bytes_moved: dict[str, float] | None = None,
    warmup: int = 2,
    reps: int = 5,
    measure_memory: bool = True,
    count_launches: bool = True,
) -> list[dict]:
    """Benchmark every provider in every mode on the same ``inputs``; return one row each.

    ``reference`` is the fp64 answer the first output is compared with; ``grad_reference``
    (from :func:`reference_grads`) the fp64 gradients that each provider's gradients after a
    ``full`` run are compared with (``max_grad_rel_err``). ``flops`` / ``bytes_moved`` per
    mode turn times into TFLOP/s and GB/s. ``count_launches`` profiles one more call per mode
    of each non-peer provider on CUDA (:func:`device_activity`); a benchmark of seconds-long
    GEMM-bound calls turns it off, where a launch count says nothing and the call costs its
    stage's time. A peer provider (``Provider.peer``) that raises gets a row saying so (its
    API may have moved on) after the rows of the modes it finished; an r1fast provider that
    raises stops the run.
    """
    case = _Case(op, shape, inputs, {k: v for k, v in inputs.items()
                                     if isinstance(v, torch.Tensor) and v.requires_grad},
                 next(v.device for v in inputs.values() if isinstance(v, torch.Tensor)),
                 tuple(modes), reference, grad_reference, flops, bytes_moved, warmup, reps,
                 measure_memory, count_launches, environment())
    rows = []
    for p in providers:
        why = p.missing()
        if why is not None:
            rows.append({"op": op, "provider": p.name, "shape": shape, "skipped": why,
                         **case.env})
            continue
        try:
            _provider_rows(p, case, rows)
        except Exception as e:  # noqa: BLE001 -- recorded in the row, never swallowed
            if not p.peer:
                raise
            # the modes it finished keep their rows; this one says where it stopped
            first_line = (str(e).splitlines() or [""])[0][:300]
            rows.append({"op": op, "provider": p.name, "shape": shape, **case.env,
                         "skipped": f"the peer failed: {type(e).__name__}: {first_line}"})
            print(f"{p.name}: the peer failed: {type(e).__name__}: {first_line}",
                  file=sys.stderr)
    return rows


def _provider_rows(p: Provider, case: _Case, rows: list[dict]) -> None:
    """One provider's rows, appended to ``rows`` as each mode finishes: forward error, then
    each mode's time, memory and errors."""
    grad_leaves = list(case.named_leaves.values())
    grads: dict[tuple, torch.Tensor] = {}
    clear_grads, mode_fns = _mode_functions(p, case.inputs, grad_leaves, grads)
    err = None
    if case.reference is not None:
        with torch.no_grad():
            first = _tensors(p.fn(**case.inputs))[0]
        err = (first.double() - case.reference.double().to(first.device)).abs().max().item()
    base = {"op": case.op, "provider": p.name, "shape": case.shape}
    for mode in case.modes:
        if mode != "forward" and not grad_leaves:
            continue
        fn, setup = mode_fns[mode]
        try:
            spread: dict = {}
            ms = time_ms(fn, case.device, warmup=case.warmup, reps=case.reps, setup=setup,
                         stats=spread)
            mem = None
            if case.measure_memory:
                if setup:
                    setup()
                mem = peak_extra_bytes(fn, case.device)
        except torch.OutOfMemoryError as e:  # a provider that cannot fit is a result too
            rows.append({**base, "mode": mode, **case.env,
                         "skipped": f"out of memory: {str(e).splitlines()[0]}"})
            continue
        row = {**base, "mode": mode, "ms": ms, **spread,
               "launch_hidden": case.device.type == "cuda" and HIDES_LAUNCH,
               "peak_extra_mib": None if mem is None else mem / 2**20,
               "max_abs_err": err, **case.env,
               "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        if case.grad_reference is not None and mode == "full":  # grads of the last full run
            row["max_grad_rel_err"] = _grad_errors(case.named_leaves, case.grad_reference)
        flops = p.flops if p.flops is not None else case.flops
        if flops and mode in flops:
            row["tflops"] = flops[mode] / (ms * 1e-3) / 1e12
        if case.bytes_moved and mode in case.bytes_moved:
            row["gbps"] = case.bytes_moved[mode] / (ms * 1e-3) / 1e9
        if case.count_launches and not p.peer:  # r1fast's and the reference's counts only:
            row.update(device_activity(fn, case.device, setup))  # each profile costs time
        rows.append(row)
        clear_grads()


def _run_no_grad(p: Provider, inputs: dict[str, Any]):
    with torch.no_grad():
        return p.fn(**inputs)


# ----------------------------------------------------------------------------- output

def print_table(rows: Sequence[dict], extra: Sequence[str] = ()) -> None:
    cols = ["provider", "mode", "shape", "ms", "tflops", "gbps", "peak_extra_mib", "max_abs_err",
            "max_grad_rel_err", "launches", "copies_to_host", *extra]
    present = [c for c in cols if any(c in r for r in rows)]
    print(" | ".join(present))
    for r in rows:
        if "skipped" in r:
            print(f"{r['provider']} | skipped: {r['skipped']}")
            continue
        cells = []
        for c in present:
            v = r.get(c)
            if isinstance(v, float):
                cells.append(f"{v:.3g}" if c != "ms" else f"{v:.3f}")
            elif isinstance(v, dict):
                cells.append(",".join(f"{k}={x}" for k, x in v.items()))
            else:
                cells.append("" if v is None else str(v))
        print(" | ".join(cells))


def save_rows(rows: Sequence[dict], name: str, out_dir: Path | None = None, *,
              with_autotune: bool = True) -> Path:
    """Write rows to ``<out_dir>/<name>.json`` atomically (default: ``$R1FAST_BENCH_RESULTS``,
    else ``bench/results/``); returns the path. Rows get the autotune choices made by now,
    unless ``with_autotune`` is False (a process whose autotuner timed nothing real), and on
    a GPU ``clocks_after``: the clocks when the row was first saved, under load."""
    env_dir = os.environ.get("R1FAST_BENCH_RESULTS")
    out_dir = out_dir or (Path(env_dir) if env_dir else RESULTS_DIR)
    if torch.cuda.is_available():  # the clocks under load, just after the rows' timings (the
        after = gpu_clocks()        # env's are read before any): kept from a row's first save
        for r in rows:
            r.setdefault("clocks_after", after)
    tuned = autotune_choices() if with_autotune else {}
    if tuned:
        rows = [{**r, "autotune": tuned} for r in rows]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(list(rows), indent=1, default=str))
    os.replace(tmp, path)
    return path
