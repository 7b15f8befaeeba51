"""A tiny Hugging Face world, built offline: a byte-level BPE tokenizer with a ChatML chat
template, a random Qwen3-MoE checkpoint, and math problems in the GSM8K (JSONL) and MATH
(parquet) layouts.

Real runs start from a hub folder and a dataset file; this machine (and CI) cannot download
either, so this module makes small stand-ins of exactly those formats, with the real
libraries: ``tokenizers`` trains the BPE, ``transformers`` saves the tokenizer folder and the
model (``save_pretrained``), ``datasets`` writes the files. ``recipes/hf_tiny.toml`` and the
tests train on them; ``python scripts/make_tiny_hf.py OUT`` writes them for a person to try.

The problems are additions ``a + b`` with the GSM8K answer convention (worked solution, then
``#### <answer>``) and the MATH one (a solution ending in ``\\boxed{<answer>}``).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]


def addition_problems(n: int, seed: int, digits: int = 2) -> list[dict]:
    """``n`` distinct additions as ``{"question", "a", "b", "answer"}``."""
    rng = random.Random(seed)
    seen, out = set(), []
    hi = 10 ** digits - 1
    while len(out) < n:
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        out.append({"question": f"What is {a} + {b}?", "a": a, "b": b, "answer": str(a + b)})
    return out


def gsm8k_rows(problems: list[dict]) -> list[dict]:
    return [{"question": p["question"],
             "answer": f"{p['a']} plus {p['b']} is {p['answer']}.\n#### {p['answer']}"}
            for p in problems]


def math_rows(problems: list[dict]) -> list[dict]:
    return [{"problem": p["question"], "level": "Level 1", "type": "Arithmetic",
             "solution": f"We add: ${p['a']} + {p['b']} = \\boxed{{{p['answer']}}}$."}
            for p in problems]


def build_tokenizer(out_dir: str | Path, corpus: list[str], vocab_size: int = 400):
    """Train a byte-level BPE on ``corpus``, wrap it with the ChatML template, save it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    # think tags are content the model writes (decoded, scored by the format reward), not
    # control tokens: added, but not special (as in Qwen3's tokenizer)
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE,
                                  additional_special_tokens=["<|im_start|>"])
    tok.save_pretrained(str(out_dir))
    return tok


def build_model(out_dir: str | Path, vocab_size: int, seed: int = 0) -> None:
    """A random tiny Qwen3-MoE (2 layers, 8 experts top-2) saved with ``save_pretrained``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    vocab = -(-vocab_size // 8) * 8  # padded like real checkpoints (ids beyond the tokenizer)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=512,
        tie_word_embeddings=False, eos_token_id=None, bos_token_id=None)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    model.save_pretrained(str(out_dir))


def build_tiny_hf(out: str | Path, *, num_train: int = 400, num_test: int = 64,
                  seed: int = 0) -> dict[str, Path]:
    """Write ``model/`` (checkpoint + tokenizer), ``gsm8k_train.jsonl``, ``gsm8k_test.jsonl``
    and ``math_train.parquet`` under ``out``; return their paths."""
    import datasets

    out = Path(out)
    problems = addition_problems(num_train + num_test, seed)
    train, test = problems[:num_train], problems[num_train:]
    paths = {"model": out / "model", "gsm8k_train": out / "gsm8k_train.jsonl",
             "gsm8k_test": out / "gsm8k_test.jsonl", "math_train": out / "math_train.parquet"}
    out.mkdir(parents=True, exist_ok=True)
    for key, rows in (("gsm8k_train", gsm8k_rows(train)), ("gsm8k_test", gsm8k_rows(test))):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(math_rows(train)).to_parquet(str(paths["math_train"]))
    corpus = [r["question"] + " " + r["answer"] for r in gsm8k_rows(problems)]
    corpus += [r["solution"] for r in math_rows(problems)]
    corpus += ["Think step by step inside <think> </think>, then give the final answer in "
               "\\boxed{}. user assistant system"] * 20
    tok = build_tokenizer(paths["model"], corpus)
    build_model(paths["model"], len(tok), seed)
    return paths
