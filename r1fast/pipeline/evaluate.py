"""Evaluation as in the R1 report: pass@1 estimated from k samples per problem, and
majority voting (cons@k).

pass@1 = mean over problems of (correct samples / k), at a sampling temperature and top-p (the
report uses 0.6 and 0.95). cons@k: the most frequent extracted answer among the k samples (ties
to the first seen) is the model's answer; the problem counts as solved when that answer is
correct. On rows scored by math accuracy, votes compare answers as math-verify does (``5``,
``5.0`` and ``\\frac{10}{2}`` are one vote). On rows with another checker (Countdown, a reward
of one's own) votes compare the answer text with whitespace removed: math equality would put
every expression of the same value in one vote, so for Countdown numbers [2, 5] and target 10
a bare ``10`` (not an equation) and ``2*5`` would vote together and whichever came first would
decide. Samples without an extractable final answer cast no vote and are counted
(``no_answer_rate``). Correctness is the example's own reward (its ``reward`` field: math
accuracy or the Countdown checker; math accuracy for dataset rows without one) applied to
``\\boxed{answer}``, so both metrics use the same rule as training.

Each rate comes with its standard error over problems (the sample standard deviation of the
per-problem values over sqrt(problems)): with k samples per problem the problems, not the
samples, are the independent draws. ``language_mixing`` is the mean share of chain-of-thought
words outside the target language (:mod:`r1fast.rewards.language`; a thought without words
mixes nothing), the quantity R1's language-consistency reward drives down.

``truncated_rate`` is the share of samples that hit ``max_new_tokens`` before a stop token: their
answers are cut off, so they score as wrong or missing whatever the model would have said. A
reasoning model given too few new tokens scores near 0 for that reason alone, so more than
:data:`TRUNCATION_WARN_RATE` of them logs a WARNING, and the result echoes the sampling
settings and seed it was measured with.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Sequence

from r1fast.pipeline.filters import build_checkers, check_answer
from r1fast.rewards import answers_equal, extract_answer, get_reward, is_well_formed
from r1fast.rewards.extract import as_scored
from r1fast.rewards.language import LanguageRewardConfig, language_consistency
from r1fast.rewards.registry import DEFAULT_ROUTES
from r1fast.rollout.sampler import SamplingConfig

log = logging.getLogger("r1fast.pipeline")

#: above this share of samples cut at max_new_tokens, the scores say more about the length
#: limit than about the model: evaluate_model warns
TRUNCATION_WARN_RATE = 0.05
#: CPU seconds one answer check may use (math-verify on a pathological answer can take
#: minutes); past it the answer counts as wrong, and as a checker timeout
CHECK_CPU_TIME_S = 3.0


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
    num_samples: int = 0
    """Samples scored, over all problems."""
    truncated_rate: float | None = None
    """Fraction of samples cut at ``max_new_tokens`` before a stop token (None: the samples
    were scored without their truncation flags)."""
    truncated_rate_se: float | None = None
    """Standard error of truncated_rate over problems."""
    temperature: float | None = None
    """Sampling temperature (None here and below: samples scored as given, settings unknown)."""
    top_p: float | None = None
    max_new_tokens: int | None = None
    seed: int | None = None
    """Base seed: sample j of problem i drew from the random stream (seed, i, j)."""
    checker_timeouts: int = 0
    """Answers (samples and majority answers) whose check ran past :data:`CHECK_CPU_TIME_S`
    CPU seconds: counted as wrong, with a WARNING."""
    checker_errors: int = 0
    """Answers whose checker raised or returned no finite number: counted as wrong, with a
    WARNING naming the first."""
    per_problem: dict[str, list[float]] | None = None
    """``pass_at_1``, ``cons_at_k`` and ``language_mixing`` of each problem, in order: two
    evaluations of the same problems with the same sampling streams differ per problem, so
    their difference has a paired standard error (:func:`r1fast.pipeline.demo_report.gain`)."""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def checker_name(example: dict) -> str:
    """The name of the reward that decides whether an answer to ``example`` is correct: its
    ``reward`` field, or math accuracy where training's default checker would score it (no
    field, or "rule")."""
    name = example.get("reward")
    return "math_accuracy" if name in DEFAULT_ROUTES else name


def checker(example: dict, cache: dict) -> object:
    """The reward of :func:`checker_name` for ``example``, built once per name in ``cache``."""
    name = checker_name(example)
    if name not in cache:
        cache[name] = get_reward(name)
    return cache[name]


def vote_key(answer: str) -> str:
    """What a vote on a non-math row compares: the answer with all whitespace removed
    (``2 * 5`` and ``2*5`` are one vote, ``5*2`` another)."""
    return "".join(answer.split())


def majority_answer(answers: Sequence[str], math_equal: bool = True) -> str | None:
    """The answer equivalent to the most answers (ties to the one seen first), or None when
    there is none. ``math_equal``: equivalent means math-verify equal; else equal
    :func:`vote_key` (for checkers other than math accuracy). Every answer is counted against
    every other, not against a group's first member: math equality is not transitive (``5\%``
    equals ``5`` and ``0.05``), and grouping by first members made the winner depend on the
    order of the same votes."""
    def same(a: str, b: str) -> bool:
        if math_equal:
            return a == b or answers_equal(a, b)
        return vote_key(a) == vote_key(b)

    votes: dict[str, int] = {}
    for a in answers:  # identical strings are compared once, in first-seen order
        votes[a] = votes.get(a, 0) + 1
    support = {a: sum(n for b, n in votes.items() if b == a or same(a, b)) for a in votes}
    return max(votes, key=support.__getitem__) if votes else None


def standard_error(values: Sequence[float]) -> float:
    """Sample standard deviation over sqrt(n): the standard error of the mean of ``values``;
    NaN for fewer than two (one problem has no spread to measure: "± 0" would claim one)."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def score_samples(samples: Sequence[Sequence[str]], examples: Sequence[dict],
                  language: str = "en",
                  truncated: Sequence[Sequence[bool]] | None = None, *,
                  share_checks: bool = False, warn: bool = True) -> EvalResult:
    """Metrics of already generated ``samples[i][j]`` for ``examples[i]``; ``truncated[i][j]``
    marks samples cut at the generation limit (None: unknown, ``truncated_rate`` is None).
    ``share_checks``: every process of the job calls this with the same samples (collective):
    process r checks problems r, r + world, ... and they exchange the results, so each
    returns the whole result in 1/world of the time. ``warn=False``: no WARNINGs (another
    process gives them)."""
    if len(samples) != len(examples) or not samples:
        raise ValueError("samples and examples must be non-empty and of the same length")
    if truncated is not None and [len(t) for t in truncated] != [len(o) for o in samples]:
        raise ValueError("truncated must have one flag per sample, shaped like samples")
    cache: dict[str, object] = {}
    checks = build_checkers(examples, lambda ex: checker(ex, cache), "evaluation")
    lang = LanguageRewardConfig(target=language, empty_score=1.0)
    rank, world = _process_share() if share_checks else (0, 1)
    scores = {i: _problem_scores(samples[i], examples[i], checks[i], lang)
              for i in range(rank, len(examples), world)}
    if world > 1:
        from r1fast.policy.parallel import all_ranks_object

        scores = {i: v for part in all_ranks_object(scores) for i, v in part.items()}
    per = [scores[i] for i in range(len(examples))]
    failed = {kind: [f for p in per for f in p["failed"][kind]] for kind in FAILED_CHECKS}
    if warn:
        _warn_failed_checks(failed)
    passes, solved, mixing = ([p[key] for p in per] for key in ("pass", "solved", "mixing"))
    cut = [sum(map(bool, flags)) / len(flags) for flags in truncated] \
        if truncated is not None else []
    n = len(examples)
    return EvalResult(sum(passes) / n, sum(solved) / n, sum(p["format"] for p in per) / n,
                      sum(p["length"] for p in per) / n, len(samples[0]), n,
                      sum(p["missing"] for p in per) / n, standard_error(passes),
                      standard_error(solved), sum(mixing) / n, standard_error(mixing), language,
                      sum(len(o) for o in samples),
                      sum(cut) / n if truncated is not None else None,
                      standard_error(cut) if truncated is not None else None,
                      checker_timeouts=len(failed["timeout"]),
                      checker_errors=len(failed["checker_error"]),
                      per_problem={"pass_at_1": passes, "cons_at_k": solved,
                                   "language_mixing": mixing})


