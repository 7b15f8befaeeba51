"""R1 stage 3's SFT set: non-reasoning rows mixed in at a share, deterministically; reading,
chat rendering and length filtering of SFT rows."""
import json
import logging
from collections import Counter

import pytest

from r1fast.data import CharTokenizer
from r1fast.pipeline import stages
from r1fast.pipeline.sft_data import (drop_long_rows, mix_non_reasoning, read_sft_rows,
                                      render_prompts, steps_for_epochs)

REASONING = [{"prompt": f"Q{i}", "completion": f"<think>r{i}</think> \\boxed{{{i}}}"}
             for i in range(30)]
GENERAL = [{"prompt": f"write {i}", "completion": f"text {i}"} for i in range(100)]


def _key(row):
    return (row["prompt"], row["completion"])


def test_mix_ratio_is_the_non_reasoning_share():
    mixed, counts = mix_non_reasoning(REASONING, GENERAL, 0.25, seed=0)
    by_source = Counter(r["source"] for r in mixed)
    assert by_source == {"reasoning": 30, "non_reasoning": 10}  # 10 / 40 = 0.25
    assert counts["non_reasoning_share"] == 0.25 and counts["reasoning"] == 30
    assert counts["non_reasoning"] == 10 and not counts["repeated"]
    # every reasoning row exactly once, non-reasoning rows distinct and from GENERAL
    assert sorted(_key(r) for r in mixed if r["source"] == "reasoning") == sorted(map(_key, REASONING))
    picked = [_key(r) for r in mixed if r["source"] == "non_reasoning"]
    assert len(set(picked)) == 10 and set(picked) <= set(map(_key, GENERAL))
    for ratio, n_extra in ((0.5, 30), (0.1, 3), (0.0, 0)):
        mixed, c = mix_non_reasoning(REASONING, GENERAL, ratio, seed=1)
        assert sum(r["source"] == "non_reasoning" for r in mixed) == n_extra == c["non_reasoning"]


def test_mix_is_deterministic_in_the_seed():
    a, _ = mix_non_reasoning(REASONING, GENERAL, 0.25, seed=3)
    b, _ = mix_non_reasoning(REASONING, GENERAL, 0.25, seed=3)
    c, _ = mix_non_reasoning(REASONING, GENERAL, 0.25, seed=4)
    assert a == b and a != c
    assert REASONING[0] == {"prompt": "Q0", "completion": "<think>r0</think> \\boxed{0}"}  # untouched


def test_too_few_rows_repeat_evenly_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="r1fast.pipeline"):
        mixed, counts = mix_non_reasoning(REASONING, GENERAL[:4], 0.25, seed=0)
    assert counts["repeated"] and counts["non_reasoning"] == 10
    uses = Counter(_key(r) for r in mixed if r["source"] == "non_reasoning")
    assert sorted(uses.values()) == [2, 2, 3, 3]
    assert "repeat" in caplog.text


@pytest.mark.parametrize("ratio, extra, match", [
    (1.0, GENERAL, r"mix ratio must be in \[0, 1\)"),
    (-0.1, GENERAL, r"mix ratio must be in \[0, 1\)"),
    (0.25, [], "needs non-reasoning rows"),
])
def test_bad_mix(ratio, extra, match):
    with pytest.raises(ValueError, match=match):
        mix_non_reasoning(REASONING, extra, ratio)


