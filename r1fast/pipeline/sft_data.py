"""SFT datasets before they reach the trainer: reading, mixing in non-reasoning data, rendering
prompts for a chat model, and dropping rows the model cannot hold.

R1's third stage fine-tunes on ~600k reasoning samples (rejection-sampled from the RL model)
plus ~200k non-reasoning ones (writing, factual QA, self-cognition, translation), so the model
keeps its general abilities: a quarter of the set. :func:`mix_non_reasoning` builds such a set
from two lists of ``{"prompt", "completion"}`` rows at a given share, deterministically from a
seed, and reports the counts. Non-reasoning rows are used verbatim (R1 gave simple queries no
chain of thought; write the completions the way the model should answer).

The share is of rows, and the SFT trainer draws rows uniformly, so it is also the expected
share of every batch. When the non-reasoning file has fewer rows than the share needs, rows
repeat (each about equally often) and a warning says so.
"""
from __future__ import annotations

import hashlib
import logging
import math
import random
from pathlib import Path
from typing import Any, Sequence

from r1fast.data.template import with_system_prompt
from r1fast.rewards.extract import THINK_CLOSE, THINK_OPEN, opens_thought

log = logging.getLogger("r1fast.pipeline")


def read_sft_rows(path: str | Path) -> list[dict]:
    """The SFT rows of a data file or folder (.jsonl / .json / .parquet, read as GRPO data is:
    :func:`r1fast.data.files.read_rows`), each ``{"prompt", "completion"}`` and, for a
    conversation, its messages before the answer under :data:`CONVERSATION` (rendered with
    the chat template as they are; a row's own ``"messages"`` or ``"conversation"`` beside a
    string prompt and completion is not read). A row is one of
      - ``{"prompt": str, "completion": str}``;
      - TRL's conversational ``{"messages": [..., {"role": "assistant", ...}]}`` or
        ``{"prompt": [messages], "completion": [{"role": "assistant", ...}]}``;
      - ShareGPT's ``{"conversations": [{"from": "human", "value"}, {"from": "gpt", ...}],
        "system"}`` (Sky-T1's and OpenThoughts' releases).
    Anything else is an error naming the file and row."""
    from r1fast.data.files import read_rows, row_name

    path = Path(path)
    if not path.exists():
        raise ValueError(f"SFT data {path} does not exist (a .jsonl/.json/.parquet file or a "
                         f"folder of them, of prompt/completion rows)")
    rows, where = read_rows(path, origins=True)
    out = [_sft_row({k: v for k, v in row.items() if v is not None}, row_name(path, w))
           for row, w in zip(rows, where)]  # None: a key of other rows (datasets fills it)
    if not out:
        raise ValueError(f"SFT data {path} has no rows")
    return out


CONVERSATION = "_r1fast_conversation"
"""An SFT row's messages before its answer, when it was given as a conversation (a name no
dataset uses: lmsys-chat-1m and WildChat carry a whole dialogue in 'conversation')."""

#: ShareGPT's speakers as chat roles
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "system": "system"}


def _sft_row(row: dict, name: str) -> dict:
    """One SFT row of :func:`read_sft_rows` in r1fast's layout (``name`` in errors)."""
    row.pop(CONVERSATION, None)  # only this function sets it
    if "conversations" in row:  # ShareGPT
        turns = row.pop("conversations")
        if not isinstance(turns, list) or not all(
                isinstance(t, dict) and t.get("from") in _SHAREGPT_ROLES for t in turns):
            raise ValueError(f"{name}: 'conversations' must be a list of {{'from', 'value'}} "
                             f"turns, 'from' one of {sorted(_SHAREGPT_ROLES)}")
        system = row.pop("system", None)
        row["messages"] = ([{"role": "system", "content": system}] if system else []) + [
            {"role": _SHAREGPT_ROLES[t["from"]], "content": t.get("value")} for t in turns]
    if "messages" in row and "completion" not in row:  # TRL conversational
        messages = row.pop("messages")
        row["prompt"], row["completion"] = messages[:-1], messages[-1:]
    if isinstance(row.get("prompt"), list):  # TRL conversational prompt-completion
        row = {**row, **_conversation(row.pop("prompt"), row.get("completion"), name)}
    if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str) \
            or not row["completion"]:
        raise ValueError(f"{name}: a row must have a str 'prompt' and a non-empty str "
                         f"'completion' (or be a conversation: 'messages', 'conversations', "
                         f"or message lists), got keys {sorted(row)}")
    return row


