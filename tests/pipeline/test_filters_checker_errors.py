"""Rejection sampling's checkers: looked up before any sample is scored and only when the rules
need correctness, a checker that fails on one sample drops that sample (``checker_error``,
named in the summary, one WARNING) instead of ending the stage, and a check that runs out of
CPU time is counted as ``timeout``, not ``wrong``."""
import json
import logging
import time

import pytest

from r1fast.pipeline.evaluate import checker
from r1fast.pipeline.filters import (REASONS, RejectionFilterConfig, filter_samples,
                                     format_summary, resolve_checkers)

MATH_EX = {"prompt": "Q: 2 + 3 = ?\nA: ", "answer": "5", "id": "a.jsonl:0", "row": 0}
GOOD = "<think>First add the ones: 2 + 3 = 5.</think> \\boxed{5}"
COUNTDOWN_NO_NUMBERS = {"prompt": "Reach 7.", "target": 7, "reward": "countdown",
                        "id": "c.jsonl:3", "row": 3}
JUDGED = {"prompt": "Greet me.", "reward": "reward_model", "id": "b.jsonl:1", "row": 1}


def balanced(summary):
    return summary["kept"] + sum(summary["rejected"].values()) + summary["over_limit"] \
        == summary["samples"]


def real_checkers(ex):
    """What the stage passes: the example's own reward, built by name (cached)."""
    return checker(ex, real_checkers.cache)


real_checkers.cache = {}


def test_an_unbuildable_checker_fails_before_any_sample_is_scored():
    calls = []

    def checker_for(ex):
        if ex.get("reward") is None:
            return lambda text, e: calls.append(text) or 1.0
        return real_checkers(ex)

    with pytest.raises(ValueError) as err:
        filter_samples([MATH_EX, JUDGED], [[GOOD], [GOOD]], checker_for,
                       RejectionFilterConfig.for_keep("correct"))
    msg = str(err.value)
    assert "\n" not in msg and calls == []  # no sample of the good first row was scored
    assert "example 1 (id 'b.jsonl:1')" in msg and "'reward_model'" in msg
    assert "needs a trained model" in msg and "'countdown'" in msg and "'rule'" in msg
    # the same check, callable before sampling
    with pytest.raises(ValueError, match=r"example 0 \(id 'x'\) has reward 'nope'"):
        resolve_checkers([{"id": "x", "reward": "nope"}], real_checkers, RejectionFilterConfig())


@pytest.mark.parametrize("keep", ["all", "well_formed"])
def test_modes_that_score_no_answer_never_build_a_checker(keep):
    def checker_for(ex):
        raise AssertionError("no checker is needed without require_correct")

    rows, s = filter_samples([JUDGED, MATH_EX], [[GOOD], [GOOD]], checker_for,
                             RejectionFilterConfig.for_keep(keep))
    assert s["kept"] == 2 and len(rows) == 2 and balanced(s)
    # with the stage's real lookup too: a reward_model row no longer crashes these modes
    _, s = filter_samples([JUDGED], [[GOOD]], real_checkers, RejectionFilterConfig.for_keep(keep))
    assert s["kept"] == 1
    assert resolve_checkers([JUDGED], checker_for, RejectionFilterConfig.for_keep(keep)) == [None]


def test_a_failing_checker_drops_its_samples_and_the_stage_goes_on(caplog):
    examples = [MATH_EX, COUNTDOWN_NO_NUMBERS, {**MATH_EX, "id": "a.jsonl:1"}]
    samples = [[GOOD, GOOD.replace("5", "6")], ["<think>x</think> \\boxed{7}"] * 3, [GOOD]]
    with caplog.at_level(logging.WARNING, logger="r1fast.pipeline"):
        rows, s = filter_samples(examples, samples, real_checkers, RejectionFilterConfig())
    assert s["rejected"]["checker_error"] == 3 and s["rejected"]["wrong"] == 1
    assert s["kept"] == 2 and [r["id"] for r in rows] == ["a.jsonl:0", "a.jsonl:1"]
    assert balanced(s) and s["samples"] == 6 and list(s["rejected"]) == list(REASONS)
    first = s["first_checker_error"]
    assert first == {"example": 1, "id": "c.jsonl:3", "reward": "countdown",
                     "error": "ValueError: countdown example has no 'numbers' field"}
    json.dumps(s)  # the summary file is still written
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "failed on 3 of 6 samples" in warnings[0] and "c.jsonl:3" in warnings[0]
    assert "no 'numbers' field" in warnings[0]
    table = format_summary(s)
    assert "checker_error" in table and "first checker_error: example 1 (id 'c.jsonl:3')" in table


@pytest.mark.parametrize("value, says", [(None, "NoneType None, not a number"),
                                         (float("nan"), "non-finite value nan")])
def test_a_checker_returning_no_number_is_a_checker_error(value, says):
    """NaN < 1 is False: the old comparison kept such a sample as correct."""
    rows, s = filter_samples([MATH_EX], [[GOOD]], lambda ex: lambda t, e: value,
                             RejectionFilterConfig())
    assert rows == [] and s["rejected"]["checker_error"] == 1 and balanced(s)
    assert says in s["first_checker_error"]["error"]


def burn_cpu(*args, **kwargs):
    """A check that never ends by itself (a safety stop at 20 CPU s, so a broken limit fails
    the test rather than hanging it)."""
    start = time.thread_time()
    while time.thread_time() - start < 20:
        pass
    return True


def test_a_check_out_of_cpu_time_is_a_timeout_not_wrong(caplog):
    cfg = RejectionFilterConfig(checker_cpu_time_s=0.2)
    with caplog.at_level(logging.WARNING, logger="r1fast.pipeline"):
        rows, s = filter_samples([MATH_EX], [[GOOD, GOOD + " "]],
                                 lambda ex: lambda t, e: burn_cpu(), cfg)
    assert rows == [] and s["rejected"]["timeout"] == 2 and s["rejected"]["wrong"] == 0
    assert balanced(s) and s["first_checker_error"] is None
    assert s["rules"]["checker_cpu_time_s"] == 0.2
    assert any("dropped as timeout" in r.getMessage() for r in caplog.records)


def test_math_accuracy_stuck_in_math_verify_counts_as_timeout(monkeypatch):
    """Math accuracy alone scores an answer whose symbolic check runs out of time as wrong;
    under the stage's own limit the timeout reaches the filter and is counted apart."""
    pytest.importorskip("math_verify")
    monkeypatch.setattr("math_verify.verify", burn_cpu)
    ex = {**MATH_EX, "answer": "\\sqrt{2}"}
    text = "<think>The root.</think> \\boxed{\\sqrt{2}}"
    start = time.thread_time()
    _, s = filter_samples([ex], [[text]], real_checkers,
                          RejectionFilterConfig(checker_cpu_time_s=0.3))
    assert s["rejected"]["timeout"] == 1 and s["rejected"]["wrong"] == 0
    assert time.thread_time() - start < 10


def test_bad_checker_time_limit():
    with pytest.raises(ValueError, match="checker_cpu_time_s must be in"):
        RejectionFilterConfig(checker_cpu_time_s=-1)


def test_the_stage_checks_the_checkers_before_loading_the_model(tmp_path):
    """stages.rejection_sample resolves every checker before the model is even loaded: the
    model folder here does not exist, and the error is the row's, not the folder's."""
    from r1fast.pipeline import stages

    with pytest.raises(ValueError, match=r"example 1 \(id 'b.jsonl:1'\) has reward "
                                         r"'reward_model'"):
        stages.rejection_sample(tmp_path / "no_model", [MATH_EX, JUDGED], tmp_path / "rs.jsonl")