def test_read_rows_and_the_stage_helper(tmp_path):
    good = tmp_path / "general.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in GENERAL[:8]) + "\n")
    assert read_sft_rows(good) == GENERAL[:8]
    mixed, counts = stages.mix_sft_data(REASONING[:6], good, 0.25, seed=0)
    assert counts["non_reasoning"] == 2 and len(mixed) == 8
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GENERAL[0]) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl row 1 \(counting from 0\): a row must "
                                         r"have a str 'prompt'"):
        read_sft_rows(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl cannot be read as json: .*JSON"):
        read_sft_rows(bad)
    with pytest.raises(ValueError, match="does not exist"):
        read_sft_rows(tmp_path / "missing.jsonl")


def test_length_filter_counts_bos_and_eos(caplog):
    tok = CharTokenizer()
    rows = [{"prompt": "ab", "completion": "cd"}, {"prompt": "ab", "completion": "cdefg"}]
    kept, dropped = drop_long_rows(rows, tok, 6)  # 1 + 2 + 2 + 1 = 6 fits, 9 does not
    assert kept == rows[:1] and dropped == 1 and "dropped 1 of 2" in caplog.text
    with pytest.raises(ValueError, match="every SFT row is longer"):
        drop_long_rows(rows, tok, 5)
    assert steps_for_epochs(3, 17000, 96) == 532 and steps_for_epochs(0.01, 10, 96) == 1


def test_chat_rendering(tmp_path):
    from r1fast.data.hf_tokenizer import HFTokenizer
    from r1fast.data.tiny_hf import build_tokenizer

    build_tokenizer(tmp_path, ["What is 2 + 3? assistant user system"] * 20)
    hf = HFTokenizer.load(tmp_path)
    out = render_prompts([{"prompt": "What is 2 + 3?", "completion": "5"}], hf,
                         system_prompt="Think long.")
    assert out[0]["prompt"] == ("<|im_start|>system\nThink long.<|im_end|>\n<|im_start|>user\n"
                                "What is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    # the answer closes the turn as the template does: prompt + completion is what
    # transformers renders for the whole conversation
    assert out[0]["completion"] == "5<|im_end|>\n" and out[0]["completion_ends_turn"] is True
    whole = hf.tok.apply_chat_template([{"role": "system", "content": "Think long."},
                                        {"role": "user", "content": "What is 2 + 3?"},
                                        {"role": "assistant", "content": "5"}], tokenize=False)
    assert out[0]["prompt"] + out[0]["completion"] == whole
    assert render_prompts(out[:1], hf, chat_template=False) == out[:1]
    with pytest.raises(ValueError, match="system_prompt is set but"):
        render_prompts(out, CharTokenizer(), system_prompt="x")


def test_sft_rows_in_the_layouts_trl_and_sharegpt_users_bring(tmp_path):
    """SFT data was JSONL of string prompt/completion only: a parquet file failed with a raw
    UnicodeDecodeError, and TRL's conversational rows and ShareGPT (Sky-T1's release) were
    refused (helper-69). They are read, and a conversation is rendered as it is."""
    import datasets
    from r1fast.data.hf_tokenizer import HFTokenizer
    from r1fast.data.tiny_hf import build_tokenizer

    user = {"role": "user", "content": "What is 2 + 3?"}
    rows = [
        {"messages": [user, {"role": "assistant", "content": "5"}]},
        {"prompt": [{"role": "system", "content": "Be brief."}, user],
         "completion": [{"role": "assistant", "content": "5"}]},
        {"system": "Be brief.", "conversations": [{"from": "human", "value": "What is 2 + 3?"},
                                                  {"from": "gpt", "value": "5"}]},
        {"prompt": "What is 2 + 3?", "completion": "5"}]
    path = tmp_path / "sft.parquet"
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_sft_rows(tmp_path / "sft.jsonl")
    assert [r["prompt"] for r in got] == ["What is 2 + 3?"] * 4
    assert [r["completion"] for r in got] == ["5"] * 4
    conv = "_r1fast_conversation"
    assert got[0][conv] == [user] and conv not in got[3]
    assert got[1][conv] == got[2][conv] == [{"role": "system", "content": "Be brief."}, user]
    datasets.Dataset.from_list(rows[3:] * 2).to_parquet(str(path))
    assert read_sft_rows(path) == [rows[3]] * 2
    datasets.Dataset.from_list(rows[:1] * 2).to_parquet(str(path))  # conversations in parquet
    assert [r[conv] for r in read_sft_rows(path)] == [[user]] * 2
    # rendered: the conversation's own system message, the user turn alone otherwise
    build_tokenizer(tmp_path / "tok", ["What is 2 + 3? Be brief. assistant user system"] * 20)
    hf = HFTokenizer.load(tmp_path / "tok")
    out = render_prompts(got, hf)
    assert out[1]["prompt"] == out[2]["prompt"] == hf.apply_chat_template(got[1][conv])
    assert out[0]["prompt"] == out[3]["prompt"] == hf.apply_chat_template([user])
    # a row's own 'messages' (the whole dialogue, answer included) beside its prompt and
    # completion is not the prompt: it was rendered with the answer in it (helper-73)
    dialogue = [user, {"role": "assistant", "content": "5"}]
    (tmp_path / "whole.jsonl").write_text(  # and lmsys-chat-1m's / WildChat's 'conversation'
        json.dumps({**rows[3], "messages": dialogue}) + "\n"
        + json.dumps({**rows[3], "conversation": dialogue}) + "\n")
    assert [r["prompt"] for r in render_prompts(read_sft_rows(tmp_path / "whole.jsonl"), hf)] \
        == [out[3]["prompt"]] * 2
    with pytest.raises(ValueError, match="SFT row 1 .* is a chat conversation"):
        render_prompts(got, CharTokenizer())  # no template: a system message cannot be kept
    for bad, match in (
            ({"messages": [{"role": "assistant", "content": "5"}]}, "ending with a user turn"),
            ({"messages": [user, user]}, "must be one assistant message"),
            ({"conversations": [{"from": "bot", "value": "x"}]}, "'from' one of"),
            ({"prompt": [user], "completion": [{"role": "assistant", "content": ""}]},
             "non-empty str 'completion'")):
        (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=r"bad.jsonl row 0 \(counting from 0\): .*" + match):
            read_sft_rows(tmp_path / "bad.jsonl")


def test_sft_targets_end_the_turn_not_the_document(tmp_path):
    """A base tokenizer (eos ``<|endoftext|>``) with a ChatML template: the SFT target ends
    with the template's ``<|im_end|>`` and newline, with no eos after it; plain rows (no
    template) still end with eos."""
    from r1fast.data.hf_tokenizer import HFTokenizer
    from r1fast.data.tiny_hf import build_tokenizer
    from r1fast.train.sft import encode_sft_row

    build_tokenizer(tmp_path, ["What is 2 + 3? assistant user system"] * 20)
    hf = HFTokenizer.load(tmp_path)
    hf.tok.eos_token = "<|endoftext|>"  # as a base model's tokenizer has it
    row = render_prompts([{"prompt": "What is 2 + 3?", "completion": "5"}], hf)[0]
    prompt, completion = encode_sft_row(hf, row)
    im_end, newline = hf.tok.convert_tokens_to_ids("<|im_end|>"), hf.encode("\n")
    assert completion == hf.encode("5") + [im_end] + newline and hf.eos_id not in completion
    plain = render_prompts([{"prompt": "What is 2 + 3?", "completion": "5"}], hf,
                           chat_template=False)[0]
    assert encode_sft_row(hf, plain)[1] == hf.encode("5") + [hf.eos_id]
    kept, dropped = drop_long_rows([row], hf, len(prompt) + len(completion))
    assert kept == [row] and not dropped  # the length filter counts the same ids
    with pytest.raises(ValueError, match="completion_ends_turn must be true or false, got 'yes'"):
        encode_sft_row(hf, dict(row, completion_ends_turn="yes"))


def test_an_end_of_turn_without_a_stop_id_is_followed_by_eos(tmp_path, caplog):
    """A "role: content" template ends a turn with a newline, which no rollout stops at: the
    answer ends with it and then the eos, and a warning says so. A row already marked
    completion_ends_turn is not closed twice; rows marked prompt_rendered without the mark
    are named in a warning."""
    from r1fast.data.hf_tokenizer import HFTokenizer
    from r1fast.data.tiny_hf import build_tokenizer
    from r1fast.train.sft import encode_sft_row

    build_tokenizer(tmp_path, ["What is 2 + 3? assistant user system"] * 20)
    hf = HFTokenizer.load(tmp_path)
    plain = {"prompt": "What is 2 + 3?", "completion": "5"}
    closed = render_prompts([plain], hf)[0]
    assert render_prompts([dict(closed, prompt="x")], hf)[0]["completion"] == "5<|im_end|>\n"
    with caplog.at_level(logging.WARNING, logger="r1fast.pipeline"):
        render_prompts([dict(closed, prompt_rendered=True),
                        dict(plain, prompt_rendered=True)], hf)
    assert "1 SFT rows marked prompt_rendered do not say completion_ends_turn" in caplog.text
    hf.tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                            "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="r1fast.pipeline"):
        row = render_prompts([plain], hf)[0]
    assert row["completion"] == "5\n" and "completion_ends_turn" not in row
    assert encode_sft_row(hf, row)[1] == hf.encode("5\n") + [hf.eos_id]
    assert "which holds none of its stop ids" in caplog.text


def test_a_template_that_opens_the_thought_gets_no_second_think(tmp_path):
    """A thinking template's generation prompt ends with ``<think>\\n`` (DeepSeek-R1-Distill,
    QwQ): a cold-start target starting with its own ``<think>`` taught the model to open a
    second thought, which the format reward scores 0. The completion now continues the thought
    the prompt opened, and the rewards read it whole again."""
    from r1fast.data.hf_tokenizer import HFTokenizer
    from r1fast.data.tiny_hf import build_tokenizer
    from r1fast.rewards import FormatReward
    from r1fast.rewards.extract import as_scored

    build_tokenizer(tmp_path, ["What is 2 + 3? assistant user system think"] * 20)
    hf = HFTokenizer.load(tmp_path)
    hf.tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                            "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                            "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n"
                            "{% endif %}")
    completion = "<think>2 plus 3 is 5.</think> \\boxed{5}"
    row = render_prompts([{"prompt": "What is 2 + 3?", "completion": completion}], hf)[0]
    assert row["prompt"].endswith("<think>\n")
    assert row["completion"] == "2 plus 3 is 5.</think> \\boxed{5}<|im_end|>\n"
    read = as_scored(row["completion"], row["prompt"])
    assert read.count("<think>") == 1 and FormatReward()(read, {}) == 1.0



def _thinking(tmp_path, name="think"):
    """A tiny ChatML tokenizer whose generation prompt opens the thought (R1-Distill's way)."""
    from r1fast.data.hf_tokenizer import HFTokenizer
    from r1fast.data.tiny_hf import build_tokenizer

    build_tokenizer(tmp_path / name, ["What is 2 + 3? assistant user system think"] * 20)
    hf = HFTokenizer.load(tmp_path / name)
    hf.tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                            "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                            "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n"
                            "{% endif %}")
    return hf


