"""What the compiler made of every Triton kernel r1fast launches, for Hopper, on any machine.

Registers per thread, spilled bytes (the local-memory stack frame), shared memory, and the
instruction mix of the machine code (``HGMMA`` = Hopper tensor-core MMA, ``LDGSTS`` = async
global->shared copies, ``LDL``/``STL`` = local-memory traffic, i.e. spills) for each kernel and
each autotune config, at the real shapes of the GPU benchmarks (T=16384, H=4096, V=151936 bf16;
E=256 k=8; ...). These answer most "why is it slow" questions without a GPU (device METHOD.md:
"read what costs no device time"): a config that spills, a matrix kernel without ``HGMMA``, or
loads that are not pipelined show here.

How: r1fast's own launchers run on ``meta`` tensors while a *compile-only driver* is Triton's
active driver. Triton then does everything it does on a GPU (argument specialisation, the
heuristics, the autotuner's pruning and one trial per config) except running code: the driver
reports the target (``cuda:90``), a no-op launcher, H100 limits, and a benchmarker that calls
each trial once. Every compiled cubin goes through ``cuobjdump`` (shipped in Triton's wheel) for
``-res-usage`` and ``-sass``. Because the launchers are the real ones, the report covers exactly
the configs a GPU run would try; nothing here restates kernel signatures.

Usage::

    python bench/kernel_resources.py                         # every workload, sm_90
    python bench/kernel_resources.py --workloads linear_logprob_bf16 --fail-on-spill

Rows go to ``bench/results/kernel_resources_sm90.json`` (or ``$R1FAST_BENCH_RESULTS``), one per
compiled kernel. This process must not run under ``TRITON_INTERPRET=1`` (the kernels would be
interpreted, not compiled), so the script clears it before importing them, and the module,
imported elsewhere, refuses to compile where the kernels were already imported.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":
    # Before triton is imported: it reads TRITON_INTERPRET once, and the dry mode of
    # scripts/gpu_check.py exports TRITON_INTERPRET=1 to the whole run. This process compiles.
    os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from harness import environment, save_rows  # noqa: E402

#: H100 SXM limits the driver reports (Triton checks shared memory and threads against them).
H100_LIMITS = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
               "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
               "mem_bus_width": 5120}
#: SASS opcodes counted per kernel (prefix match on the opcode).
OPCODES = ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "LDL", "STL")


def cuobjdump() -> str:
    """Path of cuobjdump: Triton's bundled copy, else the one on PATH."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
    if found is None:
        raise SystemExit("kernel_resources: no cuobjdump (neither in Triton's wheel at "
                         f"{bundled} nor on PATH); it reads registers and spills off the cubin")
    return found


