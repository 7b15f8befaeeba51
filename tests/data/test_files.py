"""Dataset files in the layouts users bring (r1fast.data.files), read with ``datasets``."""
import json

import datasets
import pytest

from r1fast.data.files import PRESETS, load_examples


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gsm8k_jsonl(tmp_path):
    rows = [{"question": "What is 2 + 3?", "answer": "2 plus 3.\n#### 5"},
            {"question": "Big?", "answer": "so #### 1,234"}]
    ex, report = load_examples(write_jsonl(tmp_path / "g.jsonl", rows), preset="gsm8k")
    assert [e["answer"] for e in ex] == ["5", "1234"] and ex[0]["question"] == "What is 2 + 3?"
    assert report.kept == 2 and report.bad == 0


def test_math_parquet_and_a_folder_of_files(tmp_path):
    folder = tmp_path / "math"
    folder.mkdir()
    for i in range(2):
        datasets.Dataset.from_list([{"problem": f"p{i}", "solution": f"so $\\boxed{{\\frac{{{i}}}{{2}}}}$"}]
                                   ).to_parquet(str(folder / f"part{i}.parquet"))
    ex, _ = load_examples(folder, preset="math")
    assert [e["answer"] for e in ex] == ["\\frac{0}{2}", "\\frac{1}{2}"]


def test_verl_parquet_routes_rewards_by_data_source(tmp_path, caplog):
    rows = [{"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "1+1?"}],
             "reward_model": {"ground_truth": "2", "style": "rule"}},
            {"data_source": "countdown", "prompt": [{"role": "user", "content": "make 4"}],
             "reward_model": {"ground_truth": "4", "style": "rule"}},
            {"data_source": "my/source", "prompt": [{"role": "system", "content": "s"},
                                                    {"role": "user", "content": "q"}],
             "reward_model": {"ground_truth": "x", "style": "rule"}}]
    path = tmp_path / "v.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    ex, _ = load_examples(path, preset="verl")
    assert [e.get("reward") for e in ex] == ["math_accuracy", "countdown", None]
    assert "rows of data_source ['my/source'] have no reward of their own" in caplog.text
    assert ex[2]["messages"][0]["role"] == "system" and ex[2]["answer"] == "x"


def test_custom_keys_and_a_row_reward_field(tmp_path):
    rows = [{"q": "a?", "a": 3, "reward": "format"}, {"q": "b?", "a": "4"}]
    ex, _ = load_examples(write_jsonl(tmp_path / "c.jsonl", rows), prompt_key="q", answer_key="a")
    assert [(e["answer"], e.get("reward")) for e in ex] == [("3", "format"), ("4", None)]


def test_a_worked_solution_in_the_answer_column_is_a_bad_row_naming_the_preset(tmp_path):
    """GSM8K read with prompt_key='question' alone took its worked solutions ('... #### 7') as
    the gold answers: every correct answer scored 0, without a word."""
    gsm8k = [{"question": f"q{i}", "answer": f"So 3+4=7.\n#### {i}"} for i in range(3)]
    with pytest.raises(ValueError, match=r"3 of 3 rows do not fit.*holds GSM8K's '####' line: "
                                         r"the column is a worked solution \(data.preset = "
                                         r"\"gsm8k\""):
        load_examples(write_jsonl(tmp_path / "g.jsonl", gsm8k), prompt_key="question")
    # a MATH solution as the gold is scored right (math-verify reads its boxed answer): kept
    math = [{"problem": "p", "solution": "Add them: $\\boxed{7}$."},
            {"problem": "q", "solution": "\\(\\boxed{8}\\)"}]
    ex, _ = load_examples(write_jsonl(tmp_path / "m.jsonl", math), prompt_key="problem",
                          answer_key="solution")
    assert [e["answer"] for e in ex] == ["Add them: $\\boxed{7}$.", "\\(\\boxed{8}\\)"]
    from r1fast.rewards.math import MathAccuracyReward

    assert MathAccuracyReward()("<think>x</think> \\boxed{7}", ex[0]) == 1.0
    assert MathAccuracyReward()("<think>x</think> \\boxed{8}", ex[0]) == 0.0