def test_an_answer_without_a_thought_gets_an_empty_one_under_a_thinking_template(tmp_path,
                                                                                caplog):
    """R1's non-reasoning rows (a greeting) under a template that opens the thought were
    trained as an answer inside a thought never closed."""
    from r1fast.rewards.extract import as_scored, split_think

    hf = _thinking(tmp_path)
    with caplog.at_level(logging.WARNING, logger="r1fast.pipeline"):
        row = render_prompts([{"prompt": "hi", "completion": "Hello!"},
                              {"prompt": "q", "completion": "<think>a</think> b"}], hf)[0]
    assert row["completion"] == "\n</think>\n\nHello!<|im_end|>\n"
    assert (row["prompt"] + row["completion"]).endswith("<think>\n\n</think>\n\nHello!<|im_end|>\n")
    cot, answer = split_think(as_scored(row["completion"], row["prompt"]))
    assert cot.strip() == "" and answer.strip().startswith("Hello!")
    assert "1 of 2 SFT rows have no thought (no </think>)" in caplog.text


def test_a_distilled_row_keeps_the_thought_its_teachers_prompt_opened(tmp_path):
    """The teacher's prompt opened <think>, so its samples start inside the thought; a student
    whose template does not open it was trained on 'reasoning</think> answer' (format reward 0
    for the student, every rejection sample of it unparsable)."""
    from r1fast.data.hf_tokenizer import HFTokenizer
    from r1fast.data.tiny_hf import build_tokenizer
    from r1fast.rewards import FormatReward
    from r1fast.rewards.extract import as_scored

    teacher = _thinking(tmp_path)
    build_tokenizer(tmp_path / "student", ["What is 2 + 3? assistant user system think"] * 20)
    student = HFTokenizer.load(tmp_path / "student")
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    ex = {"prompt": teacher.apply_chat_template(messages), "prompt_messages": messages,
          "chat_rendered": True}
    sample = "2 and 3 make 5</think> \\boxed{5}"  # inside the thought the prompt opened
    rows = stages.sampled_rows([{"prompt": ex["prompt"], "completion": sample, "id": "t:0"}],
                               [ex], teacher)
    assert rows[0]["response"] == "<think>\n" + sample
    row = render_prompts(rows, student)[0]
    assert row["completion"] == "<think>\n" + sample + "<|im_end|>\n"
    assert FormatReward()(as_scored(row["completion"], row["prompt"]), {}) == 1.0
    other_thinker = _thinking(tmp_path, "think2")  # same markup: the row is used as written
    assert render_prompts(rows, other_thinker)[0]["completion"] == sample + "<|im_end|>\n"


