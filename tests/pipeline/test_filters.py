"""R1 stage 3's rejection-sampling filters on hand-written samples: every reason named and
counted, the first failing rule wins, the presets, and the stage's summary file."""
import dataclasses

import pytest

from r1fast.pipeline.filters import (REASONS, RejectionFilterConfig, filter_samples,
                                     format_summary, has_code_block, longest_paragraph,
                                     rejection_reason)
from r1fast.rewards import get_reward

EX = {"prompt": "Q: 2 + 3 = ?\nA: ", "answer": "5", "id": 7}  # a math row (math accuracy)
GOOD = "<think>First add the ones: 2 + 3 = 5.</think> \\boxed{5}"
GREEK = "\u03c0\u03c1\u03ce\u03c4\u03b1 \u03c4\u03b9\u03c2 \u03bc\u03bf\u03bd\u03ac\u03b4\u03b5\u03c2"
SAMPLES = {  # reason -> a sample failing that rule (and, by construction, no earlier one)
    "empty": " \n",
    "too_long": "<think>" + "add the ones. " * 30 + "</think> \\boxed{5}",
    "unparsable": "the answer is 5",
    "wrong": "<think>First add the ones.</think> \\boxed{6}",
    "mixed_language": f"<think>First add the ones, {GREEK}.</think> \\boxed{{5}}",
    "long_paragraph": "<think>" + "add the ones " * 18 + "</think> \\boxed{5}",
    "code_block": "<think>Run it:\n```python\nprint(2 + 3)\n```\n</think> \\boxed{5}",
    "duplicate": "  <think>First add the ones:   2 + 3 = 5.</think>\n\\boxed{5} ",
}
RULES = RejectionFilterConfig(max_chars=300, max_paragraph_chars=200)
MATH = get_reward("math_accuracy")


def test_each_reason_on_its_own_sample():
    for reason, text in SAMPLES.items():
        kept = {" ".join(GOOD.split())}  # GOOD was kept before: only the duplicate collides
        assert rejection_reason(text, EX, MATH, RULES, kept) == reason, reason
    assert rejection_reason(GOOD, EX, MATH, RULES, set()) is None
    # the long samples are long for their own rule only
    assert len(SAMPLES["too_long"]) > 300 >= len(SAMPLES["long_paragraph"])
    assert longest_paragraph(SAMPLES["long_paragraph"]) > 200


def test_batch_counts_every_reason_once_and_keeps_the_rest():
    samples = [[GOOD, *SAMPLES.values(), GOOD + " and then"], [GOOD]]
    cut = [[False] * (len(SAMPLES) + 1) + [True], [False]]  # the last one hit the token limit
    examples = [EX, {**EX, "id": 8, "prompt": "other"}]
    rows, summary = filter_samples(examples, samples, lambda ex: MATH, RULES, truncated=cut)
    # every reason once but the checker's own failures (test_filters_checker_errors.py)
    assert summary["rejected"] == {**dict.fromkeys(REASONS, 1), "timeout": 0, "checker_error": 0}
    assert list(summary["rejected"]) == list(REASONS)
    assert summary["samples"] == 11 and summary["kept"] == 2 and summary["prompts"] == 2
    assert summary["kept"] + sum(summary["rejected"].values()) + summary["over_limit"] == 11
    assert summary["prompts_with_a_kept_sample"] == 2
    assert rows == [{"prompt": EX["prompt"], "completion": GOOD, "id": 7},
                    {"prompt": "other", "completion": GOOD, "id": 8}]
    assert summary["rules"]["max_paragraph_chars"] == 200
    table = format_summary(summary)
    assert "kept 2 (18.2%)" in table and "mixed_language" in table and "9.1%" in table


def test_a_prompt_that_opened_the_thought_is_read_with_it():
    """A thinking model's template ends the prompt with '<think>\n': its completions start
    inside the thought, pass the format rule, and are kept as written (without the tag)."""
    opened = {**EX, "prompt": EX["prompt"] + "<think>\n"}
    inside = GOOD.removeprefix("<think>")
    assert rejection_reason(inside, EX, MATH, RULES, set()) == "unparsable"
    assert rejection_reason(inside, opened, MATH, RULES, set()) is None
    assert rejection_reason(GOOD, opened, MATH, RULES, set()) == "unparsable"  # opened twice
    mixed = SAMPLES["mixed_language"].removeprefix("<think>")
    assert rejection_reason(mixed, opened, MATH, RULES, set()) == "mixed_language"
    rows, _ = filter_samples([opened], [[inside]], lambda ex: MATH, RULES)
    assert rows == [{"prompt": opened["prompt"], "completion": inside, "id": 7}]