def test_bad_rows_are_counted_and_a_mostly_bad_file_is_an_error(tmp_path, caplog):
    good = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(4)]
    bad = [{"question": "", "answer": "#### 1"}, {"question": "q", "answer": "no marker"}]
    ex, report = load_examples(write_jsonl(tmp_path / "b.jsonl", good + bad), preset="gsm8k")
    assert report.kept == 4 and report.bad == 2 and report.first_bad_row == 4
    assert "empty" in report.first_bad_reason and "2 bad rows skipped" in report.summary()
    with pytest.raises(ValueError, match=r"m.jsonl: 3 of 4 rows do not fit the layout "
                                         r"\(preset='gsm8k'.*first bad: m.jsonl row 1 \(counting from 0\): missing key"):
        load_examples(write_jsonl(tmp_path / "m.jsonl", good[:1] + [{"x": 1}] * 3),
                      preset="gsm8k")


def test_values_are_read_as_written_and_ambiguous_rows_are_bad(tmp_path):
    """Float answers positionally (str() would give '1e-05'), a MATH solution with two boxes
    and fractional countdown numbers are bad rows naming why, TinyZero's countdown ground truth
    gives the countdown fields, and verl messages that are not dicts are a bad row."""
    path = tmp_path / "f.parquet"
    datasets.Dataset.from_list([{"prompt": "p", "answer": v} for v in (1e-05, 1e16, 72.5)]
                               ).to_parquet(str(path))
    ex, report = load_examples(path)
    assert [e["answer"] for e in ex] == ["0.00001", "72.5"]
    # 1e16 may have been 10000000000000001 before the column became floats: a bad row, named
    assert report.first_bad_row == 1 and "is a float above 2^53" in report.first_bad_reason
    # JSON numbers are read as written (an integer beside a decimal stays whole) ...
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(f'{{"prompt": "p{i}", "answer": {a}}}\n' for i, a in
                             enumerate(["12345678901234567891", "1.5", "2", "3"])))
    ex, report = load_examples(mixed)
    assert [e["answer"] for e in ex] == ["12345678901234567891", "1.5", "2", "3"]
    # ... a parquet column of 64-bit floats may have lost a big integer's digits: a bad row
    datasets.Dataset.from_list([{"prompt": f"p{i}", "answer": a} for i, a in
                                enumerate([12345678901234567891.0, 1.5, 2.0, 3.0])]
                               ).to_parquet(str(tmp_path / "mixed.parquet"))
    ex, report = load_examples(tmp_path / "mixed.parquet")
    assert [e["answer"] for e in ex] == ["1.5", "2.0", "3.0"] and report.first_bad_row == 0
    assert "is a float above 2^53" in report.first_bad_reason

    rows = [{"problem": f"p{i}", "solution": "\\boxed{2}"} for i in range(3)]
    rows.append({"problem": "two parts", "solution": "(a) \\boxed{2} (b) \\boxed{3}"})
    rows.append({"problem": "restated", "solution": "so \\boxed{5}. Indeed: \\boxed{ 5 }"})
    ex, report = load_examples(write_jsonl(tmp_path / "m.jsonl", rows), preset="math")
    assert report.bad == 1 and report.first_bad_row == 3 and ex[-1]["answer"] == " 5 "
    assert "2 different \\boxed{} answers" in report.first_bad_reason
    fbox = [{"problem": "p", "solution": "so it is $\\fbox{7}$."}]  # as a few MATH rows write it
    ex, _ = load_examples(write_jsonl(tmp_path / "fbox.jsonl", fbox), preset="math")
    assert ex[0]["answer"] == "7"

    rows = [{"nums": [3, 5, 7], "target": 8}] * 3 + [{"nums": [3.7, 2], "target": 10}]
    ex, report = load_examples(write_jsonl(tmp_path / "c.jsonl", rows), preset="countdown")
    assert ex[0]["numbers"] == [3, 5, 7] and report.first_bad_row == 3
    assert report.first_bad_reason == "nums must hold integers, got 3.7"

    verl = [{"data_source": "countdown", "prompt": [{"role": "user", "content": "make 10"}],
             "reward_model": {"ground_truth": {"target": 10, "numbers": [2, 5, 1]}}}] * 3
    verl.append({"data_source": "x", "prompt": ["not a message"],
                 "reward_model": {"ground_truth": "1"}})
    ex, report = load_examples(write_jsonl(tmp_path / "v.jsonl", verl), preset="verl")
    assert (ex[0]["numbers"], ex[0]["target"], ex[0]["reward"]) == ([2, 5, 1], 10, "countdown")
    assert report.first_bad_row == 3 and "list of {role, content}" in report.first_bad_reason