def test_a_system_prompt_rows_do_not_get_is_a_warning(tmp_path, caplog):
    """Rows marked prompt_rendered keep their own prompt, so system_prompt does not reach them:
    that was an INFO line, which `r1fast stage` does not show."""
    from r1fast.data.hf_tokenizer import HFTokenizer
    from r1fast.data.tiny_hf import build_tokenizer

    build_tokenizer(tmp_path, ["What is 2 + 3? assistant user system"] * 20)
    hf = HFTokenizer.load(tmp_path)
    sampled = dict(render_prompts([{"prompt": "q", "completion": "5"}], hf)[0],
                   prompt_rendered=True)
    with caplog.at_level(logging.WARNING, logger="r1fast.pipeline"):
        render_prompts([sampled], hf, system_prompt="Think first.")
    assert "the chat template and system_prompt is not applied" in caplog.text


def test_rejection_sampled_prompts_are_not_templated_twice(tmp_path, caplog):
    """Rows that rejection sampling wrote carry the prompt the model saw, chat template
    included (``prompt_rendered``); an SFT recipe over them used to wrap it a second time."""
    from r1fast.data.hf_tokenizer import HFTokenizer
    from r1fast.data.tiny_hf import build_tokenizer

    build_tokenizer(tmp_path, ["What is 2 + 3? assistant user system"] * 20)
    hf = HFTokenizer.load(tmp_path)
    plain = {"prompt": "What is 2 + 3?", "completion": "5"}
    seen = render_prompts([plain], hf)[0]
    sampled = dict(seen, prompt_rendered=True)
    with caplog.at_level(logging.INFO, logger="r1fast.pipeline"):
        out = render_prompts([sampled, plain], hf)
    assert out == [sampled, seen]  # the marked row as written, the plain one templated once
    assert out[0]["prompt"].count("<|im_start|>user") == 1
    assert "1 of 2 SFT rows are marked prompt_rendered" in caplog.text


