"""Prompt template and SFT target: what they produce is what the rewards accept."""
import pytest

from r1fast.data.template import PROMPT_TEMPLATE, make_prompt, sft_example, sft_target
from r1fast.rewards import FormatReward, MathAccuracyReward, extract_answer, split_think


def test_prompt_shape():
    p = make_prompt("What is 2 + 2?")
    assert p == ("User: What is 2 + 2?\nThink inside <think> </think>, then give the final answer in "
                 "\\boxed{}.\nAssistant: ")
    assert make_prompt("uses {braces}") .startswith("User: uses {braces}\n")
    assert make_prompt("q", template="Q: {question} A:") == "Q: q A:"


def test_sft_target_is_accepted_by_the_rewards():
    t = sft_target("2 + 2 = 4.", "4")
    assert t == "<think>2 + 2 = 4.</think> \\boxed{4}"
    assert FormatReward()(t, {}) == 1.0
    assert MathAccuracyReward()(t, {"answer": "4"}) == 1.0
    assert split_think(t) == ("2 + 2 = 4.", " \\boxed{4}")
    assert extract_answer(sft_target("x", "\\frac{1}{2}")) == "\\frac{1}{2}"
    # the prompt itself mentions the tags; only the completion is scored
    assert FormatReward()(PROMPT_TEMPLATE, {}) == 0.0


def test_sft_example():
    ex = {"prompt": "P", "solution_cot": "c", "answer": 7}
    assert sft_example(ex) == {"prompt": "P", "completion": "<think>c</think> \\boxed{7}"}


@pytest.mark.parametrize("call, match", [
    (lambda: make_prompt(""), "question must be a non-empty str"),
    (lambda: make_prompt(5), "question must be a non-empty str"),
    (lambda: make_prompt("q", template="no placeholder"), "template must contain"),
    (lambda: sft_target("", "1"), "cot must be a non-empty str"),
    (lambda: sft_target("a </think> b", "1"), "cot must not contain"),
    (lambda: sft_target("c", ""), "answer must be non-empty"),
    (lambda: sft_target("c", "}{"), "balanced braces"),
    (lambda: sft_example({"prompt": "p"}), "no 'solution_cot' field"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