@pytest.mark.parametrize("path,kw,match", [
    ("nope.jsonl", {}, "data path .*nope.jsonl does not exist"),
    ("x.csv", {}, r"must end in one of \['.json', '.jsonl', '.parquet'\]"),
    ("ok.jsonl", {"preset": "alpaca"}, "data.preset must be one of"),
    ("ok.jsonl", {"preset": "gsm8k", "prompt_key": "q"}, "cannot be combined with data.preset"),
])
def test_bad_arguments(tmp_path, path, kw, match):
    write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "p", "answer": "1"}])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=match):
        load_examples(tmp_path / path, **kw)


def test_every_preset_is_documented():
    import r1fast.data.files as files

    for name in PRESETS:
        assert f"``{name}``" in files.__doc__


def test_dapo_math_17k_as_published(tmp_path):
    """The DAPO-Math-17k parquet has no 'answer' column (every row was a bad row); its prompt
    is a chat list wrapping the problem in DAPO's own "Answer:" instruction, which the preset
    takes off so the run's template (r1-zero's \\boxed{}) is the only one."""
    from r1fast.data.files import DAPO_PREFIX, DAPO_SUFFIX

    def row(content, truth):
        return {"data_source": "math_dapo", "ability": "MATH", "extra_info": {"index": "i"},
                "prompt": [{"role": "user", "content": content}],
                "reward_model": {"ground_truth": truth, "style": "rule-lighteval/MATH_v2"}}

    rows = [row(DAPO_PREFIX + "What is $1+1$?" + DAPO_SUFFIX, "2"), row("Plain: 3+4?", "7")]
    path = tmp_path / "dapo.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    ex, report = load_examples(path, preset="dapo")
    assert report.kept == 2
    assert ex[0]["question"] == "What is $1+1$?" and "messages" not in ex[0]
    assert (ex[0]["answer"], ex[0]["reward"]) == ("2", "math_accuracy")
    assert ex[1]["messages"] == [{"role": "user", "content": "Plain: 3+4?"}]  # as written


def test_a_chat_prompt_must_end_with_a_user_turn_that_says_something(tmp_path):
    """A conversation ending in the assistant's turn (an SFT row pointed at as a prompt) put
    the gold answer in the prompt, and a blank last message was kept and failed later without
    naming the row: both are bad rows now."""
    def verl(messages):
        return {"data_source": "openai/gsm8k", "prompt": messages,
                "reward_model": {"ground_truth": "5"}}

    user = {"role": "user", "content": "What is 2+3?"}
    rows = [verl([user])] * 3 + [verl([user, {"role": "assistant", "content": "5"}]),
                                 verl([{"role": "user", "content": "   "}])]
    ex, report = load_examples(write_jsonl(tmp_path / "v.jsonl", rows), preset="verl")
    assert report.kept == 3 and report.bad == 2 and report.first_bad_row == 3
    assert "end with the user's turn, not 'assistant'" in report.first_bad_reason


def test_a_folder_reads_each_file_and_names_files_and_rows(tmp_path, caplog):
    """Files of a folder are read one by one: differing columns are fine, a bad row is named by
    its file and its row there, a file that cannot be read is an error naming it, and files
    that are not read are named in a warning (they were silently ignored)."""
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"prompt": f"p{i}", "answer": str(i)} for i in range(3)])
    write_jsonl(folder / "b.jsonl", [{"prompt": "q", "answer": 4, "extra": 1},
                                     {"prompt": "r", "answer": [1]}])  # a list: a bad row
    (folder / "c.JSONL").write_text("{}\n")
    (folder / "d.jsonl.gz").write_bytes(b"")
    (folder / ".hidden").write_text("")
    with caplog.at_level("WARNING", logger="r1fast.data"):
        ex, report = load_examples(folder)
    assert [e["id"] for e in ex] == ["a.jsonl:0", "a.jsonl:1", "a.jsonl:2", "b.jsonl:0"]
    assert ex[3]["answer"] == "4" and report.first_bad_where == "b.jsonl:1"
    assert "first: b.jsonl row 1 (counting from 0)" in report.summary()
    assert "2 entries not read" in caplog.text and "c.JSONL, d.jsonl.gz" in caplog.text
    (folder / "e.jsonl").write_text('{"prompt": "p", "answer": "1"}\n{"prompt": oops\n')
    with pytest.raises(ValueError, match=r"data file .*e.jsonl cannot be read as json: .*JSON"):
        load_examples(folder)


