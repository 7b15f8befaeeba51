"""Countdown reward: TinyZero scoring, exactly/at-most-once, hostile equations."""
import itertools

import pytest
from hypothesis import given, settings, strategies as st

from r1fast.rewards.countdown import CountdownReward, CountdownRewardConfig, check_equation

EX = {"numbers": [3, 7, 25, 50], "target": 71}
R = CountdownReward()


def box(eq):
    return f"<think>try things</think> \\boxed{{{eq}}}"


@pytest.mark.parametrize("eq", [
    "(50 + 25) - (7 - 3)", "50 + 25 - 7 + 3", "(50+25)-(7-3) = 71", "71 = (50+25)-(7-3)",
    "{50 + 25} - {7 - 3}", "\\left(50 + 25\\right) - (7 - 3)", "3 - 7 + 25 + 50",
])
def test_correct(eq):
    assert R(box(eq), EX) == 1.0


@pytest.mark.parametrize("eq", [
    "50 + 25 - 7",                     # 3 unused (exactly-once default)
    "50 + 25 - 7 + 3 + 3 - 3",         # 3 reused
    "50 + 21",                         # 21 not given
    "(50 + 25) - (7 - 3) = 70",        # wrong stated result
    "50 + 25 + 7 + 3",                 # wrong value
    "50 / (7 - 7) + 25 + 3",           # division by zero (and 7 reused)
    "50 / (3 - 3) + 25 + 7",
    "__import__('os').system('echo hi')",
    "50 + 25 - 7 + ３",                # fullwidth digit
    "50 + 25 - 7 + 3.0",               # decimals are not allowed
    "-(7 - 3) + 50 + 25",              # unary minus is not allowed
    "50 + 25 - 7 ** 1 + 3",            # no powers
    "(" * 500 + "50" + ")" * 500 + " + 25 - 7 + 3",   # too deep / too long
    "9**9**9",
    "10^100000",
    "a = b = c",
    "1" * 300,
])
def test_wrong_gets_format_score(eq):
    assert R(box(eq), EX) == pytest.approx(0.1)


def test_no_answer_gets_zero():
    assert R("", EX) == 0.0
    assert R("<think>no idea", EX) == 0.0
    assert R("<think>t</think>   ", EX) == 0.0


def test_at_most_once_flag():
    lenient = CountdownReward(exactly_once=False)
    assert lenient(box("50 + 25 - 7 + 3"), EX) == 1.0
    assert lenient(box("(50 + 21)"), {"numbers": [50, 21, 4], "target": 71}) == 1.0
    assert lenient(box("50 + 50 - 29"), {"numbers": [50, 21, 4], "target": 71}) == pytest.approx(0.1)
    assert R(box("(50 + 21)"), {"numbers": [50, 21, 4], "target": 71}) == pytest.approx(0.1)


def test_exact_rational_evaluation():
    # 6 / 4 * 2 is exactly 3; a float evaluator agrees here but exactness is what we rely on
    assert check_equation("6 / 4 * 2", [6, 4, 2], 3)
    assert not check_equation("1 / 3 * 3 - 1 + 3", [1, 3, 3, 1, 3], 2)  # = 3 exactly, not 2


def test_repeated_number_in_given_set():
    ex = {"numbers": [5, 5, 2], "target": 12}
    assert R(box("5 + 5 + 2"), ex) == 1.0
    assert R(box("5 * 2 + 2"), ex) == pytest.approx(0.1)


def test_scores_configurable():
    r = CountdownReward(correct_score=2.0, format_score=0.0)
    assert r(box("50 + 25 - 7 + 3"), EX) == 2.0
    assert r(box("50 + 25"), EX) == 0.0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=2, max_size=4), st.data())
