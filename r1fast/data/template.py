"""The R1-Zero prompt template and the cold-start SFT target.

R1-Zero prompts a base model with a plain instruction: reason first, then answer. Our models
are tiny and character-level, so the template is short:

    User: <question>
    Think inside <think> </think>, then give the final answer in \\boxed{}.
    Assistant:

(a trailing space follows ``Assistant:``). The completion the policy should learn is
``<think>reasoning</think> \\boxed{answer}``: exactly what :func:`sft_target` builds for
cold-start SFT data and what the strict format reward accepts.
"""
from __future__ import annotations

from r1fast.rewards.extract import THINK_CLOSE, THINK_OPEN

PROMPT_TEMPLATE = (
    "User: {question}\n"
    "Think inside <think> </think>, then give the final answer in \\boxed{}.\n"
    "Assistant: "
)


def make_prompt(question: str, template: str = PROMPT_TEMPLATE) -> str:
    """``template`` with ``{question}`` replaced (plain replacement: braces elsewhere in the
    template, like ``\\boxed{}``, are literal)."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty str, got {question!r}")
    if "{question}" not in template:
        raise ValueError("template must contain the placeholder {question}")
    return template.replace("{question}", question)


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """``messages`` with ``system_prompt`` first, unless it is empty or the conversation opens
    with its own system message (a row's own system prompt wins): one rule for GRPO prompts
    and SFT rows."""
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _balanced(s: str) -> bool:
    depth = 0
    for c in s:
        depth += (c == "{") - (c == "}")
        if depth < 0:
            return False
    return depth == 0


def sft_target(cot: str, answer: str) -> str:
    """``<think>{cot}</think> \\boxed{{answer}}``, the completion for cold-start SFT."""
    if not isinstance(cot, str) or not cot.strip():
        raise ValueError(f"cot must be a non-empty str, got {cot!r}")
    if THINK_OPEN in cot or THINK_CLOSE in cot:
        raise ValueError("cot must not contain <think> or </think> tags")
    answer = str(answer)
    if not answer.strip() or not _balanced(answer):
        raise ValueError(f"answer must be non-empty with balanced braces, got {answer!r}")
    return f"{THINK_OPEN}{cot}{THINK_CLOSE} \\boxed{{{answer}}}"


def sft_example(example: dict) -> dict[str, str]:
    """``{"prompt", "completion"}`` for SFT from a task example (needs ``prompt``,
    ``solution_cot`` and ``answer``)."""
    for key in ("prompt", "solution_cot", "answer"):
        if key not in example:
            raise ValueError(f"example has no {key!r} field")
    return {"prompt": example["prompt"], "completion": sft_target(example["solution_cot"], example["answer"])}