def _conversation(prompt: list, completion: Any, name: str) -> dict:
    """``{"prompt", "conversation", "completion"}`` of a conversation ``prompt`` (messages ending
    with a user turn) answered by ``completion`` (one assistant message, or a str)."""
    ok = all(isinstance(m, dict) and isinstance(m.get("content"), str)
             and m.get("role") in ("system", "user", "assistant") for m in prompt)
    if not ok or not prompt or prompt[-1]["role"] != "user":
        roles = [m.get("role") if isinstance(m, dict) else m for m in prompt]
        raise ValueError(f"{name}: the conversation before the answer must be messages "
                         f"{{'role': system|user|assistant, 'content': str}} ending with a user "
                         f"turn, got roles {roles}")
    if isinstance(completion, list):
        if len(completion) != 1 or not isinstance(completion[0], dict) \
                or completion[0].get("role") != "assistant":
            raise ValueError(f"{name}: the answer must be one assistant message, got "
                             f"{completion!r:.200}")
        completion = completion[0].get("content")
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return {"prompt": messages[-1]["content"], CONVERSATION: messages, "completion": completion}


def mix_non_reasoning(rows: Sequence[dict], extra: Sequence[dict], ratio: float,
                      seed: int = 0) -> tuple[list[dict], dict[str, Any]]:
    """``rows`` plus ``round(ratio * len(rows) / (1 - ratio))`` rows of ``extra``, shuffled,
    each tagged with its ``source`` ("reasoning" / "non_reasoning"), so ``ratio`` of the result
    is non-reasoning. Same inputs and seed, same output. Returns (rows, counts)."""
    if not 0 <= ratio < 1 or isinstance(ratio, bool):
        raise ValueError(f"mix ratio must be in [0, 1) (the non-reasoning share of the SFT set), "
                         f"got {ratio!r}")
    if not rows:
        raise ValueError("rows must be a non-empty list of reasoning rows to mix into")
    if ratio > 0 and not extra:
        raise ValueError(f"mix ratio {ratio} needs non-reasoning rows, got none")
    rng = random.Random(seed)
    want = round(ratio * len(rows) / (1 - ratio))
    if ratio > 0 and want == 0:
        log.warning("a non-reasoning share of %s beside %d reasoning rows rounds to 0 rows: "
                    "nothing is mixed in", ratio, len(rows))
    if want <= len(extra):
        picked = rng.sample(list(extra), want)
    else:  # every row once per full pass, the remainder drawn without repeats
        full, rest = divmod(want, len(extra))
        picked = list(extra) * full + rng.sample(list(extra), rest)
        log.warning("the non-reasoning set has %d rows but a share of %.3f needs %d: its rows "
                    "repeat about %.1f times each", len(extra), ratio, want, want / len(extra))
    mixed = ([{**r, "source": "reasoning"} for r in rows]
             + [{**r, "source": "non_reasoning"} for r in picked])
    rng.shuffle(mixed)
    counts = {"reasoning": len(rows), "non_reasoning": want, "non_reasoning_available": len(extra),
              "non_reasoning_share": want / len(mixed), "repeated": want > len(extra),
              "ratio": ratio, "seed": seed}
    return mixed, counts


def prompt_format(tokenizer, chat_template: bool = True) -> str:
    """What a rendered prompt's markup depends on, as a short fingerprint: ``"plain"`` without a
    chat template, else a hash of the template's rendering of a probe conversation and of its
    end of turn. Rejection-sampled rows record it (``prompt_format``), so a model with another
    format (a student with its own tokenizer) gets them rendered again, not in foreign markup."""
    if not (chat_template and tokenizer.has_chat_template):
        return "plain"
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}],
                                          add_generation_prompt=True)
    return "chat:" + hashlib.sha256(f"{probe}\x00{tokenizer.turn_end()}".encode()).hexdigest()[:16]


def _rerender(row: dict, fmt: str, i: int) -> dict:
    """A rendered row as the plain ``{"prompt" (messages), "completion"}`` it came from, for a
    tokenizer whose prompt format is not the row's; without its messages it cannot be."""
    if not row.get("messages") or "response" not in row:
        raise ValueError(f"SFT row {i} (id {row.get('id')!r}) was rendered for prompt format "
                         f"{row.get('prompt_format')!r}, this model's is {fmt!r}, and it lacks "
                         f"the 'messages' and 'response' to render it again (written by an "
                         f"older r1fast): sample it again for this model, or train a model "
                         f"with the sampling model's tokenizer")
    keep = {k: v for k, v in row.items() if k not in ("prompt_rendered", "completion_ends_turn",
                                                      "prompt_format")}
    return {**keep, "completion": row["response"]}