def test_first_failing_rule_is_the_one_counted():
    wrong_and_mixed = f"<think>First add the ones, {GREEK}.</think> \\boxed{{6}}"
    assert rejection_reason(wrong_and_mixed, EX, MATH, RULES, set()) == "wrong"
    long_and_unparsable = "x" * 400
    assert rejection_reason(long_and_unparsable, EX, MATH, RULES, set()) == "too_long"


def test_thresholds_and_switches():
    text = SAMPLES["mixed_language"]  # 4 of 7 thought words English
    assert rejection_reason(text, EX, MATH, dataclasses.replace(RULES, min_language_share=0.5),
                            set()) is None
    assert rejection_reason(text, EX, MATH, dataclasses.replace(RULES, language=None),
                            set()) is None
    el = dataclasses.replace(RULES, language="el", min_language_share=0.5)
    assert rejection_reason(text, EX, MATH, el, set()) == "mixed_language"  # 3/7 Greek
    assert rejection_reason(SAMPLES["long_paragraph"], EX, MATH,
                            dataclasses.replace(RULES, max_paragraph_chars=0), set()) is None
    assert rejection_reason(SAMPLES["code_block"], EX, MATH,
                            dataclasses.replace(RULES, reject_code_blocks=False), set()) is None
    assert rejection_reason(SAMPLES["duplicate"], EX, MATH,
                            dataclasses.replace(RULES, dedupe=False), {" ".join(GOOD.split())}) is None
    # a thought without words (the demo's column sums) is not mixed
    assert rejection_reason("<think>5+4=9 7+3=10</think> \\boxed{109}",
                            {"answer": "109"}, MATH, RULES, set()) is None


def test_paragraphs_and_code_fences():
    assert longest_paragraph("ab\ncd\n\nefghij\n  \nk") == 6  # "ab\ncd" is 5, blank lines split
    assert longest_paragraph("a\r\n\r\nbcd") == 3
    assert not has_code_block("one ``` fence only") and has_code_block("``` x ```")
    assert not has_code_block("`inline` code")


def test_presets_and_per_prompt_limit():
    samples = [[GOOD, SAMPLES["unparsable"], SAMPLES["wrong"], GOOD]]
    _, s = filter_samples([EX], samples, lambda ex: MATH, RejectionFilterConfig.for_keep("all"))
    assert s["kept"] == 3 and s["rejected"]["duplicate"] == 1
    _, s = filter_samples([EX], samples, lambda ex: MATH,
                          RejectionFilterConfig.for_keep("well_formed"))
    assert s["kept"] == 2 and s["rejected"]["unparsable"] == 1 and s["rejected"]["wrong"] == 0
    rows, s = filter_samples([EX], [[GOOD, GOOD.replace("First", "So")]], lambda ex: MATH,
                             RejectionFilterConfig(), keep_per_prompt=1)
    assert s["kept"] == 1 and s["over_limit"] == 1 and rows[0]["completion"] == GOOD


def test_samples_cut_at_the_token_limit_are_dropped_by_every_preset():
    """A cut completion (even a correct one whose box came before the cut) became an SFT row
    ending in eos; it is now dropped as ``truncated`` unless reject_truncated is off."""
    cut = [[GOOD, GOOD + " and then"]]
    for keep in ("all", "well_formed", "correct"):
        rows, s = filter_samples([EX], cut, lambda ex: MATH, RejectionFilterConfig.for_keep(keep),
                                 truncated=[[False, True]])
        assert s["kept"] == 1 and s["rejected"]["truncated"] == 1 and rows[0]["completion"] == GOOD
    rows, s = filter_samples([EX], cut, lambda ex: MATH, RejectionFilterConfig(
        reject_truncated=False, dedupe=False, require_correct=False), truncated=[[False, True]])
    assert s["kept"] == 2 and s["rejected"]["truncated"] == 0
    with pytest.raises(ValueError, match="one flag per sample"):
        filter_samples([EX], cut, lambda ex: MATH, RejectionFilterConfig(), truncated=[[True]])


@pytest.mark.parametrize("kwargs, match", [
    ({"min_language_share": 1.5}, "min_language_share must be in"),
    ({"max_paragraph_chars": -1}, "max_paragraph_chars must be in"),
    ({"language": "klingon"}, "language must be one of"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RejectionFilterConfig(**kwargs)
    with pytest.raises(ValueError, match="keep must be one of"):
        RejectionFilterConfig.for_keep("best")
    with pytest.raises(ValueError, match="keep_per_prompt must be >= 1"):
        filter_samples([EX], [[GOOD]], lambda ex: MATH, RejectionFilterConfig(), keep_per_prompt=0)
