"""CompositeReward weighting and per-part scores; the reward registry."""
import pytest

from r1fast.rewards import (CompositeReward, CountdownReward, FormatReward, MathAccuracyReward,
                            available_rewards, get_reward, register_reward)


def const(v):
    def f(c, e):
        return v
    f.__name__ = f"const{v}"
    return f


def test_total_and_parts():
    comp = CompositeReward([(const(1.0), 0.5), ("two", const(2.0), -1.0), (const(4.0), 0.25)])
    total, parts = comp.score("x", {})
    assert parts == {"const1.0": 1.0, "two": 2.0, "const4.0": 4.0}
    assert total == pytest.approx(0.5 * 1.0 - 1.0 * 2.0 + 0.25 * 4.0)
    assert comp("x", {}) == total
    assert comp.combine({"two": 1.0}) == -1.0


def test_r1_style_composite_on_real_rewards():
    comp = CompositeReward([(MathAccuracyReward(), 1.0), (FormatReward(), 0.5)])
    total, parts = comp.score("<think>3+4=7</think> \\boxed{7}", {"answer": "7"})
    assert parts == {"math_accuracy": 1.0, "format": 1.0} and total == 1.5
    total, parts = comp.score("\\boxed{7}", {"answer": "7"})
    assert parts == {"math_accuracy": 1.0, "format": 0.0} and total == 1.0


def test_nested_composite():
    inner = CompositeReward([(const(1.0), 2.0)])
    outer = CompositeReward([("inner", inner, 3.0)])
    assert outer("x", {}) == 6.0


@pytest.mark.parametrize("parts, match", [
    ([], "non-empty sequence"),
    ("abc", "non-empty sequence"),
    ([(const(1.0),)], r"parts\[0\] must be"),
    ([(3, 1.0)], r"parts\[0\] reward must be callable"),
    ([(const(1.0), float("inf"))], r"parts\[0\] weight must be a finite number"),
    ([(const(1.0), "1")], r"parts\[0\] weight must be a finite number"),
    ([("", const(1.0), 1.0)], r"parts\[0\] name must be a non-empty str"),
    ([(const(1.0), 1.0), (const(1.0), 2.0)], "part names must be unique"),
])
def test_bad_parts(parts, match):
    with pytest.raises(ValueError, match=match):
        CompositeReward(parts)


def test_registry():
    assert {"math_accuracy", "countdown", "format", "language", "reward_model"} <= set(available_rewards())
    r = get_reward("countdown", format_score=0.0)
    assert isinstance(r, CountdownReward) and r.config.format_score == 0.0
    with pytest.raises(ValueError, match="reward name must be one of"):
        get_reward("nope")
    with pytest.raises(TypeError):
        get_reward("format", no_such_field=1)


def test_register_custom():
    def factory(bonus=1.0):
        return const(bonus)
    register_reward("test_const_bonus", factory)
    assert get_reward("test_const_bonus", bonus=3.0)("x", {}) == 3.0
    register_reward("test_const_bonus", factory)  # same factory again: fine
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_const_bonus", lambda: const(0.0))
    with pytest.raises(ValueError, match="name must be a non-empty str"):
        register_reward("")
    with pytest.raises(ValueError, match="must be callable"):
        register_reward("test_bad", 5)
