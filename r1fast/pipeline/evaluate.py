"""Evaluation as in the R1 report: pass@1 estimated from k samples per problem, and
majority voting (cons@k).

pass@1 = mean over problems of (correct samples / k), at a sampling temperature and top-p (the
report uses 0.6 and 0.95). cons@k: the most frequent extracted answer among the k samples (ties
to the first seen) is the model's answer; the problem counts as solved when that answer is
correct. Votes compare answers as math-verify does (``5``, ``5.0`` and ``\\frac{10}{2}`` are one
vote); samples without an extractable final answer cast no vote and are counted
(``no_answer_rate``). Correctness is the example's own reward (its ``reward`` field: math
accuracy or the Countdown checker; math accuracy for dataset rows without one) applied to
``\\boxed{answer}``, so both metrics use the same rule as training.

Each rate comes with its standard error over problems (the sample standard deviation of the
per-problem values over sqrt(problems)): with k samples per problem the problems, not the
samples, are the independent draws. ``language_mixing`` is the mean share of chain-of-thought
words outside the target language (:mod:`r1fast.rewards.language`; a thought without words
mixes nothing), the quantity R1's language-consistency reward drives down.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from r1fast.rewards import answers_equal, extract_answer, get_reward, is_well_formed
from r1fast.rewards.extract import as_scored
from r1fast.rewards.language import LanguageRewardConfig, language_consistency
from r1fast.rewards.registry import DEFAULT_ROUTES
from r1fast.rollout.sampler import SamplingConfig


@dataclass
class EvalResult:
    pass_at_1: float
    """Mean fraction of correct samples per problem."""
    cons_at_k: float
    """Fraction of problems whose majority answer is correct."""
    format_rate: float
    """Fraction of samples in the <think>...</think> + \\boxed{} format."""
    mean_length: float
    """Mean completion length in characters."""
    k: int
    num_problems: int
    no_answer_rate: float = 0.0
    """Fraction of samples with no extractable final answer."""
    pass_at_1_se: float = 0.0
    """Standard error of pass_at_1 over problems."""
    cons_at_k_se: float = 0.0
    """Standard error of cons_at_k over problems."""
    language_mixing: float = 0.0
    """Mean share of thought words outside the target language (``language``)."""
    language_mixing_se: float = 0.0
    """Standard error of language_mixing over problems."""
    language: str = "en"
    """Target language of ``language_mixing``."""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def checker(example: dict, cache: dict) -> object:
    """The reward that decides whether an answer to ``example`` is correct: its ``reward``
    field, or math accuracy where training's default checker would score it (no field, or
    "rule")."""
    name = example.get("reward")
    name = "math_accuracy" if name in DEFAULT_ROUTES else name
    if name not in cache:
        cache[name] = get_reward(name)
    return cache[name]


def majority_answer(answers: Sequence[str]) -> str | None:
    """The answer of the largest group of equivalent answers (math-verify equality; ties to the
    group seen first), or None when there is none."""
    groups: list[list[str]] = []
    for a in answers:
        for g in groups:
            if a == g[0] or answers_equal(a, g[0]):
                g.append(a)
                break
        else:
            groups.append([a])
    return max(groups, key=len)[0] if groups else None


def standard_error(values: Sequence[float]) -> float:
    """Sample standard deviation over sqrt(n): the standard error of the mean of ``values``
    (0.0 for fewer than two)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def score_samples(samples: Sequence[Sequence[str]], examples: Sequence[dict],
                  language: str = "en") -> EvalResult:
    """Metrics of already generated ``samples[i][j]`` for ``examples[i]``."""
    if len(samples) != len(examples) or not samples:
        raise ValueError("samples and examples must be non-empty and of the same length")
    checkers: dict[str, object] = {}
    lang = LanguageRewardConfig(target=language, empty_score=1.0)
    passes, solved, mixing = [], [], []
    fmt = length = missing = 0.0
    k = len(samples[0])
    for outs, ex in zip(samples, examples):
        check = checker(ex, checkers)
        read = [as_scored(o, ex.get("prompt", "")) for o in outs]  # a <think> the prompt opened

        def correct(answer: str | None) -> bool:
            return answer is not None and check(f"\\boxed{{{answer}}}", ex) >= 1.0

        answers = [extract_answer(o) for o in read]
        passes.append(sum(correct(a) for a in answers) / len(outs))
        majority = majority_answer([a for a in answers if a is not None])
        solved.append(float(majority is not None and correct(majority)))
        mixing.append(sum(1.0 - language_consistency(o, lang) for o in read) / len(outs))
        missing += sum(a is None for a in answers) / len(outs)
        fmt += sum(is_well_formed(o) for o in read) / len(outs)
        length += sum(len(o) for o in outs) / len(outs)
    n = len(examples)
    return EvalResult(sum(passes) / n, sum(solved) / n, fmt / n, length / n, k, n, missing / n,
                      standard_error(passes), standard_error(solved), sum(mixing) / n,
                      standard_error(mixing), language)


def evaluate_model(model_dir, examples: Sequence[dict], k: int = 8, temperature: float = 0.6,
                   top_p: float = 0.95, max_new_tokens: int = 64, seed: int = 0,
                   policy=None, tokenizer=None, language: str = "en") -> EvalResult:
    """pass@1 and cons@k of the model folder ``model_dir`` (or a loaded policy) on ``examples``."""
    from r1fast.pipeline.generation import load_model, sample

    if policy is None:
        policy, tokenizer = load_model(model_dir)
    cfg = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    samples = sample(policy, tokenizer, [ex["prompt"] for ex in examples], k, cfg, seed=seed)
    return score_samples(samples, examples, language)
