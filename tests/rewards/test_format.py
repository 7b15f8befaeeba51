"""Format reward: strict and lenient think-then-answer checks."""
import pytest

from r1fast.rewards.format import FormatReward, FormatRewardConfig, is_well_formed

STRICT = FormatReward()


@pytest.mark.parametrize("text", [
    "<think>reason</think> \\boxed{5}",
    "  \n<think>reason\nmore</think>\nSo \\boxed{\\frac{1}{2}} is it.",
    "<think>r</think>\\boxed{{nested}}",
])
def test_strict_accepts(text):
    assert STRICT(text, {}) == 1.0


@pytest.mark.parametrize("text", [
    "",
    "\\boxed{5}",                                        # no think block
    "reason</think> \\boxed{5}",                         # not opened
    "x <think>reason</think> \\boxed{5}",                # text before <think>
    "<think>   </think> \\boxed{5}",                     # blank thought
    "<think>reason</think>   ",                          # blank answer
    "<think>reason</think> 5",                           # no box
    "<think>reason</think> \\boxed{}",                   # empty box
    "<think>reason</think> \\boxed{5",                   # unclosed box
    "<think>a</think><think>b</think> \\boxed{5}",       # two blocks
    "<think>a<think>b</think> \\boxed{5}",               # nested open
    "<think>a</think> \\boxed{5} </think>",              # stray close
    "<think>reason",                                     # truncated
])
def test_strict_rejects(text):
    assert STRICT(text, {}) == 0.0


def test_lenient_and_optional_box():
    lenient = FormatReward(strict=False, require_boxed=False)
    assert lenient("blah</think> answer", {}) == 1.0
    assert lenient("<think>a</think><think>b</think> 5", {}) == 1.0
    assert lenient("<think>a</think>  ", {}) == 0.0
    assert lenient("no tags", {}) == 0.0
    assert FormatReward(require_boxed=False)("<think>r</think> 5", {}) == 1.0


def test_think_in_prompt():
    r = FormatReward(think_in_prompt=True)
    assert r("reason</think> \\boxed{5}", {}) == 1.0
    assert r("<think>reason</think> \\boxed{5}", {}) == 0.0  # a second <think>


def test_score_and_length_bound():
    assert FormatReward(score=0.5)("<think>r</think> \\boxed{1}", {}) == 0.5
    huge = "<think>" + "x" * 100 + "</think> \\boxed{1}"
    assert not is_well_formed(huge, FormatRewardConfig(max_chars=50))
    assert is_well_formed("<think>" + "{" * 200_000 + "</think> \\boxed{1}")


def test_bad_config():
    with pytest.raises(ValueError, match="max_chars must be in"):
        FormatRewardConfig(max_chars=0)