def render_prompts(rows: Sequence[dict], tokenizer, *, chat_template: bool = True,
                   system_prompt: str | None = None) -> list[dict]:
    """Rows whose ``prompt`` is a user message rendered with the tokenizer's chat template
    (with ``system_prompt`` first), as a chat model is prompted, and whose ``completion`` ends
    as the template ends an assistant turn (``"completion_ends_turn": true``: ChatML's
    ``<|im_end|>`` and newline, not the tokenizer's eos, which for a base tokenizer is
    ``<|endoftext|>``; transformers renders the same text; see :func:`chat_turn_end` for an
    end of turn that holds no stop id); unchanged when the tokenizer has
    no template or ``chat_template`` is False. Rows marked ``"prompt_rendered": true``
    (rejection-sampled rows: the prompt is the text the model was given) are kept as they are,
    so their template is not applied twice (an INFO line counts them; rejection sampling
    closed their turn already), unless their ``prompt_format`` is not this tokenizer's
    (:func:`prompt_format`: a student with its own tokenizer): then they are rendered again
    from their ``messages`` and ``response`` (an INFO line counts them). Under a template
    whose generation prompt opens the thought, a completion's own leading ``<think>`` goes
    (:func:`inside_opened_thought`). A system prompt with nothing to render it is an error,
    not dropped."""
    fmt = prompt_format(tokenizer, chat_template)
    again = [r.get("prompt_rendered") is True and r.get("prompt_format", fmt) != fmt
             for r in rows]
    rows = [_rerender(r, fmt, i) if a else r for i, (r, a) in enumerate(zip(rows, again))]
    if any(again):
        log.info("%d of %d SFT rows were sampled in another prompt format than this "
                 "tokenizer's: rendered again from their messages", sum(again), len(rows))
    if fmt == "plain":
        if system_prompt:
            raise ValueError(f"system_prompt is set but {tokenizer!r} has no chat template (or "
                             f"chat_template is false): it could not be used")
        return [_plain(r, i, m) if (m := _own_messages(r, a)) else dict(r)
                for i, (r, a) in enumerate(zip(rows, again))]
    out, as_given, open_ended, empty = [], 0, 0, 0
    closing = chat_turn_end(tokenizer)
    for r, a in zip(rows, again):
        if r.get("prompt_rendered") is True:
            out.append(dict(r))
            as_given += 1
            open_ended += r.get("completion_ends_turn") is not True
            continue
        messages = with_system_prompt(  # a conversation's own messages, or its user turn
            _own_messages(r, a) or [{"role": "user", "content": r["prompt"]}], system_prompt)
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        empty += lacks_thought(prompt, r["completion"])
        out.append(end_turn({**r, "prompt": prompt,
                             "completion": inside_opened_thought(prompt, r["completion"])},
                            *closing))
    if as_given:  # a system prompt they do not get is a change to what was asked: louder
        (log.warning if system_prompt else log.info)(
            "%d of %d SFT rows are marked prompt_rendered (already in the model's prompt "
            "format, e.g. rejection-sampled): the chat template%s is not applied to them",
            as_given, len(rows), " and system_prompt" if system_prompt else "")
    if empty:
        log.warning("%d of %d SFT rows have no thought (no </think>) while %r's chat template "
                    "opens one: each answer follows an empty thought, closed at once (a "
                    "completion cut inside its thought would be misread so: drop those)",
                    empty, len(rows), tokenizer)
    if open_ended and closing[0]:
        log.warning("%d SFT rows marked prompt_rendered do not say completion_ends_turn (an "
                    "older r1fast's rejection sampling, or prompts without the chat template): "
                    "they end with the tokenizer's eos, not the template's end of turn %r",
                    open_ended, closing[0])
    return out


def _own_messages(row: dict, again: bool) -> list[dict] | None:
    """The messages a row's prompt is rendered from: a row sampled in another prompt format
    (``again``) its ``messages``, a conversation its :data:`CONVERSATION`; None: its prompt
    is one user turn."""
    return row["messages"] if again else row.get(CONVERSATION)


def _plain(row: dict, i: int, messages: list[dict]) -> dict:
    """A row for a tokenizer without a chat template: its one message as text."""
    if len(messages) > 1:
        raise ValueError(f"SFT row {i} (id {row.get('id')!r}) is a chat conversation (or has a "
                         f"system prompt), but this tokenizer has no chat template to render it")
    return {**row, "prompt": messages[0]["content"]}


