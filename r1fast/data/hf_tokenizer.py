"""Hugging Face tokenizers behind r1fast's tokenizer interface, and one loader for both kinds.

A model arrives as a Hugging Face folder: ``tokenizer.json`` + ``tokenizer_config.json``
(vocabulary, special tokens, a chat template), often ``generation_config.json`` with several
stop ids (Qwen ends a turn with ``<|im_end|>``, a document with ``<|endoftext|>``).
:class:`HFTokenizer` wraps ``transformers.AutoTokenizer`` (local files only, never the
network) with the small interface the trainer, sampler and stages use, the same one
:class:`r1fast.data.tokenizer.CharTokenizer` has:

    vocab_size, pad_id, eos_id, bos_id, stop_ids, encode(text, add_bos, add_eos),
    decode(ids), apply_chat_template(messages), has_chat_template, save(folder), name

and :meth:`HFTokenizer.turn_end`, what the chat template writes after an assistant turn.

Nothing is silent: text the tokenizer can only encode as its unknown token is an error naming
the text and the tokenizer, and a folder that is neither kind of tokenizer is an error naming
the folder. :func:`load_tokenizer` picks the kind from the folder's files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from r1fast.atomic import write_text_atomic
from r1fast.data.tokenizer import FILE_NAME, FORMAT, CharTokenizer
from r1fast.rewards.extract import THINK_CLOSE, THINK_OPEN


GENERATION_CONFIG = "generation_config.json"


class HFTokenizer:
    """A ``transformers`` tokenizer folder (see the module docstring)."""

    def __init__(self, tokenizer, name: str, extra_stop_ids: Sequence[int] = (),
                 generation_config: dict | None = None):
        self.tok = tokenizer
        self.name = name
        self.generation_config: dict = dict(generation_config or {})
        """The folder's ``generation_config.json`` (the model's sampling defaults: Qwen3 and R1
        ask for temperature 0.6, top_p 0.95), written back by :meth:`save`, so an exported
        model is served as its makers meant; {} when the folder has none."""
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {name}: has no eos token (tokenizer_config.json "
                             f"eos_token); generation could never stop")
        stops = [tokenizer.eos_token_id, *extra_stop_ids]
        for tag in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
            tid = tokenizer.convert_tokens_to_ids(tag)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
                stops.append(tid)
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(int(t) for t in stops))
        """Ids that end a completion: eos, generation_config's eos ids, end-of-turn tokens."""
        special = {int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        special |= {int(i) for i in tokenizer.all_special_ids}
        think = {tokenizer.convert_tokens_to_ids(t) for t in (THINK_OPEN, THINK_CLOSE)}
        self._special_think_ids = special & think
        self._dropped_ids = special - think  # what skip_special_tokens drops here
        bos = tokenizer.bos_token_id
        # a text's first id with and without the tokenizer's own special tokens (not of "":
        # a tokenizer that appends its eos, when bos == eos, would look like one adding bos)
        self._bos = bos if bos is not None and \
            tokenizer.encode("a", add_special_tokens=True)[:1] == [bos] != \
            tokenizer.encode("a", add_special_tokens=False)[:1] else None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HFTokenizer":
        from transformers import AutoTokenizer

        path = Path(path)
        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"tokenizer folder {path}: transformers cannot load it ({e})") from e
        extra: list[int] = []
        gen_file, gen = path / GENERATION_CONFIG, {}
        if gen_file.is_file():
            gen = json.loads(gen_file.read_text())
            eos = gen.get("eos_token_id")
            extra = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(tok, str(path), extra, gen)

    # -- ids ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce (base vocabulary + added tokens)."""
        return len(self.tok)

    @property
    def eos_id(self) -> int:
        return int(self.tok.eos_token_id)

    @property
    def bos_id(self) -> int | None:
        """The id ``encode(add_bos=True)`` puts first: the tokenizer's bos when the tokenizer
        itself starts a text with it (Llama-3, DeepSeek), else None (Qwen has no bos; GPT-2's
        bos is its eos, which it never prepends), as transformers and vLLM encode prompts."""
        return self._bos

    @property
    def pad_id(self) -> int:
        """The pad token, or eos when the tokenizer has none (pads are always masked out)."""
        return int(self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    # -- text ------------------------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Ids of ``text`` (special tokens written in the text, e.g. a rendered chat template,
        become their ids); bos/eos only when asked (bos only where the tokenizer itself adds
        one: :attr:`bos_id`)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids = list(self.tok.encode(text, add_special_tokens=False))
        unk = self.tok.unk_token_id
        # the unknown token written in the text is not a failure: GPT-2 and GPT-NeoX make
        # <|endoftext|> their unk, bos and eos, and templates write it
        if unk is not None and ids.count(unk) > text.count(str(self.tok.unk_token)):
            raise ValueError(f"tokenizer {self.name} cannot encode part of the text (it becomes "
                             f"the unknown token {self.tok.unk_token!r}): {text[:200]!r}")
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, int(self.bos_id))
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ``skip_special_tokens`` drops control tokens but never the think
        tags, which some tokenizers mark special although the model writes them as content
        (dropped, the rewards would never see a well-formed thought)."""
        ids = [int(i) for i in ids]
        if not skip_special_tokens or not self._special_think_ids:
            return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.tok.decode([i for i in ids if i not in self._dropped_ids],
                               skip_special_tokens=False)

    def apply_chat_template(self, messages: Sequence[dict], *,
                            add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the tokenizer's chat template, as text."""
        if not self.has_chat_template:
            raise ValueError(f"tokenizer {self.name} has no chat template (tokenizer_config.json "
                             f"chat_template); set data.chat_template = false to use plain "
                             f"prompts")
        return self.tok.apply_chat_template(list(messages), tokenize=False,
                                            add_generation_prompt=add_generation_prompt)

    def turn_end(self) -> str:
        """The text the chat template writes after an assistant message's content (ChatML:
        ``<|im_end|>`` and a newline), which SFT targets end with, as a chat model learns to
        close its turn (the tokenizer's eos may be another token: a base model's
        ``<|endoftext|>``). "" when the template writes nothing there."""
        marker = "r1fast-assistant-content-7f3a"  # no think tags: templates may strip those
        text = self.apply_chat_template([{"role": "user", "content": "q"},
                                         {"role": "assistant", "content": marker}],
                                        add_generation_prompt=False)
        if text.count(marker) != 1:
            raise ValueError(f"tokenizer {self.name}: its chat template does not write an "
                             f"assistant message's content as given, so the end of a turn "
                             f"cannot be found (rendered: {text[-200:]!r})")
        return text[text.index(marker) + len(marker):]

    # -- persistence -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer files into folder ``path`` (what ``AutoTokenizer`` loads) and
        the generation config it was loaded with."""
        os.makedirs(path, exist_ok=True)
        self.tok.save_pretrained(str(path))
        if self.generation_config:
            write_text_atomic(Path(path) / GENERATION_CONFIG,
                              json.dumps(self.generation_config, indent=1))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def is_char_tokenizer_folder(path: str | os.PathLike) -> bool:
    file = Path(path) / FILE_NAME
    if not file.is_file():
        return False
    try:
        return json.loads(file.read_text(encoding="utf-8")).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in model folder ``path``: r1fast's character tokenizer or a
    Hugging Face tokenizer (``tokenizer.json`` / ``tokenizer_config.json`` / vocab files)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"tokenizer folder {path} does not exist")
    if is_char_tokenizer_folder(path):
        return CharTokenizer.load(path)
    hf_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((path / f).is_file() for f in hf_files):
        raise ValueError(f"folder {path} holds no tokenizer (none of {', '.join(hf_files)})")
    return HFTokenizer.load(path)
