"""``make gpu-check`` in its dry mode (no CUDA: tiny shapes, the Triton interpreter): the same
stages and result files as on a GPU (scripts/gpu_check.py, docs/GPU.md), written stage by
stage, so a run cut short still leaves what it finished."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="on a GPU, gpu-check runs for real (minutes)")


def _run(results: Path, *args: str, timeout: float = 170) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "R1FAST_BENCH_RESULTS"}
    return subprocess.run([sys.executable, str(SCRIPT), "--results", str(results), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _rows(results: Path) -> list[dict]:
    lines = (results / "results.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_dry_run_writes_every_result_file(tmp_path):
    res = _run(tmp_path / "out", "--dry", "--benches", "linear_logprob", "--budget", "150")
    out = tmp_path / "out"
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"results.jsonl", "summary.md", "gpu_check.log",
                                               "junit.xml", "junit_smoke.xml"}
    rows = _rows(out)
    env = [r for r in rows if r["kind"] == "env"]
    assert len(env) == 1 and env[0]["dry"] is True and env[0]["git_commit"]
    stages = {r["stage"]: r for r in rows if r["kind"] == "stage"}
    # correct first: the smoke tests before the numbers
    assert list(stages) == ["env", "install", "build", "smoke", "bench_linear_logprob",
                            "tests", "sanitizer", "resources"]
    assert stages["smoke"]["tests"] > 0 and stages["smoke"]["failures"] == 0
    # no sanitizer here: the ops ran without it, and that is not reported as a pass
    assert stages["sanitizer"]["status"] == "skipped"
    assert "5 op runs without compute-sanitizer" in stages["sanitizer"]["detail"]
    assert all(r["status"] in ("ok", "skipped") for r in stages.values()), stages
    assert "CPU-only" in stages["build"]["detail"] or "CUDA" in stages["build"]["detail"]
    # peers as a fresh interpreter sees them after the install; one progress line per stage
    assert "have_megatron" in stages["install"]["peers"]
    assert "] tests: start, limit" in res.stdout and "] tests: ok in" in res.stdout
    assert stages["tests"]["tests"] > 0 and stages["tests"]["failures"] == 0
    bench = [r for r in rows if r["kind"] == "bench"]
    assert bench and all(r["device"] and "git_commit" in r for r in bench)
    # the dry mode times the Triton path under the interpreter (same code path as on a GPU)
    assert any(r.get("provider") == "r1fast triton" and r.get("ms") for r in bench), bench
    ET.parse(out / "junit.xml")
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# r1fast gpu-check (DRY") and "state: finished" in summary
    for name in stages:
        assert f"| {name} |" in summary
    assert "## Benchmarks" in summary and "r1fast triton" in summary
    # the targets table, on the dry run's tiny shape and saying so
    assert "## Targets (issue #18" in summary
    assert "| linear_logprob logp error vs fp64 | <= 1e-4 |" in summary
    assert "(not the issue's shape); r1fast triton" in summary
    # the floor rows (--gemm) and every mode run in dry mode too, as on a GPU
    floor = next(line for line in summary.splitlines()
                 if line.startswith("| linear_logprob fwd+bwd / 8THV floor |"))
    assert "not measured" not in floor, floor
    assert {r.get("mode") for r in bench if r.get("provider") == "r1fast triton"} == \
        {"forward", "backward", "full"}
    # the compiler's report runs for real (sm_90 cubins) even without a GPU
    res = [r for r in rows if r["kind"] == "resources"]
    assert res and all(r["regs"] > 0 and r["arch"] == "sm_90" for r in res), res
    assert "## Kernel resources (sm_90" in summary


def test_a_stage_past_its_limit_is_recorded_and_the_files_stay(tmp_path):
    res = _run(tmp_path, "--dry", "--only", "tests", "--limit", "tests=2", timeout=60)
    assert res.returncode == 1  # a timed-out stage fails the run, the files are still there
    stages = {r["stage"]: r for r in _rows(tmp_path) if r["kind"] == "stage"}
    assert stages["tests"]["status"] == "timeout" and stages["tests"]["limit_s"] == 2
    assert "| tests | timeout |" in (tmp_path / "summary.md").read_text()


def test_make_targets_call_the_script():
    out = subprocess.run(["make", "-n", "gpu-check", "RESULTS=/tmp/x", "WHEELHOUSE=/tmp/w"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
    assert "scripts/gpu_check.py" in out and '--results "/tmp/x"' in out
    assert '--wheelhouse "/tmp/w"' in out
    out = subprocess.run(["make", "-n", "wheelhouse", "WHEELHOUSE=/tmp/w", "PYTHON_VERSION=3.12",
                          "PLATFORM=manylinux2014_x86_64"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
    for part in ("pip download", "--only-binary=:all:", "--python-version 3.12",
                 "--platform manylinux2014_x86_64", "megatron-core==0.16.1", "liger-kernel",
                 "math-verify"):
        assert part in out, part


def test_overlay_makes_r1fast_importable_without_pip(tmp_path):
    """The install stage's fallback: links in a temporary package mirror the installed layout
    (``kernels/`` as ``r1fast.kernels``), and win over an installed r1fast on PYTHONPATH."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = mod.parse_args(["--results", str(tmp_path / "r"), "--dry"])
    runner = mod.Runner(args, mod.Recorder(tmp_path / "r", True, {}))
    overlay = runner.make_overlay()
    code = "import r1fast.kernels.grpo_loss, r1fast.ops, r1fast.csrc; print(r1fast.__file__)"
    env = dict(os.environ, PYTHONPATH=str(overlay))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    import shutil

    shutil.rmtree(runner.tmp, ignore_errors=True)
    assert out.stdout.strip().startswith(str(overlay)), out.stdout


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_cut_build_turns_the_extension_off_for_later_stages(tmp_path, monkeypatch):
    """A build killed at its limit left torch's build lock (every later process would wait on
    it) and each later process would compile again; now the later stages run without the
    extension and the lock is gone."""
    monkeypatch.setenv("R1FAST_EXT_DIR", str(tmp_path / "ext"))
    lock = tmp_path / "ext" / "2.11.0-cu130" / "moe_route" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    mod = _script()
    args = mod.parse_args(["--results", str(tmp_path / "r"), "--no-dry", "--limit", "build=1"])
    runner = mod.Runner(args, mod.Recorder(tmp_path / "r", False, {}))
    runner.stage_build()  # importing torch alone takes longer than 1 s
    (row,) = [r for r in runner.rec.rows if r.get("stage") == "build"]
    assert row["status"] == "timeout" and runner.env["R1FAST_CUDA_EXT"] == "0"
    assert "removed 1 stale build lock" in row["detail"] and not lock.exists()