def chat_turn_end(tokenizer) -> tuple[str, bool]:
    """What an SFT answer under ``tokenizer``'s chat template ends with: the text the template
    writes after an assistant message (:meth:`~r1fast.data.hf_tokenizer.HFTokenizer.turn_end`)
    and whether it closes the completion, i.e. holds one of the tokenizer's stop ids (a
    rollout stops only there); if not (a "User:/Assistant:" template's newline, or an end of
    turn the tokenizer does not stop at), the eos follows it, with a warning."""
    turn_end = tokenizer.turn_end()
    closes = any(t in tokenizer.stop_ids for t in tokenizer.encode(turn_end))
    if not closes:
        log.warning("the chat template of %r ends an assistant turn with %r, which holds none of "
                    "its stop ids %s: SFT answers end with it and then the eos%s", tokenizer,
                    turn_end, list(tokenizer.stop_ids), "" if not turn_end else " (list the end-"
                    "of-turn token in generation_config.json's eos_token_id to stop there)")
    return turn_end, closes


def inside_opened_thought(prompt: str, completion: str) -> str:
    """``completion`` as it follows ``prompt``: when the prompt already opens the thought (a
    thinking template's generation prompt ends with ``<think>``: DeepSeek-R1-Distill, QwQ),
    the completion's own leading ``<think>`` (and the newline after it) goes, else the model
    would learn to open a second thought, which the format reward scores 0; a completion with
    no thought at all (a greeting, R1's non-reasoning data) gets an empty one closed in front
    (``<think>\n\n</think>\n\n``, as Qwen3 writes a turn without thinking), else the model
    would learn to answer inside a thought it never closes (:func:`lacks_thought`)."""
    if lacks_thought(prompt, completion):
        return ("\n" if prompt.endswith("\n") else "\n\n") + THINK_CLOSE + "\n\n" + completion
    if opens_thought(prompt) and completion.startswith(THINK_OPEN):
        rest = completion[len(THINK_OPEN):]
        return rest[1:] if rest.startswith("\n") and prompt.endswith("\n") else rest
    return completion


def lacks_thought(prompt: str, completion: str) -> bool:
    """Whether ``completion`` has no thought (no leading ``<think>``, no ``</think>``) while
    ``prompt`` opens one: :func:`inside_opened_thought` then gives it an empty one."""
    return opens_thought(prompt) and not completion.startswith(THINK_OPEN) \
        and THINK_CLOSE not in completion


def thought_opened_by(prompt: str) -> str:
    """The text with which ``prompt`` opens the thought (``"<think>\n"``), "" if it does not:
    what a completion sampled after it needs in front to stand alone (another template)."""
    return prompt[prompt.rstrip().rfind(THINK_OPEN):] if opens_thought(prompt) else ""


def end_turn(row: dict, turn_end: str, closes: bool) -> dict:
    """``row`` whose completion ends the assistant turn with ``turn_end`` (see
    :func:`chat_turn_end`); marked ``completion_ends_turn`` when that closes it (the SFT
    trainer then adds no eos). A row already marked is left as it is (not closed twice)."""
    if not turn_end or row.get("completion_ends_turn") is True:
        return dict(row)
    return {**row, "completion": row["completion"] + turn_end, **(
        {"completion_ends_turn": True} if closes else {})}


def drop_long_rows(rows: Sequence[dict], tokenizer, max_tokens: int) -> tuple[list[dict], int]:
    """Rows whose prompt + completion fit in ``max_tokens`` tokens (bos and eos counted, as the
    SFT trainer encodes them), and how many were dropped (a warning names the count)."""
    from r1fast.train.sft import encode_sft_row

    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 (bos + eos), got {max_tokens}")
    kept = [r for r in rows if sum(map(len, encode_sft_row(tokenizer, r))) <= max_tokens]
    dropped = len(rows) - len(kept)
    if dropped:
        log.warning("dropped %d of %d SFT rows longer than %d tokens", dropped, len(rows),
                    max_tokens)
    if not kept:
        raise ValueError(f"every SFT row is longer than max_tokens={max_tokens}")
    return kept, dropped


def steps_for_epochs(epochs: float, rows: int, batch_size: int) -> int:
    """Optimizer steps that show the trainer ``epochs`` passes' worth of rows (at least 1),
    rounded up to whole batches: the last one is completed from the next epoch's order, so a
    few rows come twice (100 rows in batches of 96: 2 steps, 92 rows seen twice)."""
    if not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    return max(1, math.ceil(epochs * rows / batch_size))
