"""Answer extraction: last balanced \\boxed{}, fallbacks, think splitting, hostile sizes."""
import pytest
from hypothesis import given, settings, strategies as st

from r1fast.rewards.extract import (after_answer_marker, extract_answer, last_boxed, last_tagged,
                                    split_think, thought_text)


@pytest.mark.parametrize("text, want", [
    ("\\boxed{5}", "5"),
    ("a \\boxed{3} b \\boxed{5} c", "5"),                       # multiple: the last
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),                  # nested braces
    ("\\boxed{{{7}}}", "{{7}}"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),                        # escaped braces do not nest
    ("\\boxed{5} then \\boxed{6", "5"),                         # unclosed last box is skipped
    ("\\boxed 42 and more", "42"),                             # brace-less form
    ("\\boxed{}", ""),
    ("\\boxedfoo{5}", None),
    ("no box here", None),
    ("}}}} \\boxed{1} {{{{", "1"),
    ("\\boxed{\\boxed{9}}", "9"),                               # nested: last by start
])
def test_last_boxed(text, want):
    assert last_boxed(text) == want


def test_last_boxed_hostile_sizes():
    assert last_boxed("\\boxed{" * 200_000) is None            # a million chars, never closed
    assert last_boxed("{" * 500_000 + "\\boxed{8}") == "8"
    deep = "\\boxed{" + "{" * 100_000 + "x" + "}" * 100_000 + "}"
    assert last_boxed(deep) == "{" * 100_000 + "x" + "}" * 100_000


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="{}\\boxed 5x", max_size=60))
def test_last_boxed_never_raises_and_is_balanced(text):
    got = last_boxed(text)
    if got is not None and not text.count("\\boxed "):
        depth = 0
        i = 0
        while i < len(got):  # the content of a brace box is balanced (escapes skipped)
            if got[i] == "\\":
                i += 2
                continue
            depth += (got[i] == "{") - (got[i] == "}")
            assert depth >= 0
            i += 1
        assert depth == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet="0123456789+-", min_size=1, max_size=5), min_size=1, max_size=4),
       st.integers(0, 4))
def test_last_boxed_finds_last_of_generated(contents, nest):
    text = " x ".join("\\boxed{" + "{" * nest + c + "}" * nest + "}" for c in contents)
    assert last_boxed(text) == "{" * nest + contents[-1] + "}" * nest


def test_split_and_thought():
    assert split_think("<think>a</think>b") == ("a", "b")
    assert split_think("x<think>a</think>b</think>c") == ("a</think>b", "c")
    assert split_think("no close") == (None, "no close")
    assert split_think("a</think>b", think_in_prompt=True) == ("a", "b")
    assert thought_text("<think>still going") == "still going"
    assert thought_text("plain") == "plain"


def test_fallbacks():
    assert extract_answer("<think>\\boxed{1}</think> \\boxed{2}") == "2"
    assert extract_answer("<think>\\boxed{1}</think> no box") == "no box"    # short region
    assert extract_answer("<think>t</think> The answer is 7, or so I think.\n more words " * 3) == "7"
    assert extract_answer("work... Answer: 42.") == "42"
    assert extract_answer("<answer>3+4</answer>") == "3+4"
    assert extract_answer("only thinking, no tags") is None
    assert extract_answer("<think>t</think> Answer: 9", require_boxed=True) is None
    assert extract_answer("") is None
    assert extract_answer("<think>t</think>   ") is None
    assert after_answer_marker("ANSWER: $5$") == "5"
    assert after_answer_marker("so #### 1,000\nmore") == "1,000"  # GSM8K's marker
    assert after_answer_marker("Answer: 5, checking #### 7") == "7"  # the later marker wins
    assert after_answer_marker("#### 7 Answer: 5") == "5"
    assert after_answer_marker("Answer: 5\n#### Step 3: check") == "5"  # a heading, not GSM8K's
    assert after_answer_marker("#### Final words") is None
    assert last_tagged("<answer>1</answer><answer>2") is None  # the last tag never closes


def test_extract_reads_only_the_tail():
    text = "\\boxed{1}" + "x" * 200 + "\\boxed{2}"
    assert extract_answer(text, max_chars=50) == "2"
    assert extract_answer("\\boxed{1}" + "x" * 200, max_chars=50) is None


def test_a_thought_cut_off_before_closing_answers_nothing():
    """A tentative box inside a thought that never closed (a completion that hit
    max_new_tokens mid-thought) earned full accuracy; a plain completion without think tags
    is still all answer."""
    from r1fast.rewards import get_reward

    math = get_reward("math_accuracy")
    cut = "<think>I guess \\boxed{72} hmm wait let me re"
    assert extract_answer(cut) is None and math(cut, {"answer": "72"}) == 0.0
    assert extract_answer("I guess \\boxed{72} hmm wait let me re", think_in_prompt=True) is None
    assert extract_answer("so the sum is \\boxed{72}") == "72"  # no think tags at all
    assert extract_answer("<think>ok</think> \\boxed{72}") == "72"


def test_a_markdown_answer_marker():
    assert extract_answer("<think>t</think> **Answer:** 72") == "72"
    assert extract_answer("<think>t</think> **Answer: 72**") == "72"


@pytest.mark.parametrize("completion, want", [
    ("<think>t</think> The answer is 5.", "5"),
    ("<think>t</think> So, the final answer is: $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("<think>t</think> answer is -3", "-3"),
    ("<think>t</think> $x = 3$.", "x = 3"),
    ("<think>t</think> The answer isn't clear", "The answer isn't clear"),  # not the phrase
])
def test_a_short_prose_answer_line(completion, want):
    """"The answer is 5." was taken whole ('The answer is 5'), which the checker cannot parse,
    while the same sentence over 64 characters fell back to its last number and scored."""
    assert extract_answer(completion) == want


def test_the_answer_marker_is_found_in_the_text_itself():
    """The marker was searched in text.lower(), whose indices shift where lower-casing changes
    a character's length ('İ' -> 'i̇'): 'Answer: 123' was read as '23'."""
    assert extract_answer("<think>x</think>\nİİ Answer: 123") == "123"
    assert after_answer_marker("ẞİ ANSWER: 7") == "7"
