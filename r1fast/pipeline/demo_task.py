"""The demo's world: a task where reasoning length matters, a base corpus that mixes two
languages, and general prompts with preferences for stage 4.

**Addition where the short answer is a trap.** Problems are ``a + b`` with 1-2 digit operands;
held-out problems exclude operand-swapped twins of training ones (the task generator splits on
unordered operands). A completion either reasons column by column, writing every carry::

    <think>Add. 7+8=15 then 4+3+1=8 so 85</think> \\boxed{85}

or answers at once::

    <think>Add.</think> \\boxed{75}

and the quick answer is what people often get wrong: the base corpus's quick answers add each
column and drop the carry (47 + 38 -> 75), so they are right only when no column carries,
while its long chains are right. A base model that imitates the corpus answers quickly most of
the time; RL on accuracy alone can only win by thinking longer, so pass@1 and response length
rise together (R1-Zero's finding, in miniature).

**Two languages.** Each connective of a long chain ("then", "so") is written in Greek ("μετά",
"άρα") with probability ``greek_share`` in the base corpus, as a web-trained base mixes
languages. Mixing costs no accuracy, so RL without the language-consistency reward keeps or
grows it as chains get longer; the cold start (clean English chains) and stage 2's reward
remove it.

**General prompts (stage 3 and 4).** "Greet NAME." has no rule-checkable answer: a warm
greeting is preferred to a curt or rude one. Stage 3 mixes such
rows, of mixed quality, into SFT; stage 4 trains a reward model on preference pairs (names of
held-out pairs never seen in training) and uses it for these prompts while rule rewards score
the additions.
"""
from __future__ import annotations

import random
from typing import Sequence

from r1fast.data import generate_task, make_prompt, sft_target

TEMPLATE = "Q: {question} Reason in <think></think>, answer in \\boxed{}.\nA: "
GENERAL_TEMPLATE = "Q: Greet {name}.\nA: "
CONNECTIVES = {"then": "μετά", "so": "άρα"}  # English -> Greek
SCRIPTS = ("greek",)  # the char tokenizer's second script


def column_steps(a: int, b: int) -> list[str]:
    """'7+8=15', '4+3+1=8' for 47 + 38: one equation per column from the units, the carry
    written as +1."""
    da, db = [int(c) for c in str(a)[::-1]], [int(c) for c in str(b)[::-1]]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        s = x + y + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={s}")
        carry = s // 10
    return steps


def long_cot(a: int, b: int, rng: random.Random | None = None, greek_share: float = 0.0) -> str:
    """The column-by-column chain; each connective is Greek with probability ``greek_share``."""
    def word(english: str) -> str:
        return CONNECTIVES[english] if rng is not None and rng.random() < greek_share else english

    steps = column_steps(a, b)
    body = steps[0] + "".join(f" {word('then')} {s}" for s in steps[1:])
    return f"Add. {body} {word('so')} {a + b}"


def carry_free_sum(a: int, b: int) -> int:
    """The quick answer's mistake: each column's sum mod 10, carries dropped (47 + 38 -> 75)."""
    out, place = 0, 1
    while a or b:
        out += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return out


def quick_answer(a: int, b: int) -> str:
    return sft_target("Add.", str(carry_free_sum(a, b)))


def problems(n: int, split: str, seed: int) -> list[dict]:
    """``n`` addition problems (1-2 digit operands) with the demo's prompt and clean chain."""
    exs = generate_task("arithmetic", n, split=split, seed=seed, min_digits=1, max_digits=2,
                        ops=("+",))
    for ex in exs:
        ex["prompt"] = make_prompt(ex["question"], TEMPLATE)
        ex["solution_cot"] = long_cot(ex["a"], ex["b"])
    return exs