def test_a_share_that_rounds_to_no_rows_warns(caplog):
    mixed, counts = mix_non_reasoning(REASONING[:2], GENERAL, 0.1)  # 0.1 * 2 / 0.9 -> 0
    assert counts["non_reasoning"] == 0 and len(mixed) == 2
    assert "rounds to 0 rows: nothing is mixed in" in caplog.text


def test_rows_sampled_in_another_prompt_format_are_rendered_again(tmp_path, caplog):
    """Distillation into a student with its own tokenizer: rows sampled under the teacher's
    ChatML template are rendered again for the student (its format, its end of turn), not
    trained as foreign markup that never ends in the student's stop token; and rows sampled
    as plain text get a chat student's template."""
    from r1fast.data.hf_tokenizer import HFTokenizer
    from r1fast.data.tiny_hf import build_tokenizer
    from r1fast.pipeline.sft_data import prompt_format

    build_tokenizer(tmp_path, ["What is 2 + 3? assistant user system"] * 20)
    hf, char = HFTokenizer.load(tmp_path), CharTokenizer()
    question, answer = "What is 2 + 3?", "<think>2 and 3 make 5</think> \\boxed{5}"
    messages = [{"role": "user", "content": question}]
    chat_ex = {"prompt": hf.apply_chat_template(messages), "prompt_messages": messages,
               "chat_rendered": True}
    sampled = stages.sampled_rows([{"prompt": chat_ex["prompt"], "completion": answer,
                                    "id": "a.jsonl:0"}], [chat_ex], hf)
    assert sampled[0]["completion"] == answer + "<|im_end|>\n"
    assert sampled[0]["prompt_format"] == prompt_format(hf) != "plain"
    assert render_prompts(sampled, hf) == sampled  # the sampling model's own format: as written
    with caplog.at_level(logging.INFO, logger="r1fast.pipeline"):
        again = render_prompts(sampled, char)[0]
    assert (again["prompt"], again["completion"]) == (question, answer)
    assert "prompt_rendered" not in again and "completion_ends_turn" not in again
    assert "1 of 1 SFT rows were sampled in another prompt format" in caplog.text

    plain_ex = {"prompt": question, "chat_rendered": False}
    plain = stages.sampled_rows([{"prompt": question, "completion": answer, "id": "a.jsonl:0"}],
                                [plain_ex], char)
    assert plain[0]["prompt_format"] == "plain" and plain[0]["messages"] == messages
    want = render_prompts([{"prompt": question, "completion": answer}], hf)[0]
    got = render_prompts(plain, hf)[0]
    assert (got["prompt"], got["completion"], got["completion_ends_turn"]) == \
        (want["prompt"], want["completion"], True)
    older = {k: v for k, v in sampled[0].items() if k not in ("messages", "response")}
    with pytest.raises(ValueError, match=r"SFT row 0 \(id 'a.jsonl:0'\) was rendered for prompt "
                                         r"format 'chat:.*this model's is 'plain', and it lacks"):
        render_prompts([older], char)


