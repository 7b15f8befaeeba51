"""Finding the answer inside a completion.

The R1 template asks the model to reason inside ``<think> ... </think>`` and then to give the
final answer in ``\\boxed{...}``. Every rule-based reward therefore starts by cutting a
completion into its chain of thought and its answer region, and then by pulling the answer out
of that region. The rules, in order (the first that yields something wins):

1. the region is the text after the LAST ``</think>`` when there is one (a tentative
   ``\\boxed{}`` written while thinking must not count as the answer); a thought that was
   opened (``<think>``, or by the prompt) and never closed leaves no answer at all (a
   completion cut off mid-thought); a completion without think tags is all answer region;
2. the last complete ``\\boxed{...}`` in the region, braces balanced (``\\{`` and ``\\}`` are
   literal braces and do not nest); ``\\boxed 5`` (no braces) is accepted too;
3. the last ``<answer> ... </answer>`` pair (TinyZero's tag);
4. the rest of the line after the last ``Answer:`` (any case) or ``####`` before a number
   (GSM8K's marker, which verl's GSM8K prompts ask for), whichever comes last;
5. only when ``</think>`` was present: the region itself when it is one short line (less a
   leading "the answer is", "so the final answer is", ...), otherwise the last plain number
   in it.

Steps 3-5 are skipped with ``require_boxed=True``. Everything here is a single linear scan over
at most ``max_chars`` characters (the tail of the text is kept), so hostile input (megabytes
of ``{``, thousands of ``\\boxed``) costs linear time and no recursion.
"""
from __future__ import annotations

import re

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
DEFAULT_MAX_CHARS = 100_000
# A region of at most this many characters on one line is taken as the answer as written.
_SHORT_REGION = 64
_BOXED = "\\boxed"
# ASCII digits only: lookalike digits (fullwidth, Arabic-Indic, mathematical bold) are not
# accepted as numbers anywhere in the rewards, so an answer must be written in 0-9.
_LAST_NUMBER = re.compile(r"-?[0-9]+(?:,[0-9]{3})*(?:\.[0-9]+)?")
# "The answer is 5", "So, the final answer is: 5" -> 5 (rule 5's short line)
_ANSWER_PHRASE = re.compile(r"^(?:(?:so|thus|therefore|hence),?\s+)?(?:the\s+)?(?:final\s+)?"
                            r"answer\s+is\b\s*:?\s*", re.IGNORECASE)
_ANSWER_MARKER = re.compile(r"answer:", re.IGNORECASE)


