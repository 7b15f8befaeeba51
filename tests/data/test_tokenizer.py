"""Character tokenizer: layout, round trips over generated data, save/load, bad input."""
import json

import pytest
from hypothesis import given, settings, strategies as st

from r1fast.data.tasks import generate_arithmetic, generate_countdown
from r1fast.data.template import sft_example
from r1fast.data.tokenizer import (DEFAULT_ALPHABET, SCRIPT_ALPHABETS, SPECIAL_TOKENS, CharTokenizer,
                                   Tokenizer)
from r1fast.rewards.language import language_consistency, script_of

TOK = CharTokenizer()


def test_layout():
    assert TOK.vocab_size == len(TOK) == 102 < 128
    assert (TOK.pad_id, TOK.bos_id, TOK.eos_id, TOK.unk_id, TOK.think_id, TOK.think_end_id) == (0, 1, 2, 3, 4, 5)
    assert TOK.id_to_token[:6] == list(SPECIAL_TOKENS)
    assert TOK.encode("<think></think>") == [4, 5]
    assert TOK.encode("A", add_bos=True, add_eos=True) == [1, 6 + DEFAULT_ALPHABET.index("A"), 2]
    assert Tokenizer is CharTokenizer and CharTokenizer() == TOK


def test_round_trip_generated_data():
    data = generate_countdown(50, seed=0) + generate_arithmetic(50, seed=0)
    for e in data:
        for text in (e["prompt"], sft_example(e)["completion"], e["prompt"] + sft_example(e)["completion"]):
            ids = TOK.encode(text, errors="strict")
            assert all(0 <= i < TOK.vocab_size for i in ids)
            assert TOK.decode(ids) == text
        assert TOK.encode(sft_example(e)["completion"]).count(TOK.think_id) == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(alphabet=DEFAULT_ALPHABET, max_size=20),
                          st.sampled_from(["<think>", "</think>", "<", "<eos>", "</"])), max_size=12))
def test_round_trip_property(pieces):
    text = "".join(pieces)
    ids = TOK.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id
    assert TOK.decode(ids) == text
    assert TOK.decode(ids, skip_special_tokens=False) == "<bos>" + text + "<eos>"


def test_unknown_characters_are_an_error_unless_replacement_is_asked_for():
    with pytest.raises(ValueError, match=r"character 'é' \(U\+00E9\) at position 1 outside the "
                                         r"alphabet of CharTokenizer\(vocab_size=102\): 'a\\xe9'|"
                                         r"character 'é' \(U\+00E9\) at position 1"):
        TOK.encode("a\u00e9")  # never a silent <unk>
    assert TOK.encode("a\u00e9b", errors="replace") == [TOK.encode("a")[0], TOK.unk_id,
                                                        TOK.encode("b")[0]]
    assert TOK.decode(TOK.encode("a\u00e9", errors="replace")) == "a\ufffd"


def test_encode_batch_padding():
    ids, mask = TOK.encode_batch(["ab", "abcd"], add_bos=True)
    assert ids[0][:2] == [0, 0] and mask == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    ids, mask = TOK.encode_batch(["ab", "abcd"], padding_side="right")
    assert ids[0][2:] == [0, 0] and mask[0] == [1, 1, 0, 0]
    assert TOK.encode_batch([]) == ([], [])


