"""The eval.jsonl row's log line and its change since step 0 (r1fast.train.held_out), without a
model: the rows are written by hand."""
import math

import pytest

from r1fast.train.held_out import describe, since_start


def row(step, per_problem, **extra):
    n = len(per_problem)
    mean = sum(per_problem) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in per_problem) / (n - 1) / n)
    return {"step": step, "held_out": "t.jsonl", "num_problems": n, "k": 4, "seed": 7,
            "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 32, "held_out_dropped": 0,
            "pass_at_1": mean, "pass_at_1_se": se, "cons_at_k": mean, "cons_at_k_se": se,
            "per_problem": {"pass_at_1": per_problem, "cons_at_k": per_problem}, **extra}


def test_change_since_step_0_is_paired_over_problems():
    start = row(0, [0.0, 0.25, 0.5, 1.0])
    later = row(5, [0.25, 0.5, 0.75, 1.0])
    change = since_start(later, start)
    # every problem rose by 0.25 but the last (0): the paired SE is that of [.25,.25,.25,0]
    assert change["pass_at_1"] == pytest.approx(0.1875)
    assert change["pass_at_1_se"] == pytest.approx(math.sqrt(0.1875 * 0.0625 * 4 / 3 / 4))
    assert change["pass_at_1_se"] < math.hypot(start["pass_at_1_se"], later["pass_at_1_se"])
    # scored another way (other samples per problem, seed, problems): no change is claimed
    for key, value in (("k", 8), ("seed", 1), ("num_problems", 3), ("held_out", "u.jsonl")):
        assert since_start({**later, key: value}, start) is None


def test_log_line_says_what_the_scores_are_over():
    start = row(0, [0.0, 0.5, 1.0])
    later = row(4, [0.5, 0.5, 1.0], held_out_dropped=2)
    later["vs_step_0"] = since_start(later, start)
    text = describe(later)
    assert text.startswith("eval at step 4: pass@1 0.667 +- 0.167, cons@4 0.667 +- 0.167 "
                           "(3 problems x 4 samples of t.jsonl (2 dropped by "
                           "data.max_prompt_tokens), seed 7); since step 0: pass@1 +0.167 +- ")
    assert "dropped" not in describe(start) and "since step 0" not in describe(start)