def test_a_folder_of_several_splits_is_refused(tmp_path):
    """A Hugging Face snapshot folder holds train-*.parquet beside test-*.parquet: read whole,
    the test rows became training rows without a word. One split's shards still read."""
    folder = tmp_path / "gsm8k" / "main"
    folder.mkdir(parents=True)
    row = {"question": "q", "answer": "#### 1"}
    for name in ("train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl"):
        write_jsonl(folder / name, [row])
    ex, _ = load_examples(folder, preset="gsm8k")
    assert len(ex) == 2
    write_jsonl(folder / "test-00000-of-00001.jsonl", [row])
    with pytest.raises(ValueError, match=r"main holds the files of 2 splits \(test: "
                                         r"test-00000-of-00001.jsonl; train: "
                                         r"train-00000-of-00002.jsonl, train-00001-of-00002"
                                         r".jsonl\) and would read them all"):
        load_examples(folder, preset="gsm8k")
    # names that merely start like a split are not one
    other = tmp_path / "other"
    other.mkdir()
    for name in ("training_set.jsonl", "testing.jsonl", "valuable.jsonl"):
        write_jsonl(other / name, [row])
    assert len(load_examples(other, preset="gsm8k")[0]) == 3


def test_json_values_are_read_exactly_as_written(tmp_path):
    """datasets gives a JSON column one type: integer answers beside strings came back changed
    ("007" as 7, "1e3" as 1000.0, "[1, 2]" as a list: a bad row) or, spread over a large
    file, failed with 'Failed to parse string ... as a scalar of type int64' (helper-69)."""
    answers = [3, "1/2", "007", "1e3", "[1, 2]", "\\frac12"]
    rows = [{"prompt": f"p{i}", "answer": a} for i, a in enumerate(answers)]
    ex, report = load_examples(write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert [e["answer"] for e in ex] == ["3", *answers[1:]] and report.bad == 0
    (tmp_path / "list.json").write_text(json.dumps(rows, indent=1))  # one list of rows
    assert [e["answer"] for e in load_examples(tmp_path / "list.json")[0]] == ["3", *answers[1:]]
    (tmp_path / "bom.jsonl").write_text(json.dumps(rows[0]) + "\n", encoding="utf-8-sig")
    assert load_examples(tmp_path / "bom.jsonl")[0][0]["answer"] == "3"  # a byte-order mark
    (tmp_path / "big.jsonl").write_text(json.dumps(rows[0]) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"big.jsonl: row 1 is a list, not a JSON object"):
        load_examples(tmp_path / "big.jsonl")
    # a whole float beyond 2^53 is the integer written: was a bad row "above 2^53" (helper-73)
    big = [{"prompt": "Avogadro?", "answer": 6.02e23}, {"prompt": "p", "answer": 1e16}]
    ex, report = load_examples(write_jsonl(tmp_path / "big_float.jsonl", big))
    assert [e["answer"] for e in ex] == ["602000000000000000000000", "10000000000000000"]
    # a fraction written there is not whole, though its float is: still a counted bad row
    (tmp_path / "half.jsonl").write_text('{"prompt": "p", "answer": 12345678901234567891.5}\n'
                                         '{"prompt": "q", "answer": 2}\n')
    ex, report = load_examples(tmp_path / "half.jsonl")
    assert [e["answer"] for e in ex] == ["2"] and "is a float above 2^53" in report.first_bad_reason
    # errors name the line that is wrong (it named the next one), and a file that is not UTF-8
    (tmp_path / "brace.jsonl").write_text('{"prompt": "p", "answer": 1}\n{"prompt": "q"\n')
    with pytest.raises(ValueError, match=r"brace.jsonl cannot be read as json: line 2: "):
        load_examples(tmp_path / "brace.jsonl")
    (tmp_path / "latin.jsonl").write_bytes(b'{"prompt": "caf\xe9", "answer": 1}\n')
    with pytest.raises(ValueError, match=r"latin.jsonl cannot be read as json: it is not UTF-8"):
        load_examples(tmp_path / "latin.jsonl")
    (tmp_path / "broken.json").write_text('[{"prompt": "p", "answer": 1},\n {"prompt": }]')
    with pytest.raises(ValueError, match=r"broken.json cannot be read as json: line 2: "
                                         r"Expecting value"):
        load_examples(tmp_path / "broken.json")