def read_cubin(cubin: bytes, tool: str) -> dict:
    """Registers, stack bytes and opcode counts of the single kernel in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"kernel_resources: cuobjdump -res-usage printed no REG/STACK: {usage}")
    counts = sass_counts(sass)
    return {"regs": int(m.group(1)), "stack_bytes": int(m.group(2)), **counts}


def sass_counts(sass: str) -> dict:
    """Opcode counts of a ``cuobjdump -sass`` listing, and ``spills_in_loops``: the local-memory
    loads/stores (``LDL``/``STL``) between the target and the source of a backward branch."""
    # one (address, opcode, operands) per instruction: "/*0c40*/  @!P0 BRA 0x3c0 ;"
    ins = [(int(a, 16), op, rest) for a, op, rest in re.findall(
        r"^\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", sass, re.M)]
    counts = {op.lower(): sum(1 for _, o, _ in ins if o.startswith(op)) for op in OPCODES}
    loops = [(int(t.group(1), 16), a) for a, o, rest in ins if o.startswith("BRA")
             and (t := re.search(r"0x([0-9a-f]+)", rest)) and int(t.group(1), 16) < a]
    counts["spills_in_loops"] = sum(
        1 for a, o, _ in ins if o.startswith(("LDL", "STL")) and any(b <= a <= e for b, e in loops))
    return counts


class CompileOnlyDriver(DriverBase):
    """Triton's driver for a GPU that compiles but never runs: see the module docstring."""

    def __init__(self, arch: int = 90):
        self.target = GPUTarget("cuda", arch, 32)
        self.rows: list[dict] = []
        self.workload = ""
        self._pending: list[tuple[object, object]] = []
        self._tool = cuobjdump()
        self.utils = self  # Triton calls driver.utils.load_binary / get_device_properties

    # -- what the JIT and the autotuner ask of a driver
    @classmethod
    def is_active(cls) -> bool:
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("kernel_resources compiles kernels; it builds no launcher")

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        def one_call(fn, quantiles=None, **_):
            fn()  # compiles the trial's config; the no-op launcher runs nothing
            return [1.0] * len(quantiles) if quantiles else 1.0
        return one_call

    def get_empty_cache_for_benchmark(self):
        return torch.empty(0, device="meta")

    def clear_cache(self, cache) -> None:
        pass

    # -- loading a compiled kernel: record it instead
    def launcher_cls(self, src, metadata):
        self._pending.append((src, metadata))
        return lambda *args, **kwargs: None

    def get_device_properties(self, device) -> dict:
        return dict(H100_LIMITS)

    def load_binary(self, name, cubin, shared, device):
        src, meta = self._pending.pop()
        usage = read_cubin(cubin, self._tool)
        names = src.fn.arg_names
        # the meta-parameters, and the integer arguments Triton specialised to 1 (strides)
        consts = {names[k[0]]: v for k, v in src.constants.items() if len(k) == 1}
        self.rows.append({"workload": self.workload, "kernel": name,
                          "arch": f"sm_{self.target.arch}", "num_warps": meta.num_warps,
                          "num_stages": meta.num_stages, "shared_bytes": meta.shared,
                          **usage, "constexprs": consts})
        # a module handle that is not None: Triton loads a kernel again while it is None
        return "compile-only", None, usage["regs"], usage["stack_bytes"], 1024

    def __enter__(self) -> "CompileOnlyDriver":
        # reset_active() would build the default driver, which raises on a machine without
        # a GPU, so the previous (possibly unset) active driver is put back as it was
        self._previous = triton_driver._active
        triton_driver.set_active(self)
        return self

    def __exit__(self, *exc) -> None:
        triton_driver._active = self._previous


# ----------------------------------------------------------------------------- workloads

def _meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def linear_logprob(dtype: torch.dtype, T: int, H: int, V: int, row_tau: bool = False) -> None:
    """Forward partials and the chunked backward (dz tiles, dx and dW GEMMs), default chunks;
    ``row_tau``: with one temperature per row (the kernels' ``ROW_TAU`` variants)."""
    from r1fast.kernels import linear_logprob as K
    from r1fast.ops.linear_logprob import DEFAULT_CHUNKS, triton_chunks

    x, w, y = _meta(T, H, dtype=dtype), _meta(V, H, dtype=dtype), _meta(T, dtype=torch.int64)
    inv_tau = _meta(T) if row_tau else 1.0
    K.forward_partials(x, w, y, inv_tau, 0)
    rows = [_meta(T) for _ in range(4)]
    ct, cv = triton_chunks(T, DEFAULT_CHUNKS.triton_tokens, None, "fused")
    K.backward(x, w, y, *rows, inv_tau, 0, ct, cv)


