"""Hostile reward functions for the worker/runner tests (module-level so spawned workers can
unpickle them by name)."""
import subprocess
import sys
import time


def spin(seconds_cpu_hint: float = 1e9) -> float:
    """Burns CPU in Python until stopped (or for about ``seconds_cpu_hint`` seconds of this
    thread's CPU: other threads of the process must not end it early)."""
    t0 = time.thread_time()
    x = 0
    while time.thread_time() - t0 < seconds_cpu_hint:
        x += 1
    return 1.0


def sleep_then_one(seconds: float) -> float:
    """Waits ``seconds`` of wall time using no CPU: a loaded machine looks like this."""
    time.sleep(seconds)
    return 1.0


def child_then_spin(pid_file: str) -> float:
    """Starts a long-lived child process (writes its pid), then never returns."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(pid_file, "w") as f:
        f.write(str(child.pid))
    while True:
        time.sleep(0.05)


def spin_reward(completion: str, example: dict) -> float:
    return spin()


def sleepy_reward(completion: str, example: dict) -> float:
    return sleep_then_one(float(example.get("sleep", 0.5)))