def test_any_left_fold_scores_one(nums, data):
    ops = data.draw(st.lists(st.sampled_from("+-*"), min_size=len(nums) - 1, max_size=len(nums) - 1))
    expr, value = str(nums[0]), nums[0]
    for op, x in zip(ops, nums[1:]):  # independent evaluation of ((a op b) op c) ...
        value = {"+": value + x, "-": value - x, "*": value * x}[op]
        expr = f"({expr}) {op} {x}"
    ex = {"numbers": list(reversed(nums)), "target": value}
    assert R(box(expr), ex) == 1.0
    assert R(box(expr), {**ex, "target": value + 1}) == pytest.approx(0.1)


def test_all_permutations_of_a_solution():
    for perm in itertools.permutations([3, 7, 25, 50]):
        a, b, c, d = perm
        eq = f"{a} + {b} + {c} + {d}"
        assert R(box(eq), {"numbers": [3, 7, 25, 50], "target": 85}) == 1.0


def test_missing_fields():
    with pytest.raises(ValueError, match="no 'target' field"):
        R(box("1"), {"numbers": [1]})
    with pytest.raises(ValueError, match="no 'numbers' field"):
        R(box("1"), {"target": 1})


@pytest.mark.parametrize("kwargs, match", [
    ({"max_equation_chars": 0}, "max_equation_chars must be in"),
    ({"max_depth": 0}, "max_depth must be in"),
    ({"max_chars": 0}, "max_chars must be in"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CountdownRewardConfig(**kwargs)


# -- TinyZero's scheme counted once ------------------------------------------------------------
def _tinyzero(completion: str, ex: dict) -> float:
    """TinyZero's compute_score, written out independently: 0 without an answer, 1.0 for a
    correct equation, 0.1 for any other answer."""
    from r1fast.rewards.extract import extract_answer

    eq = extract_answer(completion)
    if eq is None:
        return 0.0
    return 1.0 if check_equation(eq, ex["numbers"], ex["target"]) else 0.1


@pytest.mark.parametrize("weights", [{"accuracy": 1.0}, {"accuracy": 1.0, "format": 0.1}])
def test_tinyzero_scheme_counted_once_through_the_recipe_parts(weights, caplog, monkeypatch):
    """The trainer's reward parts on generated Countdown rows give TinyZero's 0 / 0.1 / 1.0,
    whether or not the recipe also names the format reward (it would stack to 0.2 / 1.1)."""
    from r1fast.data.tasks import generate_countdown
    from r1fast.rewards import CompositeReward, format as format_reward
    from r1fast.train.task import reward_parts

    # the warning is once per process: an earlier test of the suite may have used it up
    monkeypatch.setattr(format_reward, "_WARNED", set())

    reward = CompositeReward(reward_parts("countdown", weights))
    rows = generate_countdown(5, seed=1)
    seen = set()
    for ex in rows:
        for text in (box(ex["answer"]), box(ex["answer"] + " + 1"), "<think>no answer</think>",
                     f"\\boxed{{{ex['answer']}}}"):
            total, parts = reward.score(text, ex)
            assert total == pytest.approx(_tinyzero(text, ex)), (text, parts)
            seen.add(round(total, 6))
    assert seen == {0.0, 0.1, 1.0}  # every branch of the scheme was exercised
    if "format" in weights:
        assert "already carry their format credit" in caplog.text


def test_format_still_counts_on_other_rows_and_can_score_countdown_rows():
    from r1fast.rewards import FormatReward

    ok = "<think>r</think> \\boxed{5}"
    assert FormatReward()(ok, {"answer": "5", "reward": "math_accuracy"}) == 1.0
    assert FormatReward()(ok, {"answer": "5"}) == 1.0
    assert FormatReward()(ok, {**EX, "reward": "countdown"}) == 0.0
    assert FormatReward(credited_elsewhere=())(ok, {**EX, "reward": "countdown"}) == 1.0
    with pytest.raises(ValueError, match="credited_elsewhere must be a tuple"):
        FormatReward(credited_elsewhere="countdown")
