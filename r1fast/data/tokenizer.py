"""A deterministic character-level tokenizer with the R1 special tokens.

Tiny models trained from scratch on synthetic tasks need a tiny vocabulary that never changes
between runs and can be saved next to a checkpoint. This one maps each character of a fixed
alphabet to one id, and the think tags to one id each:

    0 <pad>   1 <bos>   2 <eos>   3 <unk>   4 <think>   5 </think>   6.. the alphabet

The default alphabet is newline plus the 95 printable ASCII characters (102 ids in all, < 128),
which covers every prompt, chain of thought and answer the task generators produce, so
``decode(encode(text)) == text`` for all of them. ``CharTokenizer.with_scripts("greek")`` appends
the letters of a second script (:data:`SCRIPT_ALPHABETS`: Greek or Cyrillic, upper and lower
case, Greek with its accented vowels) after the default alphabet, so every default id keeps its
meaning (a model trained on the default vocabulary stays valid, its new rows are untrained) and
a model can write, and the language-consistency reward can see, a second language; the
default tokenizer has no such letter and could only encode it as ``<unk>``. ``<think>`` and ``</think>`` are matched in the
text (they are content: the model writes them); pad/bos/eos are only ever added by the
``add_bos``/``add_eos``/padding options, so a literal ``"<eos>"`` in text stays five characters.
A character outside the alphabet is an error naming it (``errors="replace"`` maps it to
``<unk>`` instead, for callers that ask for that explicitly); U+FFFD, which ``decode`` writes
for ``<unk>``, encodes back to ``<unk>``.

``save(dir)`` writes ``dir/tokenizer.json``; ``CharTokenizer.load(dir)`` reads it back.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

from r1fast.atomic import write_text_atomic

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<think>", "</think>")
TEXT_SPECIALS = ("<think>", "</think>")  # specials that appear in text and are matched there
DEFAULT_ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))


def _letters(*ranges: tuple[int, int]) -> str:
    """The assigned letters of inclusive code point ranges (U+03A2 is a hole in Greek)."""
    return "".join(chr(c) for lo, hi in ranges for c in range(lo, hi + 1) if chr(c).isalpha())


#: Second scripts a character tokenizer can add (name -> letters, in a fixed order).
SCRIPT_ALPHABETS: dict[str, str] = {
    # A-Omega, alpha-omega (final sigma included), then the tonos vowels of modern Greek
    "greek": _letters((0x391, 0x3A9), (0x3B1, 0x3C9), (0x386, 0x386), (0x388, 0x38A),
                      (0x38C, 0x38C), (0x38E, 0x38F), (0x3AC, 0x3AF), (0x3CC, 0x3CE)),
    # A-Ya, a-ya, then Yo and yo
    "cyrillic": _letters((0x410, 0x44F), (0x401, 0x401), (0x451, 0x451)),
}
FILE_NAME = "tokenizer.json"
FORMAT = "r1fast-char-tokenizer"
VERSION = 1
MAX_VOCAB = 256  # the tiny presets' vocabulary: the default plus both scripts fit


class CharTokenizer:
    """Character-level tokenizer; see the module docstring for the id layout."""

    def __init__(self, alphabet: str = DEFAULT_ALPHABET):
        if not isinstance(alphabet, str) or not alphabet:
            raise ValueError("alphabet must be a non-empty str")
        if len(set(alphabet)) != len(alphabet):
            dupes = sorted({c for c in alphabet if alphabet.count(c) > 1})
            raise ValueError(f"alphabet must not repeat characters, got duplicates {dupes!r}")
        if len(SPECIAL_TOKENS) + len(alphabet) > MAX_VOCAB:
            raise ValueError(f"alphabet must have at most {MAX_VOCAB - len(SPECIAL_TOKENS)} characters "
                             f"(vocab < {MAX_VOCAB + 1}), got {len(alphabet)}")
        self.alphabet = alphabet
        self.id_to_token: list[str] = list(SPECIAL_TOKENS) + list(alphabet)
        self._char_to_id = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(alphabet)}
        self._special_to_id = {t: i for i, t in enumerate(SPECIAL_TOKENS)}

    # -- ids ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    def __len__(self) -> int:
        return self.vocab_size

    pad_id = property(lambda self: 0, doc="id of <pad>")
    bos_id = property(lambda self: 1, doc="id of <bos>")
    eos_id = property(lambda self: 2, doc="id of <eos>")
    unk_id = property(lambda self: 3, doc="id of <unk>")
    think_id = property(lambda self: 4, doc="id of <think>")
    think_end_id = property(lambda self: 5, doc="id of </think>")
    stop_ids = property(lambda self: (2,), doc="ids that end a completion: <eos>")
    has_chat_template = False
    name = "r1fast-char"

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = True) -> str:
        raise ValueError("the r1fast character tokenizer has no chat template; use plain prompts "
                         "(data.chat_template = false) or a Hugging Face tokenizer folder")

    @classmethod
    def with_scripts(cls, *scripts: str) -> "CharTokenizer":
        """The default alphabet followed by the letters of each named script
        (:data:`SCRIPT_ALPHABETS`), in the order given: default ids are unchanged."""
        if not scripts:
            raise ValueError(f"scripts must name at least one of {sorted(SCRIPT_ALPHABETS)}")
        extra = ""
        for name in scripts:
            if name not in SCRIPT_ALPHABETS:
                raise ValueError(f"script must be one of {sorted(SCRIPT_ALPHABETS)}, got {name!r}")
            extra += SCRIPT_ALPHABETS[name]
        return cls(DEFAULT_ALPHABET + extra)

    @classmethod
    def fit(cls, texts: Iterable[str]) -> "CharTokenizer":
        """A tokenizer whose alphabet is exactly the characters of ``texts`` (think tags
        excluded), sorted by code point, so the result does not depend on text order."""
        chars: set[str] = set()
        for t in texts:
            for tag in TEXT_SPECIALS:
                t = t.replace(tag, "")
            chars.update(t)
        return cls("".join(sorted(chars)))

    # -- encode / decode -----------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False,
               errors: str = "strict") -> list[int]:
        """Ids of ``text``; a character outside the alphabet raises (``errors="replace"``:
        ``<unk>``)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        if errors not in ("replace", "strict"):
            raise ValueError(f"errors must be one of ('replace', 'strict'), got {errors!r}")
        ids = [self.bos_id] if add_bos else []
        i, n = 0, len(text)
        while i < n:
            c = text[i]
            if c == "<":
                tag = next((t for t in TEXT_SPECIALS if text.startswith(t, i)), None)
                if tag is not None:
                    ids.append(self._special_to_id[tag])
                    i += len(tag)
                    continue
            # U+FFFD is how decode() writes <unk>: it encodes back to <unk> (a round trip)
            tid = self.unk_id if c == "\ufffd" else self._char_to_id.get(c)
            if tid is None:
                if errors == "strict":
                    raise ValueError(f"text has character {c!r} (U+{ord(c):04X}) at position {i} "
                                     f"outside the alphabet of {self!r}: {text[:200]!r}")
                tid = self.unk_id
            ids.append(tid)
            i += 1
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; pad/bos/eos are dropped (or written as ``<pad>`` etc. with
        ``skip_special_tokens=False``), ``<unk>`` becomes U+FFFD, think tags are text."""
        out = []
        for raw in ids:
            tid = int(raw)
            if not 0 <= tid < self.vocab_size:
                raise ValueError(f"token id must be in [0, {self.vocab_size}), got {tid}")
            if tid >= len(SPECIAL_TOKENS) or tid in (self.think_id, self.think_end_id):
                out.append(self.id_to_token[tid])
            elif tid == self.unk_id:
                out.append("\ufffd")
            elif not skip_special_tokens:
                out.append(self.id_to_token[tid])
        return "".join(out)

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False,
                     padding_side: str = "left") -> tuple[list[list[int]], list[list[int]]]:
        """(ids, attention mask), padded with ``pad_id`` to the longest text. Left padding
        suits generation (every prompt ends at the same column)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be one of ('left', 'right'), got {padding_side!r}")
        seqs = [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
        width = max((len(s) for s in seqs), default=0)
        ids, mask = [], []
        for s in seqs:
            pad = [self.pad_id] * (width - len(s))
            ones, zeros = [1] * len(s), [0] * len(pad)
            ids.append(pad + s if padding_side == "left" else s + pad)
            mask.append(zeros + ones if padding_side == "left" else ones + zeros)
        return ids, mask

    # -- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "special_tokens": list(SPECIAL_TOKENS),
                "vocab": self.id_to_token}

    @classmethod
    def from_dict(cls, data: dict) -> "CharTokenizer":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"tokenizer data must have format {FORMAT!r}, got "
                             f"{data.get('format') if isinstance(data, dict) else type(data).__name__!r}")
        if data.get("version") != VERSION:
            raise ValueError(f"tokenizer version must be {VERSION}, got {data.get('version')!r}")
        if list(data.get("special_tokens", [])) != list(SPECIAL_TOKENS):
            raise ValueError(f"tokenizer special_tokens must be {list(SPECIAL_TOKENS)}")
        vocab = data.get("vocab")
        if not isinstance(vocab, list) or vocab[:len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS):
            raise ValueError("tokenizer vocab must be a list starting with the special tokens")
        chars = vocab[len(SPECIAL_TOKENS):]
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("tokenizer vocab entries after the specials must be single characters")
        return cls("".join(chars))

    def save(self, path: str | os.PathLike) -> str:
        """Write ``tokenizer.json`` into directory ``path`` (created if needed); return the file."""
        file = os.path.join(path, FILE_NAME)
        write_text_atomic(file, json.dumps(self.to_dict(), ensure_ascii=True, indent=1))
        return file

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CharTokenizer":
        """Read a tokenizer saved by :meth:`save` (``path`` is the directory or the file)."""
        file = os.path.join(path, FILE_NAME) if os.path.isdir(path) else os.fspath(path)
        if not os.path.isfile(file):
            raise ValueError(f"path must be a directory holding {FILE_NAME} or that file, got {os.fspath(path)!r}")
        with open(file, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.id_to_token == self.id_to_token

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


Tokenizer = CharTokenizer  # the name the trainer uses
__all__ = ["CharTokenizer", "Tokenizer", "SPECIAL_TOKENS", "DEFAULT_ALPHABET", "SCRIPT_ALPHABETS"]
