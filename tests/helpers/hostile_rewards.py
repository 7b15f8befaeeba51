"""Reward functions that misbehave the way real reward code does, importable by the spawned
reward workers (tests/rewards/test_workers.py)."""
from __future__ import annotations

import os
import time

_KEPT: list[bytearray] = []


def leak_150mb(completion: str, example: dict) -> float:
    """Keeps 150 MB per call (a cache that never empties)."""
    _KEPT.append(bytearray(150 * 1024 * 1024))
    return 1.0


def fork_and_return(value: float) -> float:
    """Forks (a sandbox for generated code) and, on one path, returns in the child instead of
    exiting: the child would serve the worker's pipe with its own answer."""
    if os.fork() == 0:
        return -1.0
    time.sleep(0.2)
    return float(value)