def linear_logprob_gemm(T: int = 16384, H: int = 4096, V: int = 151936) -> None:
    """The GEMM-tile arrangement's row kernels (its GEMMs are the vendor's), default chunks."""
    from r1fast.kernels import linear_logprob_gemm as G
    from r1fast.ops.linear_logprob import DEFAULT_CHUNKS, triton_chunks

    x, w = _meta(T, H, dtype=torch.bfloat16), _meta(V, H, dtype=torch.bfloat16)
    y = _meta(T, dtype=torch.int64)
    ct, cv = triton_chunks(T, DEFAULT_CHUNKS.triton_tokens, None, "gemm")
    G.forward_partials(x, w, y, 1.0, 0, ct, cv)
    G.backward(x, w, y, *[_meta(T) for _ in range(4)], 1.0, 0, ct, cv)


def grpo_loss(n_tokens: int = 262144, n_seqs: int = 256) -> None:
    """The one-launch packed GRPO loss with KL and TIS (the widest variant), and padded."""
    from r1fast.kernels import grpo_loss as K

    v = [_meta(n_tokens) for _ in range(5)]
    cu = _meta(n_seqs + 1, dtype=torch.int32)
    K.grpo_loss_fwd(v[0], v[1], _meta(n_seqs), v[2], cu, v[3], v[4], num_seqs=n_seqs,
                    kl="k3", kl_coef=0.001, tis_cap=2.0)
    K.grpo_loss_fwd(v[0], v[1], _meta(n_seqs), v[2], None, num_seqs=n_seqs,
                    seq_len=n_tokens // n_seqs, agg="seq-mean-token-mean")


def moe_route(T: int = 16384, E: int = 256, k: int = 8) -> None:
    """Routing forward/backward, softmax (Qwen3) and DeepSeek-V3 grouped sigmoid, aux scores."""
    from r1fast.kernels import moe_route as K

    logits, bias = _meta(T, E), _meta(E)
    for score, bias_, groups, topk_groups, norm in ((0, None, 1, 1, True),
                                                    (1, bias, 8, 4, True)):
        wts, idx, _ = K.route_fwd(logits, k, score, bias_, None, groups, topk_groups,
                                  k // topk_groups, 2.5, norm)
        K.route_bwd(wts, logits, idx, score, 2.5, norm)
    scores, _ = K.aux_scores_fwd(logits, k, True)
    K.aux_scores_bwd(scores, logits, True)


def moe_permute(T: int = 16384, k: int = 8, hidden: tuple[int, ...] = (4096, 7168)) -> None:
    """Token scatter into expert order and the weighted gather back, bf16."""
    from r1fast.kernels import moe_permute as K

    for H in hidden:
        x, row_map, wts = _meta(T, H, dtype=torch.bfloat16), _meta(T, k, dtype=torch.int64), \
            _meta(T, k)
        y, _ = K.scatter_rows(x, row_map)  # forward of the permutation
        K.scatter_rows(x, row_map, wts, y)  # the weighted variant with its weight gradient
        K.gather_combine(y, row_map, wts)


def moe_experts(rows: int = 2048, train_rows: int = 16384) -> None:
    """The grouped expert MLP, bf16, at Qwen3-30B-A3B's and DeepSeek-V3's expert sizes: the
    forward of decoding (256 rows x top-8), and the training forward (keeping ``[g | u]``) and
    backward of 2048 tokens x top-8."""
    from r1fast.kernels import moe_experts as K

    for E, H, F in ((128, 2048, 768), (256, 7168, 2048)):
        tables = [_meta(E, dtype=torch.int64) for _ in range(2)]
        counts = _meta(E, dtype=torch.int64)
        # aligned: torch's allocators give megatron's expert weights 16-byte aligned addresses
        K.grouped_swiglu_mlp(_meta(rows, H, dtype=torch.bfloat16), counts, *tables,
                             _meta(rows), F, aligned=True)
        x, pre = _meta(train_rows, H, dtype=torch.bfloat16), _meta(train_rows, 2 * F,
                                                                  dtype=torch.bfloat16)
        h, probs = _meta(train_rows, F, dtype=torch.bfloat16), _meta(train_rows)
        K.grouped_swiglu_mlp(x, counts, *tables, probs, F, aligned=True, pre=pre, h=h)
        K.grouped_swiglu_mlp_backward(_meta(train_rows, H, dtype=torch.bfloat16), x, pre, h,
                                      counts, *tables, probs, aligned=True)


def group_advantages(n_groups: int = 4096, group_size: int = 16) -> None:
    """GRPO advantages, contiguous groups and groups given by a permutation."""
    from r1fast.kernels import group_advantages as K

    n = n_groups * group_size
    K.group_advantages_fwd(_meta(n), estimator="grpo", eps=1e-6, group_size=group_size)
    K.group_advantages_fwd(_meta(n), estimator="grpo", eps=1e-6,
                           perm=_meta(n, dtype=torch.int64),
                           offsets=_meta(n_groups + 1, dtype=torch.int64))


WORKLOADS = {
    "linear_logprob_bf16": lambda: linear_logprob(torch.bfloat16, 16384, 4096, 151936),
    "linear_logprob_fp32": lambda: linear_logprob(torch.float32, 4096, 4096, 32768),
    "linear_logprob_bf16_row_tau": lambda: linear_logprob(torch.bfloat16, 16384, 4096, 151936,
                                                          row_tau=True),
    "linear_logprob_gemm_bf16": linear_logprob_gemm,
    "grpo_loss": grpo_loss,
    "moe_route": moe_route,
    "moe_permute": moe_permute,
    "moe_experts": moe_experts,
    "group_advantages": group_advantages,
}


def compile_workloads(names, arch: int = 90) -> list[dict]:
    """Rows of every kernel the named workloads compile for ``sm_<arch>``. The kernels must be
    imported by this call, in a process without ``TRITON_INTERPRET=1``: ``triton.jit`` decides
    at import whether a kernel is compiled or interpreted."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or "r1fast.kernels" in sys.modules:
        raise RuntimeError("kernel_resources compiles kernels: run it as its own process "
                           "(python bench/kernel_resources.py), not where r1fast's kernels "
                           "were imported or TRITON_INTERPRET=1 is set")
    with CompileOnlyDriver(arch) as drv:
        for name in names:
            drv.workload = name
            WORKLOADS[name]()
    return drv.rows


def print_rows(rows: list[dict]) -> None:
    print("workload | kernel | config | warps x stages | regs | spill B | smem KiB | HGMMA | "
          "LDGSTS | LDL/STL (in loops)")
    for r in rows:
        cfg = ",".join(f"{k}={v}" for k, v in r["constexprs"].items())
        print(f"{r['workload']} | {r['kernel']} | {cfg} | {r['num_warps']}x{r['num_stages']} | "
              f"{r['regs']} | {r['stack_bytes']} | {r['shared_bytes'] / 1024:.0f} | "
              f"{r['hgmma']} | {r['ldgsts']} | {r['ldl']}/{r['stl']} ({r['spills_in_loops']})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = Hopper)")
    p.add_argument("--fail-on-spill", action="store_true",
                   help="exit 1 when any compiled kernel has a non-empty stack frame")
    args = p.parse_args(argv)
    rows = compile_workloads(args.workloads, args.arch)
    env = environment()
    rows = [{**r, "triton": env["triton"], "git_commit": env["git_commit"],
             "host": env["host"]} for r in rows]
    print_rows(rows)
    # the autotuners "chose" among trials that all took the same fake time: not a choice
    path = save_rows(rows, f"kernel_resources_sm{args.arch}", with_autotune=False)
    print(f"{len(rows)} kernels -> {path}")
    spilled = [r for r in rows if r["stack_bytes"] > 0]
    for r in spilled:
        print(f"spills: {r['kernel']} {r['constexprs']} {r['num_warps']}x{r['num_stages']}: "
              f"{r['stack_bytes']} B stack, {r['spills_in_loops']} LDL/STL inside loops")
    return 1 if args.fail_on_spill and spilled else 0


if __name__ == "__main__":
    sys.exit(main())
