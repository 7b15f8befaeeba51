"""Evaluation reports truncation and its sampling settings, and cons@k votes by the row's own
checker: Countdown answers vote by their text, math answers by math equality."""
import logging

import pytest

from r1fast.pipeline import generation
from r1fast.pipeline.evaluate import (evaluate_model, majority_answer, score_samples,
                                      standard_error)
from r1fast.pipeline.generation import Samples

COUNTDOWN = {"prompt": "Use 2 and 5 to make 10.", "numbers": [2, 5], "target": 10,
             "reward": "countdown"}


def boxed(*answers: str) -> list[str]:
    return [f"<think>x</think> \\boxed{{{a}}}" for a in answers]


@pytest.mark.parametrize("answers, pass_at_1, cons", [
    # math equality put all three in one vote, led by the invalid "10": cons 0.0
    (("10", "2*5", "2*5"), 2 / 3, 1.0),
    # ... and here by the valid "2*5" though two of three samples answered a bare "10": 1.0
    (("2*5", "10", "10"), 1 / 3, 0.0),
    (("2 * 5", "2*5", "10"), 2 / 3, 1.0),  # whitespace does not split a vote
    # three votes of one: ties go to the vote seen first, the bare "10"
    (("10", "2*5", "5*2"), 2 / 3, 0.0),
    (("5*2", "10", "2*5"), 2 / 3, 1.0),
])
def test_countdown_votes_compare_equations_not_values(answers, pass_at_1, cons):
    r = score_samples([boxed(*answers)], [COUNTDOWN])
    assert r.pass_at_1 == pytest.approx(pass_at_1)
    assert r.cons_at_k == cons


def test_majority_answer_by_text_or_by_math():
    assert majority_answer(["10", "2*5", "2 * 5"], math_equal=False) == "2*5"
    assert majority_answer(["10", "2*5", "2 * 5"]) == "10"  # math rows: one vote, as before
    assert majority_answer([], math_equal=False) is None


def test_the_majority_does_not_depend_on_the_order_of_the_votes():
    """5% equals both 5 and 0.05 (math equality is not transitive): grouped by each group's
    first member, the same six votes elected 0.05 in one order and 5% in another."""
    votes = ["0.05", "0.05", "0.05", "5\\%", "5", "5"]
    winners = {majority_answer(order) for order in (votes, votes[3:] + votes[:3],
                                                    [votes[3], *votes[:3], *votes[4:]])}
    assert winners == {"5\\%"}  # equal to all six


def test_truncated_rate_is_per_problem_with_its_standard_error():
    exs = [{"answer": "5"}, {"answer": "7"}]
    samples = [boxed("5", "5"), boxed("7", "1")]
    flags = [[True, False], [False, False]]
    r = score_samples(samples, exs, truncated=flags)
    assert r.truncated_rate == pytest.approx(0.25)
    assert r.truncated_rate_se == pytest.approx(standard_error([0.5, 0.0]))
    assert r.num_samples == 4 and r.num_problems == 2 and r.k == 2
    plain = score_samples(samples, exs)  # no flags: unknown, never a claimed 0.0
    assert plain.truncated_rate is None and plain.truncated_rate_se is None
    assert plain.pass_at_1 == r.pass_at_1 and plain.cons_at_k == r.cons_at_k
    with pytest.raises(ValueError, match="one flag per sample"):
        score_samples(samples, exs, truncated=[[True], [False, False]])


def fake_sampler(texts, flags, calls):
    def sample_with_flags(policy, tokenizer, prompts, k, sampling, seed=0, batch_rows=64,
                          dp_group=None, decoder_options=None):
        calls.append((list(prompts), k, sampling, seed))
        return Samples(texts=texts, truncated=flags)
    return sample_with_flags


def test_evaluate_model_echoes_settings_and_warns_on_truncation(monkeypatch, caplog):
    exs = [{"prompt": "1+4", "answer": "5"}, {"prompt": "3+4", "answer": "7"}]
    texts = [boxed("5", "5"), ["<think>3+4 is", "<think>3 plus"]]
    calls = []
    monkeypatch.setattr(generation, "sample_with_flags",
                        fake_sampler(texts, [[False, False], [True, True]], calls))
    with caplog.at_level(logging.WARNING, logger="r1fast.pipeline"):
        r = evaluate_model(None, exs, k=2, temperature=0.7, top_p=0.9, max_new_tokens=64,
                           seed=3, policy=object(), tokenizer=object())
    (prompts, k, sampling, seed), = calls
    assert prompts == ["1+4", "3+4"] and k == 2 and seed == 3
    assert (sampling.temperature, sampling.top_p, sampling.max_new_tokens) == (0.7, 0.9, 64)
    d = r.as_dict()
    assert (d["temperature"], d["top_p"], d["max_new_tokens"], d["seed"]) == (0.7, 0.9, 64, 3)
    assert d["truncated_rate"] == 0.5 and d["truncated_rate_se"] == pytest.approx(0.5)
    assert d["pass_at_1"] == 0.5 and d["no_answer_rate"] == 0.5  # the numbers as before
    assert "max_new_tokens=64" in caplog.text and "--max-new-tokens" in caplog.text
    assert "50.0% of the 4 samples" in caplog.text