def test_the_lock_sweep_looks_where_the_extension_builds(tmp_path, monkeypatch):
    """gpu_check cannot import r1fast before it installs it, so it spells the extension's
    build folder itself: both places must name the same folder, with R1FAST_EXT_DIR and
    without it (the default under ~/.cache)."""
    from r1fast.ops import _cuda_ext

    mod = _script()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for env in ({"R1FAST_EXT_DIR": str(tmp_path / "ext")}, {}):
        if env:
            monkeypatch.setenv("R1FAST_EXT_DIR", env["R1FAST_EXT_DIR"])
        else:
            monkeypatch.delenv("R1FAST_EXT_DIR", raising=False)
        (_cuda_ext._build_dir("moe_route") / "lock").write_text("")
        assert mod._remove_build_locks(env) == 1
        assert not (_cuda_ext._build_dir("moe_route") / "lock").exists()


def test_stages_stay_in_the_session_and_end_with_the_script(tmp_path):
    """Stages ran in a new session, which outlives the device tool's command limit and keeps
    the GPU busy under the next call; each is now a process group of this session, and
    SIGTERM to the script kills the running one (stop_current)."""
    import threading
    import time

    mod = _script()
    runner = mod.Runner(mod.parse_args(["--results", str(tmp_path / "r"), "--dry"]),
                        mod.Recorder(tmp_path / "r", True, {}))
    code = ("import os, time; print('IDS', os.getsid(0), os.getpgid(0), flush=True); "
            "time.sleep(120)")
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        out=runner.run("sleeper", [sys.executable, "-c", code], 200)))
    thread.start()
    log = tmp_path / "r" / "gpu_check.log"
    for _ in range(300):  # the child's own line: the log's echo of the command holds "IDS" too
        if re.search(r"IDS \d+ \d+", log.read_text()) and runner.current is not None:
            break
        time.sleep(0.1)
    runner.stop_current()
    thread.join(30)
    status, rc, out, seconds = result["out"]
    assert status == "failed" and rc == -9 and seconds < 60
    sid, pgid = map(int, out.split("IDS")[1].split()[:2])
    assert sid == os.getsid(0) and pgid != os.getpgid(0)


def test_the_commit_comes_from_the_command_where_git_is_absent(monkeypatch):
    """The copy sent to a GPU machine has no .git: every row's commit read "unknown"."""
    sys.path.insert(0, str(ROOT / "bench"))
    from harness import _git_commit

    monkeypatch.setenv("R1FAST_GIT_COMMIT", "abc1234")
    assert _git_commit() == "abc1234"
    assert _script().environment(True)["git_commit"] == "abc1234"


def test_a_signal_records_the_cut_stage_and_the_summary_says_so(tmp_path):
    """SIGTERM (the command's limit) killed the stage but left no row for it, and the summary
    said "finished"."""
    import signal
    import time

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "R1FAST_BENCH_RESULTS"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--results", str(out), "--dry",
                             "--only", "bench", "--benches", "step"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "gpu_check.log"
    for _ in range(600):
        if log.exists() and "===== bench_step" in log.read_text():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    assert proc.returncode == 128 + signal.SIGTERM
    (row,) = [r for r in _rows(out) if r.get("stage") == "bench_step"]
    assert row["status"] == "timeout" and row["detail"].startswith("cut by signal 15")
    assert "state: in progress or cut short" in (out / "summary.md").read_text()


@pytest.mark.parametrize("output, status", [
    ("========= Invalid __global__ write of size 4 bytes\n=========     at k+0x10\n", "failed"),
    ("", "incomplete"),
])
def test_a_sanitizer_cut_by_its_limit_counts_the_errors_it_printed(tmp_path, monkeypatch,
                                                                    output, status):
    """The error summary comes at exit: a run cut after reporting an error read as "no
    error" and the stage as incomplete, exit 0."""
    mod = _script()
    runner = mod.Runner(mod.parse_args(["--results", str(tmp_path / "r"), "--no-dry"]),
                        mod.Recorder(tmp_path / "r", False, {}))
    monkeypatch.setattr(mod.shutil, "which", lambda name: "/usr/bin/true")
    banner = "========= COMPUTE-SANITIZER\n"
    monkeypatch.setattr(runner, "run", lambda stage, cmd, limit, env=None: (
        "timeout", -9, banner + output + "SANITIZE_OK\n", 1.0))
    runner.stage_sanitizer()
    (row,) = [r for r in runner.rec.rows if r.get("stage") == "sanitizer"]
    assert row["status"] == status and runner.ok == (status == "incomplete")
    assert row["sanitizer"]["memcheck"]["errors"] == (1 if output else 0)
