"""A fork server that kills GRPO resumes with SIGKILL, for the kill-during-resume test.

Run as ``python tests/helpers/resume_killer.py``. It imports torch, megatron-core and r1fast
once (seconds), then reads one JSON request per line on stdin and answers one JSON line on
stdout per request. Each request forks a child that starts a GRPO run over an existing run
folder, which resumes from its checkpoint; the child's "window" runs from the start of
``GRPOTrainer(...)`` (checkpoint lookup, model build, checksum verification, distributed load,
RNG restore, metrics truncation) through ``fit()``'s start-up, up to the first training step,
where it stops (``os._exit``) without training or saving. Requests::

    {"run_dir": str, "overrides": [str], "mode": "record"}
        -> {"status": "passed", "window_s": float, "events": [str], "times": [float]}
           (the window's file-system events and when each came, in s from the window's start)
    {"run_dir": ..., "overrides": ..., "mode": "event", "k": int}
        -> {"status": "killed" | "passed"}: SIGKILL just before the k-th file-system event
    {"run_dir": ..., "overrides": ..., "mode": "timer", "after_s": float[, "k": int]}
        -> {"status": "killed" | "passed"}: this server SIGKILLs the child after_s after its
           window started, or with k, after_s after the child began its k-th event

A file-system event is a Python audit event (``open``, ``os.replace``, ``os.remove``,
``os.mkdir``, ``os.listdir``, ...) naming a path inside the run folder; killing just before
event k is killing just after event k-1 completed, so the events enumerate every boundary
between the resume's file operations. Events that may change the folder (an open for writing, a
rename, a removal) end in `` w``. A timer kill lands anywhere, in the middle of a write too.
"passed" means the child reached the end of its window first.

Why a fork server: a fresh interpreter per kill would pay the ~5 s megatron import each time.
Forking is safe here because this process only imports (one thread, no process group, no
OpenMP pool: OMP_NUM_THREADS=1); the parent of a process that ran gloo threads could hang its
forked child on an inherited lock.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import threading
import time
import traceback

BASE = ["--model.vocab_size=128", "--data.prompts_per_step=1", "--algo.group_size=2",
        "--rollout.max_new_tokens=4", "--reward.workers=0", "--run.progress=false",
        "--run.tensorboard=false", "--data.num_train=16", "--algo.kl_coef=0",
        "--optim.lr=0.003"]
"""The tiny GRPO run of the reliability tests; lr high enough that every step moves weights."""

FS_EVENTS = {"open", "os.replace", "os.rename", "os.remove", "os.rmdir", "os.mkdir",
             "os.truncate", "os.listdir", "os.scandir", "shutil.rmtree", "shutil.move",
             "os.symlink", "os.link", "os.chmod"}


def varied_reward(completion: str, example: dict) -> float:
    """Rewards that differ within a group from the first step (a random tiny policy never
    solves the task), so every step has a policy gradient and changes the weights."""
    return (sum(map(ord, completion)) % 7) / 6.0


def run_config(run_dir: str, overrides: list[str]):
    from r1fast.train.config import load_train_config

    return load_train_config(None, [*BASE, f"--run.out_dir={run_dir}", *overrides])


def _event_name(event: str, args: tuple, root: str) -> str | None:
    """``"<event> <path relative to the run folder>"``, with ``w`` appended when the event may
    change the folder (an open for writing, a rename, a removal, ...), or None when the event
    touches no path inside the run folder."""
    if event not in FS_EVENTS or not args:
        return None
    path = args[0]
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if isinstance(path, bytes):
        path = path.decode(errors="replace")
    if not isinstance(path, str):
        return None  # a file descriptor
    path = os.path.abspath(path)
    if path != root and not path.startswith(root + os.sep):
        return None
    name = f"{event} {os.path.relpath(path, root)}"
    if event == "open":
        mode, flags = args[1], args[2]
        writes = (any(c in mode for c in "wax+") if isinstance(mode, str)
                  else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC)))
    else:
        writes = event not in ("os.listdir", "os.scandir")
    return f"{name} w" if writes else name


def _child(req: dict, report_fd: int) -> None:
    """The resume window in a forked child; never returns."""
    os.dup2(2, 1)  # stdout is the server's answer channel: the child's prints go to stderr
    root = os.path.abspath(req["run_dir"])
    events: list[str] = []
    times: list[float] = []
    at = req.get("k")

    def hook(event: str, args: tuple) -> None:
        name = _event_name(event, args, root)
        if name is None:
            return
        events.append(name)
        times.append(time.perf_counter() - start)
        if len(events) == at:
            if req["mode"] == "event":
                os.kill(os.getpid(), signal.SIGKILL)
            os.write(report_fd, b"K\n")  # the server's timer runs from here

    from r1fast.train.grpo import GRPOTrainer

    cfg = run_config(root, req["overrides"])

    def window_end(self):
        report = {"status": "passed", "window_s": time.perf_counter() - start, "events": events,
                  "times": times}
        os.write(report_fd, (json.dumps(report) + "\n").encode())
        os._exit(0)  # no training, no save, no cleanup: the window is over

    GRPOTrainer.step = window_end
    start = time.perf_counter()
    sys.addaudithook(hook)
    os.write(report_fd, b"S\n")  # the window starts (the server's timer runs from here)
    GRPOTrainer(cfg, reward=varied_reward).fit()
    os._exit(3)  # fit() returned without a step: the run was already at its end


def _read_line(fd: int) -> bytes:
    """One line from a pipe, byte by byte (no buffer may swallow the next line); what came
    before end of file when the writer died first."""
    out = b""
    while not out.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        out += chunk
    return out


def _serve(req: dict) -> dict:
    """Fork a child for ``req``, kill it as asked, and say how it ended."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            _child(req, write_fd)
        except BaseException:  # the child must never return into the server's loop
            traceback.print_exc()  # on stderr, which the test shows when a request fails
        os._exit(4)
    os.close(write_fd)
    line = _read_line(read_fd)  # b"S\n": its window starts
    if line == b"S\n" and req["mode"] == "timer" and req.get("k"):
        line = _read_line(read_fd)  # b"K\n": it is about to do its k-th operation
    if line in (b"S\n", b"K\n") and req["mode"] == "timer":
        time.sleep(req["after_s"])
        os.kill(pid, signal.SIGKILL)  # a child that already exited is a zombie: no error
    # the report (a child that ends its window before k events: the line just read)
    report = line if line.startswith(b"{") else _read_line(read_fd)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return {"status": "killed"}
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and report:
        return json.loads(report)
    return {"status": "error", "wait_status": status}


def main() -> None:
    # everything a child's window imports, imported once here, before any fork
    for module in ("megatron.core.dist_checkpointing", "r1fast.policy",
                   "r1fast.policy.dist_ckpt", "r1fast.train.grpo"):
        importlib.import_module(module)
    threads = [t.name for t in threading.enumerate()]
    if len(threads) > 1:  # a forked child could hang on a lock another thread holds
        print(json.dumps({"status": "not fork-safe", "threads": threads}), flush=True)
        return
    print(json.dumps({"status": "ready"}), flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(_serve(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
