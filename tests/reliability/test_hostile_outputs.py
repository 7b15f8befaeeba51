"""Hostile model outputs against every rule reward, through the runner as training uses it:
every call ends (no hang), scores a finite number within the reward's range or is a counted
failure scored 0, and the batch never raises."""
import math
import time

import pytest

from r1fast.rewards import CompositeReward, RewardRunner, get_reward

pytestmark = pytest.mark.reliability

NEST = "(" * 400 + "1" + ")" * 400
HOSTILE = [
    "",
    "\x00" * 1000,
    "<think>" * 5000,
    "</think>\\boxed{" + "{" * 2000,
    "</think>\\boxed{" + NEST + "}",
    "</think>\\boxed{9^{9^{9^{9}}}}",
    "</think>\\boxed{10^{100000}}",
    "</think>\\boxed{" + "x+" * 3000 + "x}",
    "</think>\\boxed{\\frac{1}{0}}",
    "</think>\\boxed{４２}",                    # fullwidth digits
    "</think>\\boxed{42}" * 20000,             # long
    "<answer>__import__('os').system('echo pwned')</answer>",
    "<answer>" + "(" * 300 + "1+2" + ")" * 300 + "</answer>",
    "<answer>1e999999 - 1e999999</answer>",
    "<think>{}{0}%s%n</think><answer>{self.__class__}</answer>",
    "\ud800\udfff lone surrogates",
    "\u202e\u0645\u0631\u062d\u0628\u0627 mixed scripts 你好",
    "\\boxed{" * 100 + "42" + "}" * 100,
]


def test_every_rule_reward_survives_hostile_outputs():
    parts = [(name, get_reward(name), 1.0)
             for name in ("math_accuracy", "countdown", "format", "language")]
    example = {"answer": "42", "numbers": [1, 2, 3, 4], "target": 10, "prompt": "Solve"}
    runner = RewardRunner(CompositeReward(parts), num_workers=2, timeout_s=20.0,
                          cpu_time_s=5.0)
    t0 = time.monotonic()
    with runner:
        out = runner(HOSTILE, [example] * len(HOSTILE))
    assert time.monotonic() - t0 < 120
    for name, values in out.parts.items():
        for text, v, status in zip(HOSTILE, values, out.status[name]):
            assert math.isfinite(v) and -1.0 <= v <= 1.0, (name, text[:40], v)
            assert status in ("ok", "error", "timeout"), (name, text[:40], status)
    # nothing hostile scored as correct (two inputs do hold a plain boxed 42)
    may_be_right = {HOSTILE.index("</think>\\boxed{42}" * 20000), len(HOSTILE) - 1}
    for i, v in enumerate(out.parts["math_accuracy"]):
        if i not in may_be_right:
            assert v == 0.0, HOSTILE[i][:60]
    assert all(math.isfinite(t) for t in out.total)
