"""Task generators: determinism, disjoint splits, correct answers and chains of thought."""
import operator
import re
from collections import Counter

import pytest

from r1fast.data.tasks import (ArithmeticConfig, CountdownConfig, addition_cot, generate_arithmetic,
                               generate_countdown, generate_task, multiplication_cot, split_of,
                               subtraction_cot)
from r1fast.data.template import sft_example
from r1fast.rewards import CountdownReward, FormatReward, MathAccuracyReward, evaluate
from r1fast.rewards.format import FormatRewardConfig

# "a op b op c = d" statements inside a chain of thought (d may be negative after a borrow)
# (not preceded by a digit, a parenthesis or an operator: "(a - b) * 12 = 24" is not "12 = 24")
_EQ = re.compile(r"(?<![\d)])(?<![-+*/] )(?<![-+*/])(\d+(?:\s*[-+*/]\s*\d+)*)\s*=\s*(-?\d+(?:\s*[-+*/]\s*\d+)*)(?![\d(])")


def assert_equations_true(cot):
    found = _EQ.findall(cot)
    assert found, cot
    for lhs, rhs in found:
        assert evaluate(lhs).value == evaluate(rhs).value, (lhs, rhs, cot)


@pytest.mark.parametrize("gen", [generate_countdown, generate_arithmetic])
def test_deterministic(gen):
    a, b = gen(40, "train", seed=1), gen(40, "train", seed=1)
    assert a == b
    assert [e["id"] for e in gen(40, "train", seed=2)] != [e["id"] for e in a]
    assert len({e["id"] for e in a}) == 40  # distinct within a split


@pytest.mark.parametrize("gen", [generate_countdown, generate_arithmetic])
def test_splits_disjoint(gen):
    train = [e for s in (0, 1) for e in gen(300, "train", seed=s)]
    test = [e for s in (0, 1) for e in gen(100, "test", seed=s)]
    assert not {e["id"] for e in train} & {e["id"] for e in test}
    assert all(e["split"] == "train" and split_of(e["id"], 0.1) == "train" for e in train)
    assert all(e["split"] == "test" and split_of(e["id"], 0.1) == "test" for e in test)


def test_held_out_excludes_operand_swapped_twins():
    """34+12 held out while 12+34 trains would test recall, not addition: commutative problems
    are split by their unordered operands (the demo's held-out set used to share 38 of 64)."""
    def unordered(e):
        return (min(e["a"], e["b"]), e["op"], max(e["a"], e["b"])) if e["op"] in "+*" else \
            (e["a"], e["op"], e["b"])

    kw = dict(min_digits=1, max_digits=2, ops=("+", "*", "-"))
    train = generate_arithmetic(3000, "train", seed=0, **kw)
    test = generate_arithmetic(300, "test", seed=0, **kw)
    assert not {unordered(e) for e in train} & {unordered(e) for e in test}
    assert len({unordered(e) for e in train}) == len(train)  # one form per problem
    assert any(e["a"] > e["b"] for e in train if e["op"] == "+")  # both orders still asked


def test_split_of_fraction():
    keys = [f"k{i}" for i in range(20000)]
    frac = sum(split_of(k, 0.25) == "test" for k in keys) / len(keys)
    assert 0.23 < frac < 0.27


def test_countdown_solutions_score_one():
    data = generate_countdown(300, "train", seed=0) + generate_countdown(100, "test", seed=0)
    # countdown pays its own format credit (TinyZero's 0.1), so the format reward must not pay
    # it again for countdown rows; with nothing credited elsewhere it accepts the layout
    reward, fmt = CountdownReward(), FormatReward()
    layout = FormatReward(FormatRewardConfig(credited_elsewhere=()))
    for e in data:
        assert 3 <= len(e["numbers"]) <= 4 and all(1 <= x <= 99 for x in e["numbers"])
        assert 1 <= e["target"] <= 100
        res = evaluate(e["answer"])  # independent check of the stored equation
        assert res.value == e["target"] and Counter(res.literals) == Counter(e["numbers"])
        completion = sft_example(e)["completion"]
        assert reward(completion, e) == 1.0 and layout(completion, e) == 1.0
        assert fmt(completion, e) == 0.0
        assert_equations_true(e["solution_cot"])
        assert str(e["target"]) in e["prompt"] and e["reward"] == "countdown"
    assert set(Counter(len(e["numbers"]) for e in data)) == {3, 4}


def test_arithmetic_answers_score_one():
    data = generate_arithmetic(300, "train", seed=0) + generate_arithmetic(100, "test", seed=0)
    reward, fmt = MathAccuracyReward(), FormatReward()
    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul}
    for e in data:
        assert 10 <= e["a"] <= 999 and 10 <= e["b"] <= 999
        assert e["answer"] == str(ops[e["op"]](e["a"], e["b"]))  # independent of the generator
        completion = sft_example(e)["completion"]
        assert reward(completion, e) == 1.0 and fmt(completion, e) == 1.0
        assert_equations_true(e["solution_cot"])
        assert e["solution_cot"].endswith(f"= {e['answer']}.")
    assert set(e["op"] for e in data) == {"+", "-", "*"}


@pytest.mark.parametrize("a, b", [(0, 0), (9, 1), (999, 999), (100, 1), (5, 0), (1000, 1), (99999, 99999)])
def test_cot_edge_cases(a, b):
    hi, lo = max(a, b), min(a, b)
    for cot, value in ((addition_cot(a, b), a + b), (multiplication_cot(a, b), a * b),
                       (subtraction_cot(hi, lo), hi - lo)):
        assert_equations_true(cot)
        assert cot.endswith(f"= {value}.")


def test_subtraction_needs_order():
    with pytest.raises(ValueError, match="needs a >= b"):
        subtraction_cot(1, 2)


def test_config_overrides_and_task_registry():
    small = generate_countdown(10, seed=0, min_numbers=3, max_numbers=3, max_target=20)
    assert all(len(e["numbers"]) == 3 and e["target"] <= 20 for e in small)
    mult = generate_task("arithmetic", 10, seed=0, ops=("*",), min_digits=2, max_digits=2)
    assert all(e["op"] == "*" and 10 <= e["a"] <= 99 for e in mult)
    assert generate_countdown(0) == []


def test_exhausted_space_raises():
    with pytest.raises(ValueError, match="could only generate"):
        generate_arithmetic(100, seed=0, min_digits=1, max_digits=1, ops=("+",))


@pytest.mark.parametrize("call, match", [
    (lambda: generate_countdown(5, split="val"), "split must be one of"),
    (lambda: generate_countdown(-1), "n must be in"),
    (lambda: generate_arithmetic(2.5), "n must be an int"),
    (lambda: generate_task("sudoku", 5), "task must be one of"),
    (lambda: CountdownConfig(min_numbers=1), "min_numbers must be in"),
    (lambda: CountdownConfig(max_numbers=9), "max_numbers must be in"),
    (lambda: CountdownConfig(max_value=0), "max_value must be in"),
    (lambda: CountdownConfig(max_target=0), "max_target must be in"),
    (lambda: CountdownConfig(test_fraction=1.0), "test_fraction must be in"),
    (lambda: ArithmeticConfig(max_digits=7), "max_digits must be in"),
    (lambda: ArithmeticConfig(min_digits=0), "min_digits must be in"),
    (lambda: ArithmeticConfig(ops=("/",)), "ops must be a non-empty tuple"),
    (lambda: ArithmeticConfig(test_fraction=0.0), "test_fraction must be in"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
