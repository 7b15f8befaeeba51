"""Reward-model reward: batching, padding, truncation, output shapes."""
import pytest
import torch

from r1fast.data.tokenizer import CharTokenizer
from r1fast.rewards.reward_model import RewardModelConfig, RewardModelReward

TOK = CharTokenizer()


class TokenSum(torch.nn.Module):
    """score = sum over real (unmasked) tokens of w[token]: padding must not change it."""

    def __init__(self, vocab: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(vocab, dtype=torch.float64))
        self.calls = 0

    def forward(self, ids, mask):  # ids, mask: [B, T]
        self.calls += 1
        return (self.w[ids] * mask).sum(-1, keepdim=True)  # [B, 1]


def naive(model, text, max_length=None):
    ids = TOK.encode(text)
    if max_length:
        ids = ids[-max_length:]
    return float(sum(model.w[i].item() for i in ids))


def test_batched_scores_match_naive():
    model = TokenSum(TOK.vocab_size)
    rm = RewardModelReward(model, TOK, batch_size=2)
    comps = ["a", "bb ccc", "", "<think>x</think> \\boxed{1}", "z" * 7]
    exs = [{"prompt": f"p{i}: "} for i in range(5)]
    got = rm.score_batch(comps, exs)
    want = [naive(model, e["prompt"] + c) for c, e in zip(comps, exs)]
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert model.calls == 3  # ceil(5 / 2)
    assert rm(comps[1], exs[1]) == pytest.approx(want[1], rel=1e-6)


def test_truncation_keeps_the_end_and_prompt_flag():
    model = TokenSum(TOK.vocab_size)
    rm = RewardModelReward(model, TOK, max_length=4, include_prompt=False, scale=2.0, bias=1.0)
    text = "abcdefgh"
    assert rm(text, {"prompt": "ignored"}) == pytest.approx(2.0 * naive(model, text, 4) + 1.0, rel=1e-6)


def test_text_model_and_logits_output():
    rm = RewardModelReward(lambda texts: [float(len(t)) for t in texts], include_prompt=False)
    assert rm.score_batch(["ab", "abcd"], [{}, {}]) == [2.0, 4.0]

    class HFLike(torch.nn.Module):
        def forward(self, ids):
            return type("Out", (), {"logits": ids.float().sum(-1, keepdim=True)})()
    rm2 = RewardModelReward(HFLike(), TOK, pass_attention_mask=False, include_prompt=False)
    assert rm2("a", {}) == float(TOK.encode("a")[0])


def test_bad_output_shape():
    rm = RewardModelReward(lambda texts: torch.zeros(len(texts), 3), include_prompt=False)
    with pytest.raises(ValueError, match=r"output must have shape \[2\] or \[2, 1\]"):
        rm.score_batch(["a", "b"], [{}, {}])
    # an example without its prompt was scored as if the prompt were empty
    with pytest.raises(ValueError, match=r"the example has no 'prompt' .* got keys \['id'\]"):
        RewardModelReward(lambda texts: [0.0] * len(texts)).score_batch(["a"], [{"id": 1}])


def test_bad_inputs():
    with pytest.raises(ValueError, match="model must be callable"):
        RewardModelReward(3)
    with pytest.raises(ValueError, match="tokenizer must have an encode"):
        RewardModelReward(lambda t: t, tokenizer=object())
    with pytest.raises(ValueError, match="same length"):
        RewardModelReward(lambda t: t).score_batch(["a"], [])
    with pytest.raises(ValueError, match="batch_size must be in"):
        RewardModelConfig(batch_size=0)
    with pytest.raises(ValueError, match="max_length must be in"):
        RewardModelConfig(max_length=0)
    with pytest.raises(ValueError, match="scale and bias must be finite"):
        RewardModelConfig(scale=float("nan"))


def test_sync_pads_with_idle_calls_to_the_busiest_process():
    """With ``sync`` (the max batch count over processes), a process with fewer batches calls
    the model on empty batches until it made as many calls; the scores are unchanged."""
    calls = []

    def model(texts):
        calls.append(len(texts))
        return [float(len(t)) for t in texts]

    def sync(n):  # agreement comes first: the model's forward is collective on other ranks
        calls.append(f"sync {n}")
        return n + 2

    rm = RewardModelReward(model, include_prompt=False, batch_size=2, sync=sync)
    assert rm.score_batch(["a", "bb", "ccc"], [{}] * 3) == [1.0, 2.0, 3.0]
    assert calls == ["sync 2", 2, 1, 0, 0]  # ceil(3 / 2) real calls, then 2 idle ones
    calls.clear()
    assert rm.score_batch([], []) == [] and calls == ["sync 0", 0, 0]  # still in step

    ids_seen = []

    def by_ids(ids, mask):  # tokenizer mode: an idle call gets [0, 1] ids and mask
        ids_seen.append(tuple(ids.shape))
        return (ids * mask).sum(-1).double()

    rm2 = RewardModelReward(by_ids, TOK, include_prompt=False, sync=lambda n: 2)
    assert rm2.score_batch(["a"], [{}]) == [float(TOK.encode("a")[0])]
    assert ids_seen == [(1, 1), (0, 1)]
    with pytest.raises(ValueError, match="sync must be callable"):
        RewardModelReward(model, sync=3)


def test_reward_model_by_name_needs_a_model():
    from r1fast.rewards import get_reward

    with pytest.raises(ValueError, match=r"needs a trained model: in a recipe set \[reward\] "
                                         r"reward_model = "):
        get_reward("reward_model")
    assert get_reward("reward_model", model=lambda t: [2.0] * len(t),
                      include_prompt=False)("x", {}) == 2.0