def tail(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """The last ``max_chars`` characters: the answer sits at the end of a completion."""
    return text if len(text) <= max_chars else text[-max_chars:]


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (by start position), or None.

    One left-to-right pass with an explicit stack: each ``{`` pushes, each ``}`` pops, and a
    pop that closes a ``\\boxed{`` records its content. Unclosed boxes never complete.
    """
    first = text.find(_BOXED)
    if first < 0:
        return None
    best_start = -1
    best: str | None = None
    stack: list[int] = []  # content start for a \boxed{ opener, -1 for a plain {
    n = len(text)
    i = first
    while i < n:
        c = text[i]
        if c == "\\":
            if text.startswith(_BOXED, i):
                j = i + len(_BOXED)
                if j < n and text[j].isalpha():  # \boxedfoo is some other command
                    i = j
                    continue
                k = j
                while k < n and text[k] in " \t":
                    k += 1
                if k < n and text[k] == "{":
                    stack.append(k + 1)
                    i = k + 1
                    continue
                if k > j:  # "\boxed 5": the token after the space
                    m = k
                    while m < n and not text[m].isspace() and text[m] not in "$}":
                        m += 1
                    if m > k and i > best_start:
                        best_start, best = i, text[k:m]
                    i = m
                    continue
                i = j
                continue
            i += 2  # an escaped character (\{ \} \\) never opens or closes a group
            continue
        if c == "{":
            stack.append(-1)
        elif c == "}" and stack:
            start = stack.pop()
            if start >= 0 and start > best_start:
                best_start, best = start, text[start:i]
        i += 1
    return best


def last_tagged(text: str, open_tag: str = ANSWER_OPEN, close_tag: str = ANSWER_CLOSE) -> str | None:
    """Content of the last ``open_tag ... close_tag`` pair, or None."""
    start = text.rfind(open_tag)
    if start < 0:
        return None
    end = text.find(close_tag, start + len(open_tag))
    if end < 0:
        return None
    return text[start + len(open_tag):end]


#: GSM8K's marker counts only before something that starts like a number (``#### 72``,
#: ``#### -3``, ``#### $5``, ``#### \frac...``), not before a markdown heading (``#### Step``)
_GSM8K_ANSWER = re.compile(r"####[ \t]*(?=[-0-9.$\\])")


def after_answer_marker(text: str) -> str | None:
    """The rest of the line after the last ``Answer:`` (case-insensitive) or GSM8K's ``####``
    marker, whichever comes last, cleaned, or None."""
    # matched in the text itself: lower() may change its length ("İ" becomes two characters)
    answer = [m.end() for m in _ANSWER_MARKER.finditer(text)]
    gsm8k = [m.end() for m in _GSM8K_ANSWER.finditer(text)]
    starts = answer[-1:] + gsm8k[-1:]
    if not starts:
        return None
    line = text[max(starts):].split("\n", 1)[0]
    line = line.strip().strip("*_").strip().strip("$").strip().rstrip(".").strip()  # **Answer:** 72
    return line or None


def split_think(text: str, think_in_prompt: bool = False) -> tuple[str | None, str]:
    """(chain of thought, answer region).

    The thought is the text between the first ``<think>`` (or the start, when the prompt
    already opened it) and the last ``</think>``; None when the think block never closes,
    in which case the whole text is the answer region (the model never left its thoughts).
    """
    close = text.rfind(THINK_CLOSE)
    if close < 0:
        return None, text
    head, region = text[:close], text[close + len(THINK_CLOSE):]
    if not think_in_prompt:
        open_pos = head.find(THINK_OPEN)
        if open_pos >= 0:
            head = head[open_pos + len(THINK_OPEN):]
    return head, region


def opens_thought(prompt: str) -> bool:
    """Whether ``prompt`` ends by opening the thought: chat templates of thinking models
    (DeepSeek-R1-Distill, QwQ, Qwen3-*-Thinking) end the generation prompt with
    ``<think>\n``, so their completions start inside the thought."""
    return prompt.rstrip().endswith(THINK_OPEN)


def as_scored(completion: str, prompt: str) -> str:
    """The completion as the rewards read it: with the ``<think>`` its prompt opened
    (:func:`opens_thought`) put back in front, else it would never be well-formed."""
    return THINK_OPEN + completion if opens_thought(prompt) else completion


def thought_text(text: str, think_in_prompt: bool = False) -> str:
    """The chain of thought for language scoring: inside the think block when there is one;
    for a truncated completion (no ``</think>``) everything after ``<think>``; else all text."""
    cot, _ = split_think(text, think_in_prompt)
    if cot is not None:
        return cot
    open_pos = text.find(THINK_OPEN)
    return text[open_pos + len(THINK_OPEN):] if open_pos >= 0 else text


def extract_answer(text: str, *, require_boxed: bool = False, think_in_prompt: bool = False,
                   max_chars: int = DEFAULT_MAX_CHARS) -> str | None:
    """The final answer of a completion as a stripped string, or None (rules in the module
    docstring)."""
    opened = think_in_prompt or THINK_OPEN in text
    text = tail(text, max_chars)
    cot, region = split_think(text, think_in_prompt)
    if cot is None and opened:  # cut off inside the thought: nothing was answered
        return None
    boxed = last_boxed(region)
    if boxed is not None:
        return boxed.strip() or None
    if require_boxed:
        return None
    tagged = last_tagged(region)
    if tagged is not None and tagged.strip():
        return tagged.strip()
    marked = after_answer_marker(region)
    if marked is not None:
        return marked
    if cot is None:
        return None
    region = region.strip()
    if 0 < len(region) <= _SHORT_REGION and "\n" not in region:
        region = _ANSWER_PHRASE.sub("", region, count=1).rstrip(".").strip()
        return region.strip("$").strip().rstrip(".").strip() or None
    numbers = _LAST_NUMBER.findall(region)
    return numbers[-1] if numbers else None
