"""Language-consistency reward: the fraction of chain-of-thought words in the target language.

DeepSeek-R1 adds this reward in its reasoning-RL stage because R1-Zero mixed languages in its
thoughts. Language is approximated by Unicode script, which needs no model:

- a *word* is a maximal run of letters (combining marks stay with their letter); Han,
  Hiragana and Katakana characters are each a word of their own, since those scripts do not
  separate words with spaces; digits, punctuation and symbols are not words;
- a word is *in the target language* when every letter in it belongs to one of the target's
  scripts (``en`` -> Latin, ``zh`` -> Han, ``ja`` -> Han/Hiragana/Katakana, ...). A Latin word
  with a Cyrillic lookalike inside (``pаssword``) therefore does not count as English;
- math is not language: LaTeX command names (``\\frac``, ``\\sqrt``, ``\\times``, ``\\alpha``)
  and one-letter words (variables ``x``, ``n``; symbols ``π``) are counted in neither total,
  and for a target not written in Greek a lone Greek letter is a symbol even where it touches
  other letters (``2πr``, ``Δx``: it splits them), while a run of Greek letters is a word;
  prose inside ``\\text{...}`` still counts;
- the reward is ``score * target_words / words`` over the thought (see
  :func:`r1fast.rewards.extract.thought_text`), ``empty_score`` when it has no words.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, replace

from r1fast.rewards.extract import DEFAULT_MAX_CHARS, tail, thought_text
from r1fast.checks import check_choice, check_range

LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {
    "en": frozenset({"LATIN"}),
    "fr": frozenset({"LATIN"}),
    "de": frozenset({"LATIN"}),
    "es": frozenset({"LATIN"}),
    "zh": frozenset({"HAN"}),
    "ja": frozenset({"HAN", "HIRAGANA", "KATAKANA"}),
    "ko": frozenset({"HANGUL"}),
    "ru": frozenset({"CYRILLIC"}),
    "el": frozenset({"GREEK"}),
    "ar": frozenset({"ARABIC"}),
    "he": frozenset({"HEBREW"}),
    "hi": frozenset({"DEVANAGARI"}),
    "th": frozenset({"THAI"}),
}
# Scripts written without spaces between words: each character counts as one word.
_PER_CHAR = frozenset({"HAN", "HIRAGANA", "KATAKANA", "THAI"})
_NAMED = ("LATIN", "CYRILLIC", "GREEK", "HIRAGANA", "KATAKANA", "HANGUL", "ARABIC", "HEBREW",
          "DEVANAGARI", "THAI")


def script_of(ch: str) -> str:
    """Unicode script of a letter, from its character name ("OTHER" when not recognised)."""
    if ch.isascii():
        return "LATIN" if ch.isalpha() else "OTHER"
    name = unicodedata.name(ch, "")
    if name.startswith(("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH")):
        return "HAN"
    for script in _NAMED:
        if name.startswith(script):
            return script
    if name.startswith("HALFWIDTH KATAKANA"):
        return "KATAKANA"
    return "OTHER"


#: a LaTeX command name (``\\frac``): notation, not a word
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_GREEK = "\u0370-\u03ff\u1f00-\u1fff"  # Greek and Coptic, Greek Extended
#: one Greek letter between non-Greek characters: a math symbol (2πr, Δx), not part of a word
_LONE_GREEK = re.compile(f"(?<![{_GREEK}])[{_GREEK}](?![{_GREEK}])")


def word_counts(text: str, scripts: frozenset[str]) -> tuple[int, int]:
    """(words, words entirely in ``scripts``) of ``text``, per the module docstring's rules."""
    total = hits = 0
    letters = 0  # letters of the current word (0: not in a word)
    word_ok = True

    def close() -> None:
        nonlocal total, hits, letters
        if letters > 1:  # one letter: a variable or symbol, not a word
            total, hits = total + 1, hits + word_ok
        letters = 0

    text = _LATEX_COMMAND.sub(" ", text)
    if "GREEK" not in scripts:
        text = _LONE_GREEK.sub(" ", text)
    for ch in text:
        if ch.isalpha():
            script = script_of(ch)
            if script in _PER_CHAR:
                close()
                total += 1
                hits += script in scripts
                continue
            if not letters:
                word_ok = True
            letters += 1
            word_ok = word_ok and script in scripts
        elif letters and unicodedata.category(ch).startswith("M"):
            continue  # a combining accent belongs to the word it decorates
        else:
            close()
    close()
    return total, hits


@dataclass(frozen=True)
class LanguageRewardConfig:
    """Target language and scores of the language-consistency reward."""

    target: str = "en"
    """Target language code, a key of ``LANGUAGE_SCRIPTS``."""
    score: float = 1.0
    """Reward when every word of the thought is in the target language."""
    empty_score: float = 0.0
    """Reward for a thought without any word."""
    think_in_prompt: bool = False
    """The prompt already opened ``<think>``."""
    max_chars: int = DEFAULT_MAX_CHARS
    """Only the last ``max_chars`` characters of the thought are scored."""

    def __post_init__(self):
        check_choice("target", self.target, sorted(LANGUAGE_SCRIPTS))
        check_range("max_chars", self.max_chars, 1)


def language_consistency(completion: str, config: LanguageRewardConfig | None = None) -> float:
    """Fraction of thought words in the target language, times ``score``."""
    cfg = config or LanguageRewardConfig()
    thought = tail(thought_text(completion, cfg.think_in_prompt), cfg.max_chars)
    total, hits = word_counts(thought, LANGUAGE_SCRIPTS[cfg.target])
    return cfg.empty_score if total == 0 else cfg.score * hits / total


class LanguageReward:
    """``(completion, example) -> float`` in ``[0, score]``; the example is not used."""

    name = "language"
    sandbox = False

    def __init__(self, config: LanguageRewardConfig | None = None, **overrides):
        base = config or LanguageRewardConfig()
        self.config = replace(base, **overrides) if overrides else base

    def __call__(self, completion: str, example: dict | None = None) -> float:
        return language_consistency(completion, self.config)

    def __repr__(self) -> str:
        return f"LanguageReward({self.config})"