def test_the_sft_stage_renders_prompts_for_a_chat_model(tmp_path, monkeypatch):
    """stages.sft (and so `r1fast stage sft --data`) trains a chat model as it is prompted:
    the template around each prompt, its end of turn after each answer."""
    import r1fast.train.sft as sft_module
    from r1fast.data.hf_tokenizer import HFTokenizer
    from r1fast.data.tiny_hf import build_tokenizer
    from r1fast.policy.config import ModelConfig

    build_tokenizer(tmp_path / "tok", ["What is 2 + 3? assistant user system"] * 20)
    hf = HFTokenizer.load(tmp_path / "tok")
    seen = []

    class Spy:
        engine = type("Engine", (), {"is_logger": True})  # the one writer of data_summary.json

        def __init__(self, cfg, rows, tokenizer):
            seen.extend(rows)

        def fit(self):
            return tmp_path / "model"

    monkeypatch.setattr(sft_module, "SFTTrainer", Spy)
    rows = [{"prompt": "What is 2 + 3?", "completion": "5"}]
    stages.sft(rows, tmp_path / "run", model=ModelConfig.preset("tiny-moe"), tokenizer=hf)
    assert seen == render_prompts(rows, hf)
    assert seen[0]["prompt"].startswith("<|im_start|>user") and seen[0]["completion_ends_turn"]


def test_a_fresh_student_is_sized_to_the_teachers_tokenizer(tmp_path, monkeypatch, caplog):
    """A preset student (the demo's 168-token vocabulary) distilled from a Hugging Face
    teacher: its embedding grows to hold every teacher token, with a WARNING, rather than an
    error naming neither --student nor --student-init."""
    from r1fast.data.hf_tokenizer import HFTokenizer
    from r1fast.data.tiny_hf import build_tokenizer
    from r1fast.policy.config import ModelConfig

    build_tokenizer(tmp_path / "teacher", ["What is 2 + 3? assistant user system"] * 20)
    size = HFTokenizer.load(tmp_path / "teacher").vocab_size
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2 + 3?", "completion": "5"}) + "\n")
    seen = {}
    def sft(rows, out, **kw):  # what the SFT stage records, without training
        seen.update(kw)
        out.mkdir(parents=True)
        (out / "data_summary.json").write_text('{"dropped_too_long": 0, "trained_rows": 1}')

    monkeypatch.setattr(stages, "sft", sft)
    student = ModelConfig.preset("tiny-dense").replace(vocab_size=168)
    assert size > 168
    with caplog.at_level(logging.WARNING, logger="r1fast.pipeline"):
        stages.distill(tmp_path / "teacher", [], tmp_path / "out", student=student,
                       teacher_data=data)
    assert seen["model"].vocab_size == -(-size // 8) * 8 >= size
    assert f"cannot hold the teacher's tokenizer ({size} tokens)" in caplog.text


def test_the_mix_share_is_that_of_the_rows_trained_on(tmp_path):
    """The non-reasoning share was set before the long rows were dropped, and those are mostly
    reasoning traces: 0.25 asked, 0.33 trained, and data_summary.json said 0.25 (helper-71).
    The sets are length-filtered first; a token budget past the model's context is refused."""
    from r1fast.pipeline.sft_recipe import SFTRecipe, prepare_rows

    traces = [{"prompt": f"Q{i}", "completion": "<think>" + "r" * (200 if i < 10 else 5)
               + "</think> 1"} for i in range(30)]  # 10 too long for 64 tokens
    data = tmp_path / "traces.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in traces))
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps(r) + "\n" for r in GENERAL))
    recipe = SFTRecipe(init_from="unused", data=str(data), mix=str(general), mix_ratio=0.25,
                       max_tokens=64)
    rows, summary = prepare_rows(recipe, CharTokenizer(), 128)
    share = sum(r["source"] == "non_reasoning" for r in rows) / len(rows)
    assert summary["mix"]["reasoning"] == 20 and summary["dropped_too_long"] == 10
    assert summary["mix"]["non_reasoning_share"] == pytest.approx(share)
    assert abs(share - 0.25) < 0.02 and summary["trained_rows"] == len(rows) == 27
    assert summary["rows"] == 30
    with pytest.raises(ValueError, match=r"sft.max_tokens=200 is more than the model's "
                                         r"max_position_embeddings=128"):
        prepare_rows(SFTRecipe(init_from="unused", data=str(data), max_tokens=200),
                     CharTokenizer(), 128)
