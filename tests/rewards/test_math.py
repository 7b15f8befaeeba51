"""Math accuracy: equivalences, wrong answers, and adversarial completions (in-process)."""
import pytest
from hypothesis import given, settings, strategies as st

from r1fast.rewards.math import MathAccuracyReward, MathRewardConfig, answers_equal

REWARD = MathAccuracyReward()


def score(completion, answer="283"):
    return REWARD(completion, {"answer": answer})


@pytest.mark.parametrize("completion", [
    "<think>7+6=13</think> \\boxed{283}",
    "\\boxed{283}",
    "<think>t</think> The answer is \\boxed{ 283 }.",
    "\\boxed{283.0}",
    "\\boxed{\\frac{566}{2}}",
    "\\boxed{$283$}",
    "\\boxed{x = 283}",
    "\\boxed{280 + 3}",
    "<think>t</think> Answer: 283",
    "Let's think step by step. 280 + 3 = 283 #### 283",     # GSM8K's marker (verl's prompts)
    "<think>t</think> #### 283\n",
    "<think>t</think> 283",
    "\\boxed{1} wait, no: \\boxed{283}",
])
def test_correct_scores_one(completion):
    assert score(completion) == 1.0


@pytest.mark.parametrize("completion", [
    "", "   ", "283", "no boxed answer 283 anywhere?", "\\boxed{284}", "\\boxed{283} wait, no: \\boxed{284}",
    "<think>\\boxed{283}</think> \\boxed{1}",            # a boxed thought is not the answer
    "\\boxed{}", "\\boxed{283",                          # empty, unclosed
    "\\boxed{２８３}", "\\boxed{٢٨٣}", "\\boxed{𝟐𝟖𝟑}",     # lookalike digits are not digits
    "\\boxed{283x}",
])
def test_wrong_scores_zero(completion):
    assert score(completion) == 0.0


@pytest.mark.parametrize("answer", ["9^{9^{9}}", "9**9**9", "10^{100000}", "2^{2^{2^{2^{2^{2}}}}}",
                                    "1" * 5000, "(" * 60 + "1" + ")" * 60, "{" * 100000])
def test_hostile_answers_are_wrong_and_fast(answer):
    # decided by the bounded evaluator or the guards, never reaching sympy
    assert score("<think>t</think> \\boxed{" + answer + "}", "5") == 0.0


def test_huge_but_bounded_literal_is_compared_exactly():
    big = "1" + "0" * 40
    assert score("\\boxed{10^{40}}", big) == 1.0


@pytest.mark.parametrize("gold, completion, want", [
    ("10^{2000}", "\\boxed{10^{2000}}", 1.0),        # a gold too large to evaluate, as written
    ("10^{2000}", "\\boxed{10^{ 2000 }}", 1.0),
    ("10^{2000}", "\\boxed{10^{2001}}", 0.0),
    ("3^{3000}-1", "\\boxed{3^{3000}-1}", 1.0),
    ("5", "\\boxed{10^{2000}}", 0.0),
])
def test_an_answer_too_large_to_evaluate_matches_the_same_gold(gold, completion, want):
    """A prediction too large for exact arithmetic was wrong even against the same huge gold."""
    assert score("<think>t</think> " + completion, gold) == want


def test_the_guards_leave_a_long_or_deep_gold_reachable():
    """An answer over max_answer_chars could never match a gold as long; 13 levels of
    parentheses around 1 were wrong before the exact tier, which handles them."""
    long_gold = "x^2 + " * 60 + "1"  # 361 characters
    assert score("<think>t</think> \\boxed{" + long_gold + "}", long_gold) == 1.0
    assert score("<think>t</think> \\boxed{" + "(" * 13 + " 1 " + ")" * 13 + "}", "1") == 1.0
    assert score("<think>t</think> \\boxed{" + "x" * 300 + "}", "5") == 0.0  # still a guard


