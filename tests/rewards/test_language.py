"""Language consistency: fraction of thought words in the target script."""
import pytest
from hypothesis import given, settings, strategies as st

from r1fast.rewards.language import (LANGUAGE_SCRIPTS, LanguageReward, LanguageRewardConfig,
                                     language_consistency, script_of, word_counts)

EN = LanguageReward()


def test_pure_english():
    assert EN("<think>First add the ones, then the tens.</think> \\boxed{5}", {}) == 1.0


def test_pure_chinese():
    text = "<think>先把个位相加</think> \\boxed{5}"
    assert EN(text, {}) == 0.0
    assert LanguageReward(target="zh")(text, {}) == 1.0


def test_mixed_counts_cjk_characters_as_words():
    # 4 English words + 4 Han characters -> 1/2
    assert EN("<think>add the ones first 先把个位</think>", {}) == pytest.approx(0.5)
    assert word_counts("hello世界", frozenset({"LATIN"})) == (3, 1)


def test_only_thought_is_scored():
    assert EN("<think>all english words</think> 答案是五", {}) == 1.0
    assert EN("<think>all english words", {}) == 1.0  # truncated thought still scored


def test_digits_and_symbols_are_not_words():
    assert EN("<think>12 + 30 = 42 !!</think>", {}) == 0.0  # empty_score
    assert LanguageReward(empty_score=1.0)("<think>12 + 30</think>", {}) == 1.0


def test_lookalike_letters_break_a_word():
    # Cyrillic 'а' (U+0430) inside an otherwise Latin word
    assert EN("<think>p\u0430ssword ok</think>", {}) == pytest.approx(0.5)


def test_accents_and_japanese():
    assert EN("<think>café naïve résumé</think>", {}) == 1.0
    assert EN("<think>cafe\u0301</think>", {}) == 1.0  # combining accent
    ja = LanguageReward(target="ja")
    assert ja("<think>ひらがなとカタカナと漢字</think>", {}) == 1.0
    assert script_of("Ж") == "CYRILLIC" and script_of("α") == "GREEK" and script_of("한") == "HANGUL"
    assert script_of("5") == "OTHER"


def test_score_scale_and_think_in_prompt():
    r = LanguageReward(score=0.2, think_in_prompt=True)
    assert r("english words 中</think> x", {}) == pytest.approx(0.2 * 2 / 3)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_range(text):
    v = language_consistency(text)
    assert 0.0 <= v <= 1.0


def test_bad_target():
    with pytest.raises(ValueError, match="target must be one of"):
        LanguageRewardConfig(target="klingon")


def test_bad_max_chars():
    with pytest.raises(ValueError, match="max_chars must be in"):
        LanguageRewardConfig(max_chars=0)


def test_math_notation_is_not_a_foreign_language():
    """LaTeX command names and variables counted as Latin words: a Chinese thought with a
    fraction scored 0.4 toward zh; a one-letter word is a variable or symbol in either total."""
    zh = LanguageRewardConfig(target="zh")
    assert language_consistency("<think>设 x = 3，则 \\frac{x}{2} = 1.5</think>", zh) == 1.0
    assert language_consistency("<think>我们计算 \\sqrt{2} \\times \\sqrt{8} = 4</think>", zh) == 1.0
    assert word_counts("Let x be \\alpha times π", LANGUAGE_SCRIPTS["en"]) == (3, 3)
    # prose inside \text{} is still language
    assert word_counts("因此 \\text{apples}", LANGUAGE_SCRIPTS["zh"]) == (3, 2)


def test_a_greek_letter_touching_other_letters_is_a_symbol():
    """'2πr' and 'Δx' were two-letter words mixing Greek and Latin, so an all-English thought
    about a circle scored 0.714 (under the rejection filter's 0.95). A run of Greek letters is
    still a Greek word, and a Greek target keeps its letters."""
    en = LANGUAGE_SCRIPTS["en"]
    thought = "<think>The area is 2πr and Δx is small, so the slope is Δy/Δx.</think>\\boxed{1}"
    assert language_consistency(thought) == 1.0
    assert word_counts("αβγ δέλτα word", en) == (3, 1)
    assert word_counts("γράμμα δέλτα", LANGUAGE_SCRIPTS["el"]) == (2, 2)
    assert word_counts("pаssword", en) == (1, 0)  # a Cyrillic lookalike still spoils a word
