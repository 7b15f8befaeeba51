#!/usr/bin/env python3
"""The GPU proof in one command (issue #18): install, build, test and benchmark r1fast on one
GPU, writing every result into a folder stage by stage, so a run cut short keeps what it did.

Usage::

    make gpu-check RESULTS=<dir> [WHEELHOUSE=<dir>] [GPU_CHECK_ARGS="--budget 510"]
    python scripts/gpu_check.py --results <dir> [--wheelhouse <dir>] [--dry | --no-dry]
                                [--budget SECONDS] [--limit STAGE=SECONDS ...]
                                [--only STAGE,STAGE] [--benches NAME,NAME]

Stages, in order, each in its own process group with its own time limit (``--limit``), all of
them together (counted from this script's start) inside ``--budget`` seconds (default 510: one
command of at most 570 s on the GPU machines this project is lent for about 15 minutes); the
benchmarks no target reads run after the tests:

``env``      device, clocks (``nvidia-smi``), versions (python, torch, CUDA, Triton, nvcc,
             driver), the git commit, and which optional peers are importable.
``install``  with ``--wheelhouse``: ``pip install --no-index --no-deps --no-build-isolation
             --find-links WHEELHOUSE <every wheel in it>``, then r1fast itself the same way
             (``-e .``). If pip cannot install r1fast (an old setuptools, no pip), an overlay
             package is made instead: ``<tmp>/r1fast`` links ``r1fast/*``, ``kernels`` and
             ``csrc`` of this checkout, and later stages get it on ``PYTHONPATH``. Without a
             wheelhouse it only checks that ``r1fast.kernels`` imports (overlay if not).
``build``    builds the CUDA extension (``r1fast.ops._cuda_ext``: ``missing(op)`` for every op
             compiles ``csrc/`` once) and records build time or the first error line.
``smoke``    ``pytest -x`` on the few test files that must pass before any number means
             something (the CUDA router's first run, the kernels at the benchmarks' shapes
             against fp64): ``SMOKE_TESTS`` of gpu_check_plan.py.
``bench_*``  ``bench/bench_<name>.py`` at real shapes (T=16384, H=4096, V=151936 bf16;
             E=256 k=8; H=4096/7168; the GRPO step; the rollout length mix, old decoder vs
             the ragged KV cache; MLA's prefill and decode attention at DeepSeek-V3's sizes),
             each its own stage; its JSON rows (time, TFLOP/s or GB/s,
             fraction of the floor, peak extra memory, error vs fp64, clocks, autotune choice)
             are copied into ``results.jsonl``.
``tests``    the GPU test files (CUDA and Triton kernels, ``-m "not slow"``) with a JUnit file;
             the row counts passed / failed / skipped / errors and the first failures.
``sanitizer``  ``scripts/sanitize_ops.py`` (every op once, forward and backward, small odd
             shapes, Triton and CUDA paths) under ``compute-sanitizer --tool memcheck`` and
             ``--tool racecheck``; recorded as skipped, with the reason, where there is no
             ``compute-sanitizer``; in dry mode the ops run once without it.
``resources``  last: ``bench/kernel_resources.py``, the registers, spills, shared memory and
             instruction mix of each Triton kernel and autotune config, compiled for sm_90
             (needs no GPU), one ``{"kind": "resources", ...}`` row per compiled kernel.

Files written into RESULTS (five, flat, so the device tool returns all of them):

``results.jsonl``  one JSON object per line, ``{"kind": "env"|"stage"|"bench"|"resources",
                   ...}``; every stage row has ``stage``, ``status`` (ok / failed / timeout /
                   skipped / incomplete: a sanitizer cut by its limit with no error found),
                   ``seconds``, ``limit_s``, ``detail``, and the run's device,
                   commit and versions.
``summary.md``     a markdown summary, rewritten after every stage.
``gpu_check.log``  every stage's command and output.
``junit.xml``      the test stage's JUnit report (``junit_smoke.xml``: the smoke stage's).

Dry mode (``--dry``, the default where ``torch.cuda.is_available()`` is False): tiny shapes,
``TRITON_INTERPRET=1``, the same stages, code paths and files (pip gets ``--dry-run``; the
build stage records why the extension cannot build here; the benchmarks also time the Triton
paths under the interpreter, ``R1FAST_BENCH_INTERPRET=1``). CI runs it through
tests/ops/test_gpu_check.py.

``make wheelhouse WHEELHOUSE=<dir> PYTHON_VERSION=3.12 PLATFORM=manylinux2014_x86_64`` fills the
wheelhouse on a machine with network, for an air-gapped cluster or the GPU machine (see
docs/GPU.md): ``pip download --only-binary=:all: --no-deps --python-version ... --platform ...
-d DIR megatron-core==0.16.1 liger-kernel math-verify latex2sympy2_extended
antlr4-python3-runtime==4.13.2`` (``--no-deps``: torch and Triton come with the machine's CUDA
stack and must not be replaced). The folder is git-ignored; carry it with the checkout.

Exit status: 0 when every stage that ran is ok, skipped or incomplete, 1 otherwise (the files are written
either way).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ is not a package
from gpu_check_report import (  # noqa: E402
    _junit_counts,
    _last_line,
    _marker_json,
    _verbose_counts,
    render_summary,
)
from gpu_check_plan import (  # noqa: E402
    BENCH_ARGS, BENCHES, DRY_BENCH_ARGS, DRY_LIMITS, DRY_RESOURCE_WORKLOADS, DRY_SMOKE_TESTS,
    DRY_TESTS, GPU_TESTS, LATE_BENCHES, LIMITS, RESOURCE_WORKLOADS, SMOKE_TESTS, STAGES,
)
from gpu_check_env import _PEERS, _now, _remove_build_locks, environment  # noqa: E402
from gpu_check_targets import render_targets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: the budget counts from here: the env stage (a cold ``import torch``, CUDA's start) is in it
STARTED = time.monotonic()

RESULT_FILES = ("results.jsonl", "summary.md", "gpu_check.log", "junit.xml", "junit_smoke.xml")


# ----------------------------------------------------------------------------- small helpers

def parse_limits(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--limit takes STAGE=SECONDS, got {item!r}")
        out[name.strip()] = float(value)
    return out


class Recorder:
    """Appends rows to results.jsonl (flushed per row), logs, and rewrites summary.md."""

    def __init__(self, results: Path, dry: bool, base: dict):
        self.dir = results
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dry = dry
        self.base = base  # device, commit, versions: added to every row
        self.rows: list[dict] = []
        self.started = time.monotonic()
        for name in ("results.jsonl", "gpu_check.log"):
            (self.dir / name).write_text("")

    def add(self, row: dict) -> None:
        row = {**row, **{k: v for k, v in self.base.items() if k not in row}}
        self.rows.append(row)
        with open(self.dir / "results.jsonl", "a") as f:
            f.write(json.dumps(row, default=str) + "\n")

    def log(self, text: str) -> None:
        with open(self.dir / "gpu_check.log", "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def summary(self, finished: bool) -> None:
        (self.dir / "summary.md").write_text(render_summary(self.rows, self.dry, finished,
                                                            time.monotonic() - self.started))


# ----------------------------------------------------------------------------- stage runner

class Runner:
    def __init__(self, args, rec: Recorder):
        self.args = args
        self.rec = rec
        self.dry = args.dry
        self.deadline = STARTED + args.budget
        self.limits = {**(DRY_LIMITS if self.dry else LIMITS), **parse_limits(args.limit)}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
        if self.dry:
            self.env.update(TRITON_INTERPRET="1", R1FAST_BENCH_INTERPRET="1")
        # every stage is a new process: the autotuners' choices are kept on disk between them
        self.env["TRITON_CACHE_AUTOTUNING"] = "1"
        capability = rec.base.get("capability")
        if capability:  # the extension for this GPU alone (an image's list may name archs
            self.env["TORCH_CUDA_ARCH_LIST"] = capability  # nvcc 13 no longer has)
        self.current: subprocess.Popen | None = None  # the stage's process, for SIGTERM
        self.current_stage: str | None = None
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self.ok = True
        self.tmp = Path(tempfile.mkdtemp(prefix="r1fast_gpu_check_"))

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def limit_for(self, stage: str) -> float:
        return max(0.0, min(self.limits.get(stage, 60.0), self.remaining() - 3.0))

    def run(self, stage: str, cmd: list[str], limit: float, env: dict | None = None
            ) -> tuple[str, int | None, str, float]:
        """Run ``cmd`` in its own process group (in this session: the device tool's limit
        ends it with this script); (status, rc, output, seconds). Its output goes
        straight into gpu_check.log (a run cut from outside still shows how far each stage
        got) and one progress line per start and end to stdout."""
        self.rec.log(f"\n===== {stage} ({_now()}, limit {limit:.0f} s)\n$ {' '.join(cmd)}")
        print(f"[gpu-check {_now()}] {stage}: start, limit {limit:.0f} s", flush=True)
        log = self.rec.dir / "gpu_check.log"
        t0 = time.monotonic()
        with open(log, "a") as sink:
            start = sink.tell()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=sink,
                                    stderr=subprocess.STDOUT, text=True, process_group=0)
            self.current, self.current_stage = proc, stage
            try:
                proc.wait(timeout=limit)
                status = "ok" if proc.returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                status = "timeout"
            finally:
                self.current = self.current_stage = None
        seconds = time.monotonic() - t0
        with open(log, errors="replace") as f:
            f.seek(start)
            out = f.read()
        self.rec.log(f"----- {stage}: {status} rc={proc.returncode} in {seconds:.1f} s")
        print(f"[gpu-check {_now()}] {stage}: {status} in {seconds:.0f} s", flush=True)
        return status, proc.returncode, out, seconds

    def stop_current(self) -> None:
        """Kill the running stage's process group (SIGTERM to this script: nothing outlives
        it on the GPU)."""
        if self.current is not None and self.current.poll() is None:
            os.killpg(self.current.pid, signal.SIGKILL)

    def cut(self, signum: int) -> None:
        """A signal ended the run (the command's time limit): the running stage is killed and
        recorded as ``timeout``, a benchmark with the rows it saved so far."""
        stage = self.current_stage
        self.stop_current()
        if stage is None:
            return
        n = self.add_bench_rows(stage[len("bench_"):], self.saved_rows(stage)) \
            if stage.startswith("bench_") else 0
        self.record(stage, "timeout", 0.0, 0.0, f"cut by signal {signum} (the command's time "
                    f"limit)" + (f"; {n} rows it saved" if n else ""), rows=n)

    def record(self, stage: str, status: str, seconds: float, limit: float, detail: str,
               **extra) -> None:
        if status not in ("ok", "skipped", "incomplete"):
            self.ok = False
        self.rec.add({"kind": "stage", "stage": stage, "status": status,
                      "seconds": round(seconds, 2), "limit_s": round(limit), "detail": detail,
                      **extra})
        self.rec.summary(finished=False)

    def out_of_time(self, stage: str) -> bool:
        if self.remaining() < 8:
            self.record(stage, "skipped", 0.0, self.limit_for(stage),
                        "no time left in the budget")
            return True
        return False

    # --------------------------------------------------------------------- stages

    def stage_install(self) -> None:
        stage = "install"
        if self.out_of_time(stage):
            return
        limit = self.limit_for(stage)
        t0 = time.monotonic()
        notes = []
        wh = self.args.wheelhouse
        pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
               "--no-build-isolation", "--disable-pip-version-check"]
        if self.dry:
            pip.append("--dry-run")
        installed_r1fast = False
        wheels_ok = True
        if wh:
            wheels = sorted(str(p) for p in Path(wh).glob("*.whl"))
            if wheels:
                status, rc, out, _ = self.run("install wheels", [*pip, "--find-links", wh,
                                                                 *wheels], limit)
                notes.append(f"{len(wheels)} wheels: {status}")
                if status != "ok":
                    wheels_ok = False
                    notes.append(_last_line(out))
            else:
                notes.append(f"no wheels in {wh}")
            status, rc, out, _ = self.run("install r1fast",
                                          [*pip, "--find-links", wh, "-e", str(ROOT)],
                                          max(5.0, limit - (time.monotonic() - t0)))
            installed_r1fast = status == "ok"
            notes.append(f"r1fast (pip -e): {status}")
            if status != "ok":
                notes.append(_last_line(out))
        else:
            notes.append("no wheelhouse given: nothing installed")
        # a fresh interpreter also sees what was just installed: the peers' versions
        check = [sys.executable, "-c", "import json, importlib.metadata as md\n"
                 "import r1fast.kernels, r1fast.csrc, r1fast.ops\n"
                 "def version(d):\n"
                 "    try:\n        return md.version(d)\n"
                 "    except md.PackageNotFoundError:\n        return None\n"
                 "print('PEERS_JSON ' + json.dumps({k: version(d) for k, d in PEER_LIST}))"
                 .replace("PEER_LIST", repr(_PEERS))]
        status, rc, out, _ = self.run("import check", check, 30)
        method = "pip" if installed_r1fast and not self.dry else "present"
        if status != "ok":
            overlay = self.make_overlay()
            self.env["PYTHONPATH"] = os.pathsep.join([str(overlay), self.env["PYTHONPATH"]])
            status, rc, out, _ = self.run("import check (overlay)", check, 30)
            method = f"overlay {overlay}"
        notes.append(f"r1fast imports: {status} ({method})")
        peers = _marker_json(out, "PEERS_JSON") or {}
        self.rec.rows[0].update(peers)  # the env row: the summary shows the installed peers
        self.record(stage, "ok" if status == "ok" and wheels_ok else "failed",
                    time.monotonic() - t0, limit,
                    "; ".join(notes), wheelhouse=wh, method=method, peers=peers)

    def make_overlay(self) -> Path:
        """``<tmp>/r1fast`` mirroring the installed layout with links into the checkout."""
        top = self.tmp / "overlay"
        pkg = top / "r1fast"
        pkg.mkdir(parents=True, exist_ok=True)
        for entry in (ROOT / "r1fast").iterdir():
            if entry.name != "__pycache__" and not (pkg / entry.name).exists():
                (pkg / entry.name).symlink_to(entry)
        for name, src in (("kernels", ROOT / "kernels"), ("csrc", ROOT / "csrc")):
            if not (pkg / name).exists():
                (pkg / name).symlink_to(src)
        return top

    def stage_build(self) -> None:
        stage = "build"
        if self.out_of_time(stage):
            return
        limit = self.limit_for(stage)
        code = ("import json, time\n"
                "from r1fast.ops import _cuda_ext\n"
                "t0 = time.monotonic()\n"
                "ops = list(_cuda_ext._OPS)\n"
                "res = {op: _cuda_ext.missing(op) for op in ops}\n"
                "print('BUILD_JSON ' + json.dumps({'missing': res, "
                "'seconds': time.monotonic() - t0}))\n")
        status, rc, out, secs = self.run(stage, [sys.executable, "-c", code], limit)
        info = _marker_json(out, "BUILD_JSON") or {}
        missing = info.get("missing") or {}
        reasons = sorted({v for v in missing.values() if v})
        if status == "ok" and reasons:
            # no CUDA here is expected in dry mode; a failed build on a GPU is a failure
            status = "skipped" if self.dry or not self._cuda() else "failed"
        detail = "; ".join(reasons) if reasons else (
            f"extension built/loaded for {', '.join(missing)}" if missing else _last_line(out))
        if status in ("failed", "timeout") and not self.dry:
            # later processes would each compile again (or wait on a killed build's lock)
            self.env["R1FAST_CUDA_EXT"] = "0"
            removed = _remove_build_locks(self.env)
            detail += (f"; later stages run with R1FAST_CUDA_EXT=0 (Triton paths)"
                       f"{f', removed {removed} stale build lock(s)' if removed else ''}")
        self.record(stage, status, secs, limit, detail, missing=missing,
                    build_seconds=info.get("seconds"))

    def stage_tests(self, stage: str = "tests") -> None:
        """``tests``: the GPU test files; ``smoke``: the few that run before the benchmarks
        (``-x``: the first failure ends it, the benchmarks still run)."""
        if self.out_of_time(stage):
            return
        limit = self.limit_for(stage)
        junit = self.rec.dir / ("junit.xml" if stage == "tests" else f"junit_{stage}.xml")
        if stage == "smoke":
            files = ["-x", *(DRY_SMOKE_TESTS if self.dry else SMOKE_TESTS)]
        else:
            files = DRY_TESTS if self.dry else GPU_TESTS
        if junit.exists():
            junit.unlink()
        # -v: one line per test, so a run cut short still says what passed (junit is written
        # only at the end)
        cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "not slow",
               "--tb=line", f"--junitxml={junit}", *files]
        status, rc, out, secs = self.run(stage, cmd, limit)
        counts = _junit_counts(junit) or _verbose_counts(out)
        if status == "failed" and rc == 5:  # no test collected
            detail = "no tests collected"
        else:
            detail = ", ".join(f"{v} {k}" for k, v in counts.items()
                               if k not in ("failures_list", "partial"))
            if counts.get("partial"):
                detail += " (no JUnit file: counted from the log, run cut short)"
        self.record(stage, status, secs, limit, detail,
                    **{k: v for k, v in counts.items()})

    def stage_bench(self, name: str) -> None:
        stage = f"bench_{name}"
        if self.out_of_time(stage):
            return
        limit = self.limit_for(stage)
        script = ROOT / "bench" / f"bench_{name}.py"
        if not script.exists():
            self.record(stage, "skipped", 0.0, limit, f"no {script.name}")
            return
        args = (DRY_BENCH_ARGS if self.dry else BENCH_ARGS)[name]
        status, out, secs, files = self.run_writing_rows(
            stage, [sys.executable, str(script), *args], limit)
        n = self.add_bench_rows(name, files)
        detail = f"{n} rows" + ("" if status == "ok" else f"; {_last_line(out)}")
        self.record(stage, status, secs, limit, detail, rows=n)

    def run_writing_rows(self, stage: str, cmd: list[str], limit: float
                         ) -> tuple[str, str, float, list[tuple[str, list[dict]]]]:
        """Run a script that saves JSON rows through bench/harness.py's ``save_rows`` into a
        folder of its own (``R1FAST_BENCH_RESULTS``); ``(status, output, seconds, [(file
        name, rows)])``, with whatever it saved before a failure or its time limit."""
        out_dir = self.tmp / stage
        out_dir.mkdir(parents=True, exist_ok=True)
        self.env["R1FAST_BENCH_RESULTS"] = str(out_dir)
        status, _, out, secs = self.run(stage, cmd, limit)
        return status, out, secs, self.saved_rows(stage)

    def saved_rows(self, stage: str) -> list[tuple[str, list[dict]]]:
        """``[(file name, rows)]`` a stage's script saved (``R1FAST_BENCH_RESULTS``)."""
        files = []
        for path in sorted((self.tmp / stage).glob("*.json")):
            try:
                files.append((path.name, json.loads(path.read_text())))
            except (OSError, ValueError):
                continue
        return files

    def add_bench_rows(self, name: str, files: list[tuple[str, list[dict]]]) -> int:
        """Benchmark ``name``'s saved rows into results.jsonl; how many."""
        rows = [(file, row) for file, file_rows in files for row in file_rows]
        for file, row in rows:
            self.rec.add({"kind": "bench", "bench": name, "file": file, **row})
        return len(rows)

    def stage_sanitizer(self) -> None:
        stage = "sanitizer"
        if self.out_of_time(stage):
            return
        limit = self.limit_for(stage)
        script = [sys.executable, str(ROOT / "scripts" / "sanitize_ops.py")]
        sanitizer = shutil.which("compute-sanitizer") or next(
            (str(p) for p in (Path("/usr/local/cuda/bin/compute-sanitizer"),) if p.exists()), None)
        if self.dry or sanitizer is None:
            status, rc, out, secs = self.run(stage, script, limit)
            why = "dry mode" if self.dry else "no compute-sanitizer on PATH or in /usr/local/cuda"
            ran = out.count("SANITIZE_OK")
            # the ops ran, the sanitizer did not: never reported as a sanitizer pass
            self.record(stage, "skipped" if status == "ok" else status, secs, limit,
                        f"{why}: {ran} op runs without compute-sanitizer"
                        + ("" if status == "ok" else f"; {_last_line(out)}"))
            return
        results, t_all = {}, 0.0
        for tool in ("memcheck", "racecheck"):
            cmd = [sanitizer, "--tool", tool, "--error-exitcode", "3", "--print-limit", "20",
                   *script]
            # torch's caching allocator hands out pieces of larger blocks: an access past a
            # tensor's end inside its block is invisible to memcheck without this
            env = {**self.env, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
            status, rc, out, secs = self.run(f"{stage}_{tool}", cmd, limit / 2, env)
            t_all += secs
            summary = re.search(r"ERROR SUMMARY: (\d+) error", out)
            # the summary comes at exit: a run cut by its limit has only the error lines it
            # printed (a headline each, its details indented)
            headlines = re.findall(r"^========= (?!COMPUTE-SANITIZER|ERROR SUMMARY| )\S", out,
                                   flags=re.M)
            results[tool] = {"status": status, "rc": rc, "op_runs": out.count("SANITIZE_OK"),
                             "errors": int(summary.group(1)) if summary else len(headlines)}
        ok = all(r["status"] == "ok" and r["errors"] == 0 for r in results.values())
        # a tool cut by its time limit with no error found so far proves less, not a defect
        cut = all(r["status"] in ("ok", "timeout") and r["errors"] == 0
                  for r in results.values())
        detail = "; ".join(f"{t}: {r['op_runs']} op runs, {r['errors']} errors ({r['status']})"
                           for t, r in results.items())
        self.record(stage, "ok" if ok else "incomplete" if cut else "failed", t_all, limit,
                    detail, sanitizer=results)

    def stage_resources(self) -> None:
        stage = "resources"
        if self.out_of_time(stage):
            return
        limit = self.limit_for(stage)
        workloads = DRY_RESOURCE_WORKLOADS if self.dry else RESOURCE_WORKLOADS
        script = ROOT / "bench" / "kernel_resources.py"
        status, out, secs, files = self.run_writing_rows(
            stage, [sys.executable, str(script), "--workloads", *workloads], limit)
        rows = [row for _, file_rows in files for row in file_rows]
        for row in rows:
            self.rec.add({"kind": "resources", **row})
        spilling = sum(1 for r in rows if r.get("spills_in_loops"))
        detail = (f"{len(rows)} kernels, {spilling} with spills inside a loop"
                  + ("" if status == "ok" else f"; {_last_line(out)}"))
        self.record(stage, status, secs, limit, detail, rows=len(rows))

    def _cuda(self) -> bool:
        return bool(self.rec.base.get("cuda_available"))


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", required=True, help="folder for the result files")
    p.add_argument("--wheelhouse", default=None, help="folder of wheels to install offline")
    dry = p.add_mutually_exclusive_group()
    dry.add_argument("--dry", dest="dry", action="store_true", default=None,
                     help="tiny shapes + Triton interpreter (default without CUDA)")
    dry.add_argument("--no-dry", dest="dry", action="store_false")
    p.add_argument("--budget", type=float, default=510.0, help="seconds for all stages")
    p.add_argument("--limit", action="append", default=[], metavar="STAGE=SECONDS",
                   help="override one stage's limit (bench stages: bench_<name>)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {STAGES}")
    p.add_argument("--benches", default=",".join(BENCHES),
                   help=f"comma-separated subset of {BENCHES}")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.wheelhouse == "":
        args.wheelhouse = None
    if args.dry is None:
        try:
            import torch

            args.dry = not torch.cuda.is_available()
        except ImportError:
            args.dry = True
    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"
    only = set((args.only or ",".join(STAGES)).split(","))
    unknown = only - set(STAGES)
    if unknown:
        raise SystemExit(f"--only: unknown stages {sorted(unknown)}; choose from {STAGES}")
    benches = [b for b in args.benches.split(",") if b]
    bad = set(benches) - set(BENCHES)
    if bad:
        raise SystemExit(f"--benches: unknown {sorted(bad)}; choose from {BENCHES}")
    results = Path(args.results).resolve()
    t0 = time.monotonic()
    env = environment(args.dry)
    base = {k: env.get(k) for k in ("device", "git_commit", "torch", "cuda_runtime", "nvcc",
                                    "python", "dry", "cuda_available", "capability")}
    base["triton_version"] = env.get("have_triton")
    rec = Recorder(results, args.dry, base)
    rec.add({"kind": "env", **env})
    rec.add({"kind": "stage", "stage": "env", "status": "ok",
             "seconds": round(time.monotonic() - t0, 2), "limit_s": LIMITS["env"],
             "detail": f"{env.get('device')}; torch {env.get('torch')}"})
    rec.summary(finished=False)
    runner = Runner(args, rec)

    cut: list[int] = []

    def terminated(signum, frame):  # the device tool's limit: end the stage with this script
        cut.append(signum)
        runner.cut(signum)
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, terminated)
    try:
        if "install" in only:
            runner.stage_install()
        if "build" in only:
            runner.stage_build()
        if "smoke" in only:
            runner.stage_tests("smoke")
        if "bench" in only:
            for name in (b for b in benches if b not in LATE_BENCHES):
                runner.stage_bench(name)
        if "tests" in only:
            runner.stage_tests()
        if "bench" in only:
            for name in (b for b in benches if b in LATE_BENCHES):
                runner.stage_bench(name)
        if "sanitizer" in only:
            runner.stage_sanitizer()
        if "resources" in only:
            runner.stage_resources()
    finally:
        rec.summary(finished=not cut)
        shutil.rmtree(runner.tmp, ignore_errors=True)
    print((results / "summary.md").read_text())
    # once more last, where the tail of a long log shows it
    print("\n".join(["## Targets (issue #18)", "", *render_targets(rec.rows)]))
    return 0 if runner.ok else 1


if __name__ == "__main__":
    sys.exit(main())