def test_injection_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    for completion in (f"\\boxed{{{payload}}}", f"<think>t</think> Answer: {payload}", payload):
        assert score(completion, "0") == 0.0
    assert not marker.exists()


def test_symbolic_via_math_verify():
    assert score("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}") == 1.0
    assert score("\\boxed{\\sqrt{3}}", "\\sqrt{2}") == 0.0
    assert score("\\boxed{\\{1, 2\\}}", "\\{2, 1\\}") == 1.0


def test_very_long_completion():
    text = "<think>" + "1 + 1 = 2. " * 200_000 + "</think> \\boxed{283}"
    assert score(text) == 1.0


@settings(max_examples=60, deadline=None)
@given(st.integers(-10**6, 10**6))
def test_integer_representations(k):
    assert answers_equal(str(k), str(k))
    assert answers_equal(f"{k}.0", str(k))
    assert answers_equal(f"\\frac{{{2 * k}}}{{2}}", str(k))
    assert not answers_equal(str(k + 1), str(k))


def test_config_scores_and_boxed_requirement():
    r = MathAccuracyReward(correct_score=2.0, wrong_score=-1.0, require_boxed=True)
    assert r("\\boxed{5}", {"answer": 5}) == 2.0
    assert r("<think>t</think> Answer: 5", {"answer": 5}) == -1.0
    assert MathAccuracyReward(answer_key="gold")("\\boxed{5}", {"gold": "5"}) == 1.0


def test_string_fallback_without_math_verify():
    cfg = MathRewardConfig(use_math_verify=False)
    assert answers_equal("\\sqrt{2}", " \\sqrt{2} ", cfg)
    assert not answers_equal("\\sqrt{3}", "\\sqrt{2}", cfg)


def test_missing_answer_field():
    with pytest.raises(ValueError, match="no 'answer' field"):
        REWARD("\\boxed{1}", {})


@pytest.mark.parametrize("kwargs, match", [
    ({"max_answer_chars": 0}, "max_answer_chars must be in"),
    ({"max_nesting": 0}, "max_nesting must be in"),
    ({"max_chars": 0}, "max_chars must be in"),
    ({"parse_timeout_s": -1}, "parse_timeout_s must be in"),
    ({"answer_key": ""}, "answer_key must be a non-empty str"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MathRewardConfig(**kwargs)


def test_a_slow_check_inside_a_runner_call_is_a_counted_timeout():
    """math-verify's own budget scored a correct answer it could not finish as wrong, with
    status "ok" and no count anywhere, and reward.cpu_time_s / timeout_s never reached it.
    Inside a runner call the call's limit now decides (a counted timeout); a direct call keeps
    parse_timeout_s (wrong when exceeded)."""
    import sympy
    from sympy.core.cache import clear_cache

    from r1fast.rewards import MathAccuracyReward, RewardRunner
    from r1fast.rewards.math import warm_up

    def check(k):  # ~0.2 s of sympy for a fresh k, cold: sympy caches what it computed
        x = sympy.Symbol("x")
        return (f"<think>x</think> \\boxed{{(x+{k})^{{24}}}}",
                {"answer": sympy.latex(sympy.expand((x + k) ** 24))})

    warm_up()
    first, (c, ex) = check(3), check(5)
    clear_cache()  # building the golds expanded them: a cached expansion made a check fast
    tight = MathAccuracyReward(parse_timeout_s=0.005)
    assert tight(*first) == 0.0  # outside a reward call: its own budget, as before
    runner = RewardRunner(tight, mode="inline", cpu_time_s=0.005)
    out = runner([c], [ex])
    assert out.status == {"math_accuracy": ["timeout"]}
    assert runner.metrics()["rewards/timeouts"] == 1.0
    roomy = RewardRunner(tight, mode="inline", cpu_time_s=30.0)  # the call's limit, not 0.005
    assert roomy([c], [ex]).parts == {"math_accuracy": [1.0]}