#: how an answer's check can fail (counted as wrong, with a WARNING)
FAILED_CHECKS = ("timeout", "checker_error")


def _process_share() -> tuple[int, int]:
    """(this process's rank, the number of processes) of the job; (0, 1) without one."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _problem_scores(outs: Sequence[str], ex: dict, check, lang: LanguageRewardConfig) -> dict:
    """One problem's numbers: the share of correct samples (``pass``), whether the majority
    answer is correct (``solved``), the mean language mixing, the shares without an answer
    (``missing``) and in format, the mean length, and the failed checks (example id, error)."""
    read = [as_scored(o, ex.get("prompt", "")) for o in outs]  # a <think> the prompt opened
    failed: dict[str, list] = {kind: [] for kind in FAILED_CHECKS}

    def correct(answer: str | None) -> bool:
        if answer is None:
            return False
        reason, error = check_answer(f"\\boxed{{{answer}}}", ex, check, CHECK_CPU_TIME_S)
        if reason in failed:  # scored wrong, counted and warned about
            failed[reason].append((ex.get("id"), error))
        return reason is None

    answers = [extract_answer(o) for o in read]
    majority = majority_answer([a for a in answers if a is not None],
                               math_equal=checker_name(ex) == "math_accuracy")
    return {"pass": sum(correct(a) for a in answers) / len(outs),
            "solved": float(majority is not None and correct(majority)),
            "mixing": sum(1.0 - language_consistency(o, lang) for o in read) / len(outs),
            "missing": sum(a is None for a in answers) / len(outs),
            "format": sum(is_well_formed(o) for o in read) / len(outs),
            "length": sum(len(o) for o in outs) / len(outs), "failed": failed}


def _warn_failed_checks(failed: dict[str, list]) -> None:
    """A WARNING per kind of answer the checker could not score (counted as wrong)."""
    if failed["checker_error"]:
        where, error = failed["checker_error"][0]
        log.warning("evaluation: the checker failed on %d answers, counted as wrong; first: "
                    "example %r: %s", len(failed["checker_error"]), where, error)
    if failed["timeout"]:
        log.warning("evaluation: the checker ran past %g CPU seconds on %d answers, counted as "
                    "wrong (first: example %r)", CHECK_CPU_TIME_S, len(failed["timeout"]),
                    failed["timeout"][0][0])


def evaluate_model(model_dir, examples: Sequence[dict], k: int = 8, temperature: float = 0.6,
                   top_p: float = 0.95, max_new_tokens: int = 64, seed: int = 0,
                   policy=None, tokenizer=None, language: str = "en", dp_group=None,
                   share_checks: bool = False, warn: bool = True,
                   decoder_options: dict | None = None) -> EvalResult:
    """pass@1 and cons@k of the model folder ``model_dir`` (or a loaded policy) on ``examples``,
    with the share of samples cut at ``max_new_tokens`` and the settings sampled with.
    In a parallel run (collective): ``dp_group`` shares the generation between the policy's
    replicas (:func:`~r1fast.pipeline.generation.sample_with_flags`), ``share_checks`` the
    answer checks between all processes (:func:`score_samples`); ``warn=False``: no
    WARNINGs (another process gives them); ``decoder_options``: the rollout decoder's
    settings (a run's ``rollout``: :meth:`~r1fast.train.config.RolloutConfig.decoder_options`)."""
    from r1fast.pipeline.generation import load_model, sample_with_flags

    if policy is None:
        policy, tokenizer = load_model(model_dir)
    cfg = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    out = sample_with_flags(policy, tokenizer, [ex["prompt"] for ex in examples], k, cfg,
                            seed=seed, dp_group=dp_group, decoder_options=decoder_options)
    result = replace(score_samples(out.texts, examples, language, truncated=out.truncated,
                                   share_checks=share_checks, warn=warn),
                     temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                     seed=seed)
    if warn:
        warn_if_truncated(result)
    return result


def warn_if_truncated(result: EvalResult) -> None:
    """A WARNING when more than :data:`TRUNCATION_WARN_RATE` of the samples were cut at
    ``max_new_tokens``: their answers are missing, so the scores understate the model."""
    rate = result.truncated_rate
    if rate is None or rate <= TRUNCATION_WARN_RATE:
        return
    log.warning("evaluation: %.1f%% of the %d samples hit max_new_tokens=%s before a stop "
                "token, so their answers are cut off and pass@1 / cons@k understate the model; "
                "raise it (r1fast stage evaluate --max-new-tokens N; in GRPO's held-out "
                "evaluation --rollout.max_new_tokens=N)", 100 * rate, result.num_samples,
                result.max_new_tokens)