def test_no_warning_at_or_below_five_percent(monkeypatch, caplog):
    exs = [{"prompt": "1+4", "answer": "5"}]
    flags = [[True] + [False] * 19]  # exactly 5%
    monkeypatch.setattr(generation, "sample_with_flags",
                        fake_sampler([boxed(*["5"] * 20)], flags, []))
    with caplog.at_level(logging.WARNING, logger="r1fast.pipeline"):
        r = evaluate_model(None, exs, k=20, policy=object(), tokenizer=object())
    assert r.truncated_rate == pytest.approx(0.05) and "max_new_tokens" not in caplog.text


def test_a_checker_that_fails_or_runs_long_counts_as_wrong_and_says_so(monkeypatch, caplog):
    """One checker exception used to end the evaluation (after all the sampling); now the
    answer is wrong, counted in checker_errors / checker_timeouts, with a WARNING; a row no
    checker can score is an error naming it."""
    import r1fast.pipeline.evaluate as ev

    # a Countdown row without its numbers: the checker raises on every answer
    countdown = {"prompt": "Reach 7.", "target": 7, "reward": "countdown", "id": "c:3"}
    math = {"prompt": "2 + 3 = ?", "answer": "5", "id": "m:0"}
    good = "<think>add</think> \\boxed{5}"
    with caplog.at_level(logging.WARNING, logger="r1fast.pipeline"):
        result = ev.score_samples([[good, good], ["<think>x</think> \\boxed{3+4}"] * 2],
                                  [math, countdown])
    assert result.pass_at_1 == 0.5 and result.checker_errors == 3  # 2 samples + the majority
    assert "the checker failed on 3 answers" in caplog.text and "'c:3'" in caplog.text

    def slow(text, example):
        while True:
            pass

    monkeypatch.setattr(ev, "CHECK_CPU_TIME_S", 0.2)
    monkeypatch.setattr(ev, "checker", lambda ex, cache: slow)
    result = ev.score_samples([[good]], [math])
    assert result.pass_at_1 == 0.0 and result.checker_timeouts == 2
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"example 0 \(id 'r:1'\) has reward 'reward_model'"):
        ev.score_samples([[good]], [{"prompt": "Greet.", "reward": "reward_model", "id": "r:1"}])


def _shared_sampling_worker(rank, layout):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from r1fast.data import CharTokenizer
    from r1fast.policy import build_policy
    from r1fast.policy.config import ParallelConfig
    from r1fast.rollout.sampler import SamplingConfig
    from tests.helpers.reward_world import MODEL

    policy = build_policy(MODEL, ParallelConfig(world_size=dist.get_world_size(), **layout),
                          seed=5, trainable=False)
    tok = CharTokenizer()
    cfg = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=6)
    prompts = ["1+2=", "30+4=", "5+67="]
    group = ps.get_data_parallel_group()
    for k, batch_rows in ((1, 1), (2, 64)):  # 3 rows over 2 replicas: one pads a batch
        whole = generation.sample_with_flags(policy, tok, prompts, k, cfg, seed=9,
                                             batch_rows=batch_rows)
        shared = generation.sample_with_flags(policy, tok, prompts, k, cfg, seed=9,
                                              batch_rows=batch_rows, dp_group=group)
        assert shared == whole, (rank, k, shared, whole)
    # the answer checks shared over the processes: every one gets the whole result
    texts = [[f"<think>a</think> \\boxed{{{a}}}", "\\boxed{4}"] for a in ("3", "5", "72")]
    exs = [{"prompt": p, "answer": a, "id": i} for i, (p, a) in enumerate(
        zip(prompts, ("3", "34", "72")))]
    alone = score_samples(texts, exs, truncated=[[False, True]] * 3)
    assert alone.pass_at_1 == 1 / 3 and alone.truncated_rate == 0.5
    assert score_samples(texts, exs, truncated=[[False, True]] * 3, share_checks=True) == alone


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", [{}, {"ep": 2}], ids=["dp2", "dp2-ep2"])
def test_replicas_share_the_sampling_and_return_every_sample(tmp_path, layout):
    """GRPO's held-out evaluation sampled every problem on every data-parallel replica (the
    same work, dp times). Replicas now take every dp-th row and exchange them: the samples
    are those of one process, row for row (each row has its own random stream); under
    expert parallelism the replicas' forwards are collective, so they run as many batches.
    The answer checks are shared too, and every process gets the same result."""
    from tests.helpers.spawn import run_gloo

    run_gloo(2, str(tmp_path / "store"), _shared_sampling_worker, layout)
