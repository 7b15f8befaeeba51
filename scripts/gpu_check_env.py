"""The environment half of ``scripts/gpu_check.py``: what the ``env`` stage records (device,
clocks, versions, commit, peers) and the small helpers it shares with the stages."""
from __future__ import annotations

import datetime as _dt
import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _run_quiet(cmd: list[str], timeout: float = 10) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(dry: bool) -> dict:
    import platform

    env: dict = {"python": platform.python_version(), "dry": dry, "time": _now(),
                 # a copy sent to a GPU machine has no .git: its command names the commit
                 "git_commit": os.environ.get("R1FAST_GIT_COMMIT")
                 or _run_quiet(["git", "rev-parse", "--short", "HEAD"]) or "unknown",
                 "git_dirty": bool(_run_quiet(["git", "status", "--porcelain",
                                               "--untracked-files=no"]))}
    try:
        import torch

        env.update(torch=torch.__version__, cuda_runtime=torch.version.cuda,
                   cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env.update(device=torch.cuda.get_device_name(0), sms=p.multi_processor_count,
                       gpu_memory_gib=round(p.total_memory / 2**30, 1),
                       capability=f"{p.major}.{p.minor}")
        else:
            env["device"] = f"cpu ({os.cpu_count()} cores)"
    except ImportError as e:
        env.update(torch=None, device="unknown", torch_error=str(e))
    for mod in ("triton", "megatron.core", "liger_kernel", "transformer_engine", "math_verify"):
        env[f"have_{mod.split('.')[0]}"] = _version_of(mod)
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc"
                                    if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if nvcc:
        m = re.search(r"release ([\d.]+)", _run_quiet([nvcc, "--version"]) or "")
        env["nvcc"] = m.group(1) if m else nvcc
    else:
        env["nvcc"] = None
    clocks = _run_quiet(["nvidia-smi", "--query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,"
                         "clocks.max.mem,power.draw,power.limit,temperature.gpu,driver_version",
                         "--format=csv,noheader,nounits", "-i", "0"])
    if clocks:
        keys = ["name", "clocks_sm_mhz", "clocks_max_sm_mhz", "clocks_mem_mhz",
                "clocks_max_mem_mhz", "power_w", "power_limit_w", "temperature_c", "driver"]
        env["clocks"] = dict(zip(keys, [v.strip() for v in clocks.splitlines()[0].split(",")]))
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return env


def _remove_build_locks(env: dict) -> int:
    """Delete the ``lock`` files torch's extension builder leaves in a build folder when it is
    killed (every later build of that folder would wait on them); returns how many."""
    root = env.get("R1FAST_EXT_DIR") or str(Path.home() / ".cache" / "r1fast" / "torch_extensions")
    locks = list(Path(root).glob("*/*/lock"))
    for lock in locks:
        lock.unlink(missing_ok=True)
    return len(locks)


#: env-row key -> distribution of the peers the benchmarks compare with
_PEERS = (("have_megatron", "megatron-core"), ("have_liger_kernel", "liger-kernel"),
          ("have_math_verify", "math-verify"), ("have_transformer_engine", "transformer-engine"))


def _version_of(module: str) -> str | None:
    import importlib.metadata as md
    import importlib.util

    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    dist = {"megatron.core": "megatron-core", "liger_kernel": "liger-kernel",
            "transformer_engine": "transformer-engine", "math_verify": "math-verify"}
    try:
        return md.version(dist.get(module, module))
    except md.PackageNotFoundError:
        return "present"