def base_corpus(examples: Sequence[dict], long_share: float, greek_share: float,
                seed: int) -> list[dict]:
    """The base model's 'web text': each problem answered with a long chain (share
    ``long_share``, connectives Greek at ``greek_share``) or quickly with the carry dropped."""
    rng = random.Random(f"r1fast/demo/corpus/{seed}")
    rows = []
    for ex in examples:
        a, b = ex["a"], ex["b"]
        if rng.random() < long_share:
            completion = sft_target(long_cot(a, b, rng, greek_share), str(a + b))
        else:
            completion = quick_answer(a, b)
        rows.append({"prompt": ex["prompt"], "completion": completion})
    return rows


# ---------------------------------------------------------------------------- general prompts

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")


def names(n: int, split: str, seed: int) -> list[str]:
    """``n`` distinct two-syllable names; train and test names are disjoint (test names start
    with one of the last four onsets, train names with one of the others)."""
    onsets = _ONSETS[:-4] if split == "train" else _ONSETS[-4:]
    rng = random.Random(f"r1fast/demo/names/{split}/{seed}")
    pool = sorted({(o1 + v1 + o2 + v2).capitalize() for o1 in onsets for v1 in _VOWELS
                   for o2 in _ONSETS for v2 in _VOWELS})
    if n > len(pool):
        raise ValueError(f"names: only {len(pool)} distinct {split} names, asked for {n}")
    return rng.sample(pool, n)


# The warm reply does not repeat the name: the 2-layer demo models cannot copy an unseen name
# from the prompt (measured: "Greet Suve." -> "Hello Dube, ..."), and the demo is about the
# reward model, not about copying. The poor replies are curt or rude.
WARM = "Hello, nice to meet you!"
POOR = ("Hi.", "What?", "Go away.", "Hello.")


def general_prompt(name: str) -> str:
    return GENERAL_TEMPLATE.format(name=name)


def general_sft_rows(n: int, good_share: float, seed: int) -> list[dict]:
    """Non-reasoning SFT rows (stage 3's writing data), a ``good_share`` of them warm greetings
    and the rest poor ones: the quality stage 4's reward model then improves."""
    rng = random.Random(f"r1fast/demo/general_sft/{seed}")
    pool = names(n, "train", seed)
    rows = []
    for name in pool:
        reply = WARM if rng.random() < good_share else rng.choice(POOR)
        rows.append({"prompt": general_prompt(name), "completion": reply})
    return rows


def near_miss(rng: random.Random) -> str:
    """The warm reply with one to three characters deleted, replaced or inserted: the flawed
    replies a policy writes while it learns, which the reward model must rank low too (trained
    on clean replies only, it scored garbled ones nearly as high as the warm one, and stage-4
    RL started to exploit that)."""
    chars = sorted(set(WARM))
    while True:
        text = list(WARM)
        for _ in range(rng.randint(1, 3)):
            i, edit = rng.randrange(len(text)), rng.choice("dri")
            if edit == "d" and len(text) > 1:
                del text[i]
            elif edit == "r":
                text[i] = rng.choice(chars)
            else:
                text.insert(i, rng.choice(chars))
        out = "".join(text)
        if out.strip() != WARM:
            return out


def preference_pairs(n: int, split: str, seed: int) -> list[dict]:
    """``{"prompt", "chosen", "rejected"}`` rows: the warm greeting over a curt or rude one
    (half the pairs) or over a near miss of itself (the other half)."""
    rng = random.Random(f"r1fast/demo/pairs/{split}/{seed}")
    pool = names(n, split, seed)
    return [{"prompt": general_prompt(name), "chosen": WARM,
             "rejected": rng.choice(POOR) if i % 2 else near_miss(rng)}
            for i, name in enumerate(pool)]


def is_warm_greeting(reply: str) -> bool:
    """The preferred reply, exactly: what the held-out greeting rate counts."""
    return reply.strip() == WARM


def general_rl_rows(n: int, seed: int) -> list[dict]:
    """Stage 4's general prompts: routed to the reward model (no answer)."""
    return [{"prompt": general_prompt(name), "reward": "reward_model"}
            for name in names(n, "train", seed + 1)]