def test_save_load(tmp_path):
    path = TOK.save(tmp_path / "ckpt")
    assert path.endswith("tokenizer.json")
    assert CharTokenizer.load(tmp_path / "ckpt") == TOK
    assert CharTokenizer.load(path) == TOK
    fitted = CharTokenizer.fit(["<think>cab</think>", "ba!"])
    assert fitted.alphabet == "!abc"
    fitted.save(tmp_path / "f")
    again = CharTokenizer.load(tmp_path / "f")
    assert again == fitted and again.decode(again.encode("<think>abc!")) == "<think>abc!"
    assert json.loads(open(path).read())["vocab"] == TOK.id_to_token  # plain, diffable JSON


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="alphabet must not repeat characters"):
        CharTokenizer("aab")
    with pytest.raises(ValueError, match="alphabet must have at most 250 characters"):
        CharTokenizer("".join(chr(0x100 + i) for i in range(251)))
    with pytest.raises(ValueError, match="script must be one of .*'greek'.*got 'klingon'"):
        CharTokenizer.with_scripts("greek", "klingon")
    with pytest.raises(ValueError, match="scripts must name at least one"):
        CharTokenizer.with_scripts()
    with pytest.raises(ValueError, match="alphabet must be a non-empty str"):
        CharTokenizer("")
    with pytest.raises(ValueError, match="text must be a str"):
        TOK.encode(b"bytes")
    with pytest.raises(ValueError, match="errors must be one of"):
        TOK.encode("a", errors="ignore")
    with pytest.raises(ValueError, match=r"token id must be in \[0, 102\), got 102"):
        TOK.decode([102])
    with pytest.raises(ValueError, match=r"token id must be in \[0, 102\), got -1"):
        TOK.decode([-1])
    with pytest.raises(ValueError, match="padding_side must be one of"):
        TOK.encode_batch(["a"], padding_side="middle")
    with pytest.raises(ValueError, match="path must be a directory holding tokenizer.json"):
        CharTokenizer.load(tmp_path / "missing")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="tokenizer data must have format"):
        CharTokenizer.load(bad)
    bad.write_text(json.dumps({**TOK.to_dict(), "version": 99}))
    with pytest.raises(ValueError, match="tokenizer version must be 1"):
        CharTokenizer.load(bad)
    bad.write_text(json.dumps({**TOK.to_dict(), "vocab": list(SPECIAL_TOKENS) + ["ab"]}))
    with pytest.raises(ValueError, match="single characters"):
        CharTokenizer.load(bad)


# -- a second script ---------------------------------------------------------------------------
MIXED = "<think>First add the ones, \u03c0\u03c1\u03ce\u03c4\u03b1 \u03c4\u03b9\u03c2 \u03bc\u03bf\u03bd\u03ac\u03b4\u03b5\u03c2, then the tens.</think> \\boxed{5}"


def test_second_script_keeps_default_ids():
    greek = CharTokenizer.with_scripts("greek")
    assert greek.id_to_token[:TOK.vocab_size] == TOK.id_to_token  # a default model stays valid
    assert greek.vocab_size == TOK.vocab_size + len(SCRIPT_ALPHABETS["greek"])
    both = CharTokenizer.with_scripts("greek", "cyrillic")
    assert both.vocab_size == 102 + 63 + 66 <= 256
    for name, script in (("greek", "GREEK"), ("cyrillic", "CYRILLIC")):
        letters = SCRIPT_ALPHABETS[name]
        assert all(script_of(c) == script for c in letters), name  # really that script's letters
        assert len(set(letters)) == len(letters)
    assert "\u03c2" in SCRIPT_ALPHABETS["greek"] and "\u03ce" in SCRIPT_ALPHABETS["greek"]  # ς, ώ
    assert "\u0451" in SCRIPT_ALPHABETS["cyrillic"]  # ё


def test_mixed_sentence_scores_the_same_after_a_round_trip(tmp_path):
    """The language reward sees what the model wrote: 7 English words + 3 Greek ones."""
    raw = language_consistency(MIXED)
    assert raw == pytest.approx(7 / 10)
    greek = CharTokenizer.with_scripts("greek")
    greek.save(tmp_path)
    loaded = CharTokenizer.load(tmp_path)  # what a model folder hands the sampler
    ids = loaded.encode(MIXED)
    assert max(ids) >= TOK.vocab_size and loaded.decode(ids) == MIXED
    assert language_consistency(loaded.decode(ids)) == raw
    # the default alphabet cannot carry Greek: strict refuses, replace hides the mixing
    with pytest.raises(ValueError, match="outside the alphabet"):
        TOK.encode(MIXED)
    assert language_consistency(TOK.decode(TOK.encode(MIXED, errors="replace"))) == 1.0
    cyr = "<think>add \u0441\u043b\u043e\u0436\u0438\u0442\u044c \u0401\u0436 ones</think>"
    both = CharTokenizer.with_scripts("greek", "cyrillic")
    assert both.decode(both.encode(cyr)) == cyr
    assert language_consistency(cyr) == pytest.approx(2 / 4)


