"""Safe exact arithmetic: values against an independent tree evaluation, bounds, grammar."""
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from r1fast.rewards.arith import (ArithConfig, ArithDomainError, ArithError, ArithRangeError,
                                  ArithSyntaxError, evaluate)


def _trees(max_leaves=6):
    leaf = st.integers(0, 999)
    return st.recursive(leaf, lambda kids: st.tuples(st.sampled_from("+-*/"), kids, kids), max_leaves=max_leaves)


def _value(t):  # independent reference: evaluate the tree directly
    if isinstance(t, int):
        return Fraction(t)
    op, a, b = t
    x, y = _value(a), _value(b)
    if op == "/" and y == 0:
        raise ZeroDivisionError
    return {"+": x + y, "-": x - y, "*": x * y, "/": x / y if op == "/" else None}[op]


def _render(t):
    return str(t) if isinstance(t, int) else f"({_render(t[1])} {t[0]} {_render(t[2])})"


def _leaves(t):
    return [Fraction(t)] if isinstance(t, int) else _leaves(t[1]) + _leaves(t[2])


@settings(max_examples=150, deadline=None)
@given(_trees())
def test_matches_tree_evaluation(tree):
    text = _render(tree)
    try:
        want = _value(tree)
    except ZeroDivisionError:
        with pytest.raises(ArithDomainError, match="division by zero"):
            evaluate(text)
        return
    res = evaluate(text)
    assert res.value == want
    assert list(res.literals) == _leaves(tree)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789+-*/^(){}. ,\\fractimesdivcdot**x", max_size=40))
def test_fuzz_only_arith_errors(text):
    try:
        res = evaluate(text)
    except ArithError:
        return
    assert isinstance(res.value, Fraction)


@pytest.mark.parametrize("text, want", [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("2^10", 1024), ("2**3**2", 512), ("-2^2", -4),
    ("2^-1", Fraction(1, 2)), ("\\frac{566}{2}", 283), ("0.5", Fraction(1, 2)), ("1,000", 1000),
    ("3 \\times 4", 12), ("3 \\cdot 4", 12), ("8 \\div 2", 4), ("\\left( 1 + 1 \\right)", 2),
    ("1\\,000", 1000), ("{2}+{3}", 5), ("6 / 4 * 2", 3), (".25", Fraction(1, 4)),
    ("6\u00f74\u00d72", 3), ("7 \u2212 2", 5), ("3\u00b74", 12), ("3\u22c54", 12),
])
def test_values(text, want):
    assert evaluate(text).value == want


@pytest.mark.parametrize("text, err, match", [
    ("9^9^9", ArithRangeError, "power exceeds"),
    ("9**9**9", ArithRangeError, "power exceeds"),
    ("10^100000", ArithRangeError, "power exceeds"),
    ("(" * 100 + "1" + ")" * 100, ArithRangeError, "nested deeper"),
    ("-" * 100 + "1", ArithRangeError, "nested deeper"),
    ("1" * 100, ArithRangeError, "literal longer"),
    ("1+" * 300 + "1", ArithRangeError, "longer than|more than"),
    ("1/0", ArithDomainError, "division by zero"),
    ("0^-1", ArithDomainError, "division by zero"),
    ("\\frac{1}{0}", ArithDomainError, "division by zero"),
    ("4^(1/2)", ArithDomainError, "non-integer exponent"),
    ("__import__('os').system('x')", ArithSyntaxError, "unexpected character"),
    ("５", ArithSyntaxError, "unexpected character"),
    ("٣+1", ArithSyntaxError, "unexpected character"),
    ("2(3)", ArithSyntaxError, "trailing"),
    ("(1+2", ArithSyntaxError, "expected"),
    ("", ArithSyntaxError, "empty"),
    ("\\sqrt{4}", ArithSyntaxError, "unsupported LaTeX"),
    ("1,2", ArithSyntaxError, "unexpected character"),
])
def test_refusals(text, err, match):
    with pytest.raises(err, match=match):
        evaluate(text)


def test_repeated_squaring_is_bounded_by_bits():
    # each step stays legal but the value doubles in bits: refused by max_bits, not computed
    with pytest.raises(ArithRangeError, match="bits"):
        evaluate("((((2^60)^2)^2)^2)^2^2^2^2", ArithConfig(max_bits=4096))


def test_flags_restrict_grammar():
    strict = ArithConfig(allow_power=False, allow_decimals=False, allow_unary=False, allow_latex=False,
                         allow_thousands=False)
    for text, match in [("2^2", "powers"), ("0.5", "decimal"), ("-1", "unary"), ("{1}", "unexpected"),
                        ("\\frac{1}{2}", "unexpected"), ("1,000", "unexpected")]:
        with pytest.raises(ArithSyntaxError, match=match):
            evaluate(text, strict)


def test_non_str_input():
    with pytest.raises(ArithSyntaxError, match="must be a str"):
        evaluate(5)  # type: ignore[arg-type]


def test_frac_shorthand_with_one_digit_arguments():
    """\\frac13 (LaTeX's shorthand) went to math-verify, which rounds, while \\frac{1}{3} was
    decided exactly: 0.333333 counted against one spelling and not the other."""
    from r1fast.rewards.math import answers_equal

    assert evaluate("\\frac13").value == evaluate("\\frac{1}{3}").value == Fraction(1, 3)
    assert evaluate("\\frac 12").value == evaluate("\\frac1{2}").value == Fraction(1, 2)
    assert answers_equal("0.333333", "\\frac13") == answers_equal("0.333333", "\\frac{1}{3}")
