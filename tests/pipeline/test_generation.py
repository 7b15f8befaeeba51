"""r1fast.pipeline.generation: what the stages' sampling takes from its caller and checks first."""
from __future__ import annotations

import logging

import pytest

pytest.importorskip("megatron.core")

from r1fast.data.tokenizer import CharTokenizer  # noqa: E402
from r1fast.pipeline.evaluate import evaluate_model  # noqa: E402
from r1fast.pipeline.generation import sample_with_flags  # noqa: E402
from r1fast.policy import build_policy  # noqa: E402
from r1fast.policy.config import ModelConfig, ParallelConfig  # noqa: E402
from r1fast.policy.parallel import destroy_parallel  # noqa: E402
from r1fast.rollout.sampler import SamplingConfig  # noqa: E402
from r1fast.train.config import RolloutConfig  # noqa: E402

TOK = CharTokenizer()


@pytest.fixture(scope="module")
def policy():
    yield build_policy(ModelConfig.preset("tiny-moe").replace(max_position_embeddings=64),
                       ParallelConfig(), seed=0, trainable=False)
    destroy_parallel()


def test_the_callers_stop_ids_are_kept(policy):
    """The tokenizer's stop ids replaced the caller's: a stop the caller asked for was ignored
    and the completion ran to max_new_tokens."""
    greedy = SamplingConfig(temperature=0, max_new_tokens=8)
    text = sample_with_flags(policy, TOK, ["12+3="], 1, greedy).texts[0][0]
    stop = TOK.encode(text[1])[0]  # the second character the model writes
    assert stop not in TOK.stop_ids
    out = sample_with_flags(policy, TOK, ["12+3="], 1,
                            SamplingConfig(temperature=0, max_new_tokens=8, stop_token_ids=(stop,)))
    assert out.texts[0][0] == text[:2] and out.truncated == [[False]]  # stopped at it


def test_a_prompt_without_room_for_the_completion_fails_before_sampling(policy):
    """A prompt too long for max_new_tokens failed when generation reached its batch, after the
    batches before it had been sampled, with a message naming neither it nor the option."""
    prompts = ["1+2=", "9" * 60 + "+1=", "3+4="]
    with pytest.raises(ValueError, match=r"1 of 3 prompts are longer than the 56 tokens "
                                         r"max_position_embeddings=64 leaves beside "
                                         r"max_new_tokens=8 \(the longest, prompt 1, has 64\); "
                                         r"lower max_new_tokens"):
        sample_with_flags(policy, TOK, prompts, 2, SamplingConfig(max_new_tokens=8))


def test_evaluation_decodes_with_the_runs_rollout_settings(policy, caplog):
    """GRPO's held-out evaluation built the default decoder whatever rollout.decoder,
    prefill_tokens and experts said (a prefill slice set against an OOM was not applied)."""
    opts = RolloutConfig(decoder="recompute").decoder_options()
    assert opts == dict(recompute=True, prefill_tokens=0, experts="auto")
    assert RolloutConfig(prefill_tokens=96, experts="sequential").decoder_options() == dict(
        recompute=False, prefill_tokens=96, experts="sequential")
    with caplog.at_level(logging.WARNING):
        evaluate_model(None, [{"prompt": "1+2=", "answer": "3"}], k=2, max_new_tokens=4,
                       policy=policy, tokenizer=TOK, warn=False, decoder_options=opts)
    assert "PREFIX RECOMPUTATION" in caplog.text  # that decoder's warning: it ran
    with pytest.raises(ValueError, match="prefill_tokens=5 is a setting of the KV-cache decoder"):
        evaluate_model(None, [{"prompt": "1+2=", "answer": "3"}], k=1, max_new_tokens=4,
                       policy=policy, tokenizer=TOK, warn=False,
                       decoder_options=dict(recompute=True, prefill_tokens=5))