def test_mixed_sentence_round_trip_with_a_real_bpe_tokenizer(tmp_path):
    """A byte-level BPE (the tiny HF world's) carries any script: same score after the trip."""
    from r1fast.data.hf_tokenizer import HFTokenizer
    from r1fast.data.tiny_hf import build_tokenizer

    build_tokenizer(tmp_path, ["What is 2 + 3? First add the ones, then the tens."] * 20)
    hf = HFTokenizer.load(tmp_path)
    ids = hf.encode(MIXED)
    assert hf.decode(ids) == MIXED
    assert language_consistency(hf.decode(ids)) == language_consistency(MIXED) == pytest.approx(7 / 10)


def test_an_unknown_token_written_in_the_text_is_not_a_failure():
    """GPT-2 and GPT-NeoX make <|endoftext|> their unk, bos and eos, and a template writes
    it: every prompt was refused as holding text the tokenizer cannot encode. A word the
    vocabulary lacks is still refused."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from r1fast.data.hf_tokenizer import HFTokenizer

    end = "<|endoftext|>"
    word = Tokenizer(models.WordLevel({end: 0, "hello": 1, "world": 2}, unk_token=end))
    word.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=word, unk_token=end, bos_token=end,
                                  eos_token=end)
    hf = HFTokenizer(tok, "gpt2-like")
    assert hf.encode(f"{end} hello world {end}") == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="cannot encode part of the text .*'hello mars'"):
        hf.encode("hello mars")
    with pytest.raises(ValueError, match="cannot encode part of the text"):
        hf.encode(f"{end} mars")


def test_think_tags_marked_special_survive_decoding():
    """A tokenizer that marks <think> and </think> special lost them to skip_special_tokens,
    so the rewards read a completion without its thought's tags (format 0, silently)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from r1fast.data.hf_tokenizer import HFTokenizer

    word = Tokenizer(models.WordLevel({"<unk>": 0, "so": 1, "5": 2}, unk_token="<unk>"))
    word.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word.add_special_tokens([AddedToken(t, special=True) for t in ("<think>", "</think>", "<eos>")])
    tok = PreTrainedTokenizerFast(tokenizer_object=word, unk_token="<unk>", eos_token="<eos>")
    hf = HFTokenizer(tok, "special-think")
    ids = hf.encode("<think> so </think> 5", add_eos=True)
    assert hf.decode(ids).replace(" ", "") == "<think>so</think>5"  # eos dropped, tags kept
    assert "<eos>" in hf.decode(ids, skip_special_tokens=False)


def test_bos_is_added_where_the_tokenizer_itself_adds_it():
    """GPT-2's bos is its eos, which its encoder never prepends: r1fast put it before every
    prompt and SFT row. A tokenizer whose post-processor starts texts with bos (Llama-3,
    DeepSeek) still gets it, once."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from r1fast.data.hf_tokenizer import HFTokenizer

    def word_level(post=None, **special):
        word = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "hi": 1, "<s>": 2},
                                          unk_token="<|endoftext|>"))
        word.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        if post:
            word.post_processor = post
        return HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=word, **special), "t")

    gpt2 = word_level(bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    assert gpt2.bos_id is None and gpt2.encode("hi", add_bos=True) == [1]
    llama = word_level(processors.TemplateProcessing(single="<s> $A",
                                                     special_tokens=[("<s>", 2)]),
                       bos_token="<s>", eos_token="<|endoftext|>")
    assert llama.bos_id == 2 and llama.encode("hi", add_bos=True) == [2, 1]
    assert llama.encode("<s> hi", add_bos=True) == [2, 1]  # a template's own bos: not twice
