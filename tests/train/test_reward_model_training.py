"""Reward-model training (r1fast.train.reward_model): the Bradley-Terry loss and its gradient
against fp64 references (a closed form, and transformers' sequence classifier of the exported
folder, every parameter), TP2 / PP2 equal to one rank, pair-file errors, and a learning check
through `r1fast stage reward-model`."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from r1fast.data import CharTokenizer
from r1fast.policy.config import ParallelConfig
from r1fast.policy.optim import OptimConfig
from r1fast.policy.parallel import destroy_parallel
from r1fast.train.metrics import read_jsonl
from tests.helpers.reward_world import (MODEL, save_init, save_reward_folder, sorted_digit_pairs,
                                        write_jsonl)
from tests.helpers.spawn import run_ranks

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def _single_rank():
    yield
    destroy_parallel()


def test_bradley_terry_loss_and_gradient_match_a_closed_form_in_fp64():
    from r1fast.train.reward_model import bradley_terry_loss

    g = torch.Generator().manual_seed(0)
    chosen = torch.randn(64, generator=g) * 3
    rejected = torch.randn(64, generator=g) * 3
    chosen[:3] = torch.tensor([60.0, -60.0, 0.5])  # margins far past exp's fp32 range
    rejected[:3] = torch.tensor([-60.0, 60.0, 0.5])
    c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    bradley_terry_loss(c, r).sum().backward()
    for i in range(64):
        d = float(chosen[i]) - float(rejected[i])
        # -log sigmoid(d) = log(1 + e^-d), written so neither branch overflows
        want = math.log1p(math.exp(-d)) if d >= 0 else -d + math.log1p(math.exp(d))
        dd = -1.0 / (1.0 + math.exp(d)) if d > -700 else -1.0  # d/dchosen = -sigmoid(-d)
        got = float(bradley_terry_loss(chosen[i:i + 1].double(), rejected[i:i + 1].double()))
        assert got == pytest.approx(want, rel=1e-9, abs=1e-300), i
        assert float(c.grad[i]) == pytest.approx(dd, rel=1e-6, abs=1e-30), i
        assert float(r.grad[i]) == pytest.approx(-dd, rel=1e-6, abs=1e-30), i
    # a margin the chosen answer must clear: -log sigmoid(d - m) (TRL's RewardTrainer)
    margin = torch.rand(64, generator=g, dtype=torch.float64) * 4
    got = bradley_terry_loss(chosen.double(), rejected.double(), margin)
    assert torch.allclose(got, bradley_terry_loss(chosen.double() - margin, rejected.double()),
                          rtol=1e-12, atol=0)


def test_a_margin_column_trains_each_pair_to_its_margin(tmp_path):
    """Pairs' own 'margin' was dropped without a word (helper-72); it now enters the loss of
    its pair, in every micro-batch, and a margin on some rows only is refused."""
    from r1fast.train.reward_model import RewardModelTrainConfig, RewardModelTrainer, load_pairs

    init = save_init(str(tmp_path / "init"))
    pairs = sorted_digit_pairs(8, 0)
    plain = write_jsonl(tmp_path / "plain.jsonl", pairs)
    wide = write_jsonl(tmp_path / "wide.jsonl", [{**p, "margin": 2.0} for p in pairs])

    def first_loss(data, **parallel):
        t = RewardModelTrainer(RewardModelTrainConfig(
            init_from=init, data=data, steps=1, batch_size=8, out_dir=str(tmp_path / "o"),
            export_hf=False, overwrite=True, parallel=ParallelConfig(**parallel)))
        return t.step()

    base, margin = first_loss(plain), first_loss(wide, micro_batch_size=4)
    # the same scores: the step's loss is that of every pair's difference minus 2
    assert margin["margin"] == pytest.approx(base["margin"], rel=1e-5)
    assert margin["loss"] > base["loss"] + 0.5
    write_jsonl(tmp_path / "some.jsonl", [{**pairs[0], "margin": 1}, pairs[1]])
    with pytest.raises(ValueError, match=r"some.jsonl row 1 \(counting from 0\): key 'margin' "
                                         r"must be a finite number in every row"):
        load_pairs(tmp_path / "some.jsonl")
    assert "margin" not in load_pairs(plain)[0]  # no column, no key: resumes stay compatible


def _fixed_batch(n_pairs: int = 4, seed: int = 5):
    from r1fast.train.reward_model_io import encode_texts

    pairs = sorted_digit_pairs(n_pairs, seed)
    pairs[0]["chosen"] += " and that is all"  # rows of different lengths: padding is exercised
    texts = [p["prompt"] + p["chosen"] for p in pairs] + [p["prompt"] + p["rejected"]
                                                         for p in pairs]
    tokens, lengths, cut = encode_texts(CharTokenizer(), texts, MODEL.max_position_embeddings)
    assert cut == 0
    return pairs, tokens, lengths


def test_texts_over_max_length_keep_their_end_and_are_counted_and_warned(caplog):
    from r1fast.train.reward_model_io import PolicyRewardModel, encode_texts

    tok = CharTokenizer()
    tokens, lengths, cut = encode_texts(tok, ["abcdefgh", "ab"], 5)
    assert cut == 1 and lengths.tolist() == [5, 4]
    assert tokens[0].tolist() == tok.encode("abcdefgh", add_bos=True, add_eos=True)[-5:]

    class Stub(PolicyRewardModel):  # the scoring forward is not what this test is about
        def scores(self, tokens, lengths):
            return torch.zeros(tokens.shape[0])

    class Policy:
        model_cfg = MODEL

    scorer = Stub(Policy(), None, tok, 5)
    with caplog.at_level("WARNING", logger="r1fast.train"):
        scorer(["abcdefgh", "ab"])
        scorer(["abcdefghij"])
    warned = [r.getMessage() for r in caplog.records if "max_length=5" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("reward model: 1 of 2 texts are longer")
    assert scorer.texts_cut == 2


def _hf_reference(hf_dir, tokens, lengths):
    """(loss, scores [2P], grads by HF name) of the mean Bradley-Terry loss, transformers fp64."""
    from tests.helpers.hf_parity import per_expert

    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        hf_dir, experts_implementation="eager").double()  # grouped_mm has no fp64
    model.eval()
    mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
    scores = model(tokens, attention_mask=mask).logits[:, 0]  # [2P]
    chosen, rejected = scores.chunk(2)
    loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    loss.backward()
    grads = per_expert({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    return float(loss), scores.detach(), grads


def test_gradients_scores_and_folder_match_transformers_classifier(tmp_path):
    """One rank: the loss, every backbone gradient and the head's (megatron DDP main_grad) equal
    transformers' autograd through the exported sequence classifier in fp64; the saved folder
    loaded by path scores like transformers."""
    from r1fast.policy.hf_checkpoint import gather_hf_state_dict, load_model_config
    from r1fast.train.reward_model import RewardEngine, pair_loss_fn
    from r1fast.train.reward_model_io import export_sequence_classifier, load_reward_model

    init = save_reward_folder(str(tmp_path / "rm0"), save_init(str(tmp_path / "init")))
    engine = RewardEngine(load_model_config(init), ParallelConfig(), OptimConfig(lr=1e-3),
                          total_updates=1, seed=0, init_from=init)  # head from the folder
    hf_dir = export_sequence_classifier(init, tmp_path / "hf")
    pairs, tokens, lengths = _fixed_batch()
    want_loss, want_scores, want = _hf_reference(hf_dir, tokens, lengths)

    metrics = engine.policy.forward_backward([{"tokens": tokens, "lengths": lengths}],
                                             pair_loss_fn(engine, float(len(pairs))))
    mine = gather_hf_state_dict(engine.policy, grads=True)
    mine["score.weight"] = engine.head_weight.main_grad
    assert float(metrics[0]["loss"]) == pytest.approx(want_loss, rel=1e-5)
    assert not mine.pop("lm_head.weight").any()  # the LM head takes no part in the score
    assert set(mine) == set(want) and "score.weight" in want
    for k in want:
        scale = max(1.0, want[k].abs().max().item())
        assert (mine[k].double() - want[k]).abs().max().item() <= 1e-5 * scale, k
    assert want["score.weight"].abs().max() > 1e-2  # the comparison is not of zeros

    reward = load_reward_model(init)  # the folder, by path, through the reward interface
    got = reward.score_batch([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                             [{"prompt": p["prompt"]} for p in pairs] * 2)
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), want_scores, atol=1e-5)


def _parallel_worker(rank, out_dir, init, layout):
    """Scores, loss and gradients of the fixed batch at ``layout`` (the one-rank run, with an
    empty layout, first writes the reward-model folder both start from)."""
    from megatron.core import parallel_state as ps

    from r1fast.policy.hf_checkpoint import gather_hf_state_dict, load_model_config
    from r1fast.policy.optim import unshard_main_grads
    from r1fast.train.reward_model import RewardEngine, pair_loss_fn
    from r1fast.train.reward_model_io import PolicyRewardModel

    if not layout:
        save_reward_folder(init, save_init(os.path.join(out_dir, "init")))
    engine = RewardEngine(load_model_config(init), ParallelConfig(**layout),
                          OptimConfig(lr=1e-3), total_updates=1, seed=0, init_from=init)
    pairs, tokens, lengths = _fixed_batch()
    scores = PolicyRewardModel(engine.policy, engine.head_weight, CharTokenizer(), 64)(
        [p["prompt"] + p["chosen"] for p in pairs])
    metrics = engine.policy.forward_backward([{"tokens": tokens, "lengths": lengths}],
                                             pair_loss_fn(engine, float(len(pairs))))
    unshard_main_grads(engine.policy)
    grads = gather_hf_state_dict(engine.policy, grads=True)  # on global rank 0
    out = {"scores": scores}
    if engine.head_weight is not None and ps.get_tensor_model_parallel_rank() == 0:
        out["head_grad"] = engine.head_weight.main_grad.clone()
        out["loss"] = torch.tensor(float(metrics[0]["loss"]))
    if grads is not None:
        out["grads"] = grads
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    destroy_parallel()


@pytest.mark.slow  # three gloo processes start megatron: ~40 s on 2 cores
@pytest.mark.multiproc
@pytest.mark.parametrize("world, layout", [(2, {"tp": 2}), (2, {"pp": 2})], ids=["tp2", "pp2"])
def test_parallel_reward_model_equals_one_rank(tmp_path, world, layout):
    """TP2 (sequence-parallel MoE: the head reads gathered hidden states on both ranks) and PP2
    (the head on the last stage, scores broadcast): scores, loss, every gradient and the head's
    equal the one-rank run to 1e-5."""
    init = str(tmp_path / "rm")
    results = {}
    for name, (w, lay) in {"one": (1, {}), "many": (world, layout)}.items():
        os.makedirs(tmp_path / name)
        run_ranks(w, _parallel_worker, str(tmp_path / name), init, lay)
        ranks = [torch.load(tmp_path / name / f"rank{r}.pt", weights_only=True)
                 for r in range(w)]
        merged = {k: v for r in ranks for k, v in r.items()}
        for r in ranks:  # every rank receives every score
            assert torch.equal(r["scores"], ranks[0]["scores"])
        results[name] = merged
    one, many = results["one"], results["many"]
    assert torch.allclose(one["scores"], many["scores"], atol=1e-5, rtol=0)
    assert abs(float(one["loss"]) - float(many["loss"])) <= 1e-5
    assert torch.allclose(one["head_grad"], many["head_grad"], atol=1e-5, rtol=0)
    assert one["grads"].keys() == many["grads"].keys()
    worst = max((one["grads"][k] - many["grads"][k]).abs().max().item() for k in one["grads"])
    assert worst <= 1e-5, worst
    assert one["head_grad"].abs().max() > 1e-2


def _sync_worker(rank, out_dir, rm, layout, counts):
    from r1fast.train.batch import all_ranks_int
    from r1fast.train.reward_model_io import load_reward_model

    if not layout:
        save_reward_folder(rm, save_init(os.path.join(out_dir, "init")))
    reward = load_reward_model(rm, ParallelConfig(**layout), batch_size=2,
                               sync=lambda n: all_ranks_int(n, "max"))
    texts = [f"text number {i}" for i in range(counts[rank])]
    scores = reward.score_batch(texts, [{"prompt": "p: "}] * len(texts))
    torch.save(torch.tensor(scores), os.path.join(out_dir, f"rank{rank}.pt"))
    destroy_parallel()


@pytest.mark.slow  # two gloo launches of megatron
@pytest.mark.multiproc
def test_ranks_with_fewer_texts_keep_the_expert_all_to_all_in_step(tmp_path):
    """EP2 (the expert all-to-all spans both ranks): rank 0 scores 3 texts (2 batches), rank 1
    none; rank 1 makes idle calls, nothing hangs, and rank 0's scores are the one-rank ones."""
    rm = str(tmp_path / "rm")
    run_ranks(1, _sync_worker, str(tmp_path), rm, {}, [3])
    one = torch.load(tmp_path / "rank0.pt", weights_only=True)
    os.makedirs(tmp_path / "ep2")
    run_ranks(2, _sync_worker, str(tmp_path / "ep2"), rm, {"ep": 2}, [3, 0])
    many = [torch.load(tmp_path / "ep2" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert many[1].numel() == 0 and one.numel() == 3
    assert torch.allclose(one, many[0], atol=1e-5, rtol=0)


FROM_0 = r"row 1 \(counting from 0\): "


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "a"},
     FROM_0 + r"key 'rejected' must be a non-empty string, got None"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"},
     FROM_0 + r"key 'prompt' must be a string"),
    ({"prompt": "p", "chosen": " ", "rejected": "b"},
     FROM_0 + r"key 'chosen' must be a non-empty"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"},
     FROM_0 + r"'chosen' and 'rejected' are the"),
])
def test_bad_pair_rows_are_one_line_errors_naming_file_row_and_key(tmp_path, row, message):
    from r1fast.train.reward_model import load_pairs

    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "", "chosen": "x", "rejected": "y"},
                                                 row])
    with pytest.raises(ValueError, match=f"pairs.jsonl {message}") as e:
        load_pairs(path)
    assert "\n" not in str(e.value)


def test_stage_cli_learns_a_held_out_preference(tmp_path):
    """`r1fast stage reward-model` on 512 generated pairs (seed 0; sorted digits preferred to
    the same digits unsorted, so no bag of characters separates them), 200 held-out pairs
    (seed 1): held-out accuracy goes from below chance to >= 0.9 in 60 steps."""
    from r1fast.pipeline.cli import main

    init = save_init(str(tmp_path / "init"))
    train = write_jsonl(tmp_path / "train.jsonl", sorted_digit_pairs(512, 0))
    test = write_jsonl(tmp_path / "test.jsonl", sorted_digit_pairs(200, 1))
    out = tmp_path / "rm"
    assert main(["reward-model", "--init", init, "--data", train, "--test", test, "--out",
                 str(out), "--steps", "60", "--lr", "3e-3", "--batch-size", "32"]) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert summary["test_pairs"] == 200 and summary["train_pairs"] == 512
    assert summary["heldout_accuracy"] >= 0.9, summary
    assert summary["heldout_accuracy"] > summary["heldout_accuracy_before"] + 0.2, summary
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 60
    assert sum(r["loss"] for r in rows[-10:]) < 0.5 * sum(r["loss"] for r in rows[:10])
    meta = json.loads((out / "model" / "reward_model.json").read_text())
    assert meta["heldout_accuracy"] == summary["heldout_accuracy"]
    # 200 pairs: the standard error of a ~0.95 accuracy is ~0.015 (binomial sqrt(p(1-p)/n))
    p = summary["heldout_accuracy"]
    assert summary["heldout_accuracy_se"] == pytest.approx((p * (1 - p) / 199) ** 0.5, rel=0.05)
    assert meta["chat_template"] is False  # the character tokenizer has none
    assert (out / "hf" / "model.safetensors").is_file()
    # the scale of its scores, for GRPO's reward.reward_model_normalize: the 400 test texts'
    from r1fast.train.reward_model_io import load_reward_model

    assert meta["score_stats_from"] == "200 test pairs" and meta["score_std"] > 0
    pairs = read_jsonl(test)
    texts = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    examples = [{"prompt": p["prompt"]} for p in pairs] * 2
    raw = torch.tensor(load_reward_model(out / "model").score_batch(texts, examples),
                       dtype=torch.float64)
    assert meta["score_mean"] == pytest.approx(float(raw.mean()), abs=1e-5)
    assert meta["score_std"] == pytest.approx(float(raw.std()), rel=1e-4)
    standard = load_reward_model(out / "model", normalize=True).score_batch(texts, examples)
    assert standard == pytest.approx(((raw - meta["score_mean"]) / meta["score_std"]).tolist(),
                                     abs=1e-5)
    # a rerun into the folder resumes from its last checkpoint (step 60), so other optimizer
    # settings (the default lr) are refused rather than silently not applied
    with pytest.raises(ValueError, match="with other optimizer settings.*optim.lr"):
        main(["reward-model", "--init", init, "--data", train, "--out", str(out)])
    # --overwrite starts from step 0 (it resumed step 60 and trained nothing), the old run aside
    assert main(["reward-model", "--init", init, "--data", train, "--out", str(out),
                 "--steps", "2", "--overwrite", "--no-export"]) == 0
    assert len(read_jsonl(out / "metrics.jsonl")) == 2
    assert len(read_jsonl(next(out.glob("previous_*")) / "metrics.jsonl")) == 60


def test_a_stopped_run_resumes_bit_for_bit(tmp_path):
    """4 steps with a checkpoint every 2 == 2 steps, then a rerun to 4 into the same folder:
    the backbone, the head and the Adam moments come back from the distributed checkpoint and
    the pair order from its position, so the losses and the final weights and head are equal
    bit for bit, and the "before" accuracy is still the step-0 one."""
    from r1fast.train.reward_model import RewardModelTrainConfig, RewardModelTrainer

    init = save_init(str(tmp_path / "init"))
    train = write_jsonl(tmp_path / "train.jsonl", sorted_digit_pairs(48, 0))
    test = write_jsonl(tmp_path / "test.jsonl", sorted_digit_pairs(16, 1))

    def run(out: str, steps: int):
        cfg = RewardModelTrainConfig(init_from=init, data=train, test=test, steps=steps,
                                     out_dir=str(tmp_path / out), batch_size=8, save_every=2,
                                     optim=OptimConfig(lr=3e-3), export_hf=False)
        trainer = RewardModelTrainer(cfg)
        return trainer, trainer.fit()

    full, summary_full = run("full", 4)
    run("resumed", 2)
    from r1fast.train.export import export_checkpoint

    with pytest.raises(ValueError, match="is a reward-model checkpoint.*it resumes there"):
        export_checkpoint(tmp_path / "resumed", tmp_path / "exported")
    # the checkpoint holds the backbone and the head: a resume reads no initial weights
    # (it loaded them, then replaced them: minutes for a large model)
    (tmp_path / "init" / "model.safetensors").write_bytes(b"not weights")
    resumed, summary = run("resumed", 4)
    assert resumed.step_idx == 4 and summary["steps"] == 4
    assert summary["final_train_loss"] == summary_full["final_train_loss"]
    assert summary["heldout_accuracy_before"] == summary_full["heldout_accuracy_before"]
    assert summary["heldout_accuracy"] == summary_full["heldout_accuracy"]
    ours, theirs = full.policy.gpt.state_dict(), resumed.policy.gpt.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if isinstance(ours[k], torch.Tensor))
    assert torch.equal(full.engine.head_weight, resumed.engine.head_weight)
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl")
                   .read_text().splitlines()] for name in ("full", "resumed")}
    assert [r["step"] for r in rows["resumed"]] == [1, 2, 3, 4]
    for a, b in zip(rows["full"], rows["resumed"]):
        assert {k: a[k] for k in ("loss", "accuracy", "grad_norm")} == \
            {k: b[k] for k in ("loss", "accuracy", "grad_norm")}


def test_micro_batches_of_pairs_train_as_one_batch(tmp_path):
    """parallel.micro_batch_size was accepted and ignored (every rank's pairs ran as one
    micro-batch, so shrinking batch_size was the only memory lever), and packing too
    (helper-72). Micro-batches of whole pairs now give the one-batch step, and what cannot
    be honoured is refused."""
    from r1fast.train.reward_model import RewardModelTrainConfig, RewardModelTrainer

    init = save_init(str(tmp_path / "init"))
    train = write_jsonl(tmp_path / "train.jsonl", sorted_digit_pairs(24, 0))

    def config(out: str, **parallel):
        return RewardModelTrainConfig(init_from=init, data=train, steps=2, batch_size=8,
                                      out_dir=str(tmp_path / out), optim=OptimConfig(lr=3e-3),
                                      export_hf=False, parallel=ParallelConfig(**parallel))

    whole = RewardModelTrainer(config("whole"))
    split = RewardModelTrainer(config("split", micro_batch_size=4))  # 2 pairs each
    rows = [[t.step() for _ in range(2)] for t in (whole, split)]
    for a, b in zip(*rows):
        for k in ("loss", "accuracy", "margin", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k
    assert torch.allclose(whole.engine.head_weight, split.engine.head_weight, atol=1e-6)
    assert [len(t._micro_batches()[0]) for t in (whole, split)] == [1, 4]
    for bad, match in (({"micro_batch_size": 3}, "micro_batch_size must be even"),
                       ({"max_tokens_per_microbatch": 64}, "packing.*is not supported here")):
        with pytest.raises(ValueError, match=match):
            config("bad", **bad)
    with pytest.raises(ValueError, match=r"a rank's 8 pairs \(batch_size / dp\) must split into "
                                         r"micro-batches of parallel.micro_batch_size / 2 = 3"):
        RewardModelTrainer(config("bad", micro_batch_size=6))


def test_a_weights_only_load_restores_the_head(tmp_path):
    """``load_sharded`` without an optimizer (export, init) loads the extra parameters too."""
    from r1fast.policy.dist_ckpt import load_sharded, save_sharded
    from r1fast.policy.hf_checkpoint import load_model_config
    from r1fast.train.reward_model import RewardEngine

    init = save_init(str(tmp_path / "init"))
    engine = RewardEngine(load_model_config(init), ParallelConfig(), OptimConfig(lr=1e-3),
                          total_updates=1, seed=0, init_from=init)
    extra = engine.extra_params()
    head = engine.head_weight.detach().clone()
    save_sharded(engine.policy, None, tmp_path / "ckpt", extra)
    with torch.no_grad():
        engine.head_weight.zero_()
    load_sharded(engine.policy, None, tmp_path / "ckpt", extra)
    assert torch.equal(engine.head_weight, head) and head.abs().max() > 0


def test_pair_prompts_are_rendered_as_grpo_renders_its_prompts(tmp_path, caplog):
    """A reward model scores, in GRPO, the chat-rendered prompt + the answer: it trains on the
    same texts (empty prompts stay empty), and a run whose prompts are rendered otherwise
    gives the reward model its prompts rendered as they were in its training."""
    import logging

    from r1fast.data.hf_tokenizer import HFTokenizer
    from r1fast.data.tiny_hf import build_tokenizer
    from r1fast.train.config import load_train_config
    from r1fast.train.reward_model import render_pair_prompts
    from r1fast.train.reward_model_io import FORMAT, META_FILE
    from r1fast.train.run_reward_model import model_reward
    from r1fast.train.task import render_prompt

    build_tokenizer(tmp_path / "tok", ["Write a poem. assistant user system"] * 20)
    hf = HFTokenizer.load(tmp_path / "tok")
    pairs = [{"prompt": "Write a poem.", "chosen": "Roses", "rejected": "No"},
             {"prompt": "", "chosen": "a", "rejected": "b"}]
    out = render_pair_prompts(pairs, hf)
    assert out[0]["prompt"] == hf.apply_chat_template([{"role": "user",
                                                         "content": "Write a poem."}])
    assert out[1] == pairs[1] and out[0]["chosen"] == "Roses"
    # a template that opens the thought: GRPO scores 'prompt<think>\n' + 'thought</think> ...',
    # so a pair's own leading <think> goes (it trained on '<think>\n<think>thought...')
    hf.tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                            "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                            "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n"
                            "{% endif %}")
    thought = render_pair_prompts([{"prompt": "Write a poem.",
                                    "chosen": "<think>rhyme</think> Roses",
                                    "rejected": "<think>\nnone</think> No"}], hf)[0]
    assert thought["prompt"].endswith("<think>\n")
    assert (thought["chosen"], thought["rejected"]) == ("rhyme</think> Roses", "none</think> No")
    with caplog.at_level(logging.WARNING, logger="r1fast.train"):
        bare = render_pair_prompts([{"prompt": "Write a poem.", "chosen": "Roses",
                                     "rejected": "<think>x</think> No"}], hf)[0]
    assert bare["chosen"] == "\n</think>\n\nRoses" and bare["rejected"] == "x</think> No"
    assert "1 answers of 1 preference pairs have no thought" in caplog.text
    caplog.clear()

    class Stop(Exception):
        pass

    # GRPO gave the reward model the policy's prompt: another tokenizer's markup and a system
    # turn reward-model training never renders, without a word (helper-72). It now reads the
    # prompt as it was trained to: its own template, the user turn alone, then the thought the
    # policy's prompt opened (the completion continues it)
    rm = tmp_path / "rm"
    build_tokenizer(rm, ["Write a poem. assistant user system"] * 20)  # ChatML, as trained
    (rm / META_FILE).write_text(json.dumps({"format": FORMAT, "chat_template": True}))
    hf.tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                            "{% endfor %}{% if add_generation_prompt %}[assistant] <think>\n"
                            "{% endif %}")  # the policy's: another markup, opening the thought
    cfg = load_train_config(None, [f"--reward.reward_model={rm}", "--data.template={question}",
                                   "--data.system_prompt=Be terse."])
    ex = {"id": 0, "question": "Write a poem.", "reward": "reward_model"}  # a row it scores
    ex["prompt"] = render_prompt(ex, hf, cfg.data)
    assert ex["prompt"] == "[system] Be terse.\n[user] Write a poem.\n[assistant] <think>\n"
    with caplog.at_level(logging.INFO, logger="r1fast.train"), \
            pytest.MonkeyPatch.context() as mp:
        mp.setattr("r1fast.train.reward_model_io.load_reward_model",
                   lambda *a, **k: (_ for _ in ()).throw(Stop()))
        with pytest.raises(Stop):
            model_reward(cfg, [ex])
    as_trained = HFTokenizer.load(rm).apply_chat_template([{"role": "user",
                                                            "content": "Write a poem."}])
    assert ex["rm_prompt"] == as_trained + "<think>\n"
    assert (f"1 of 1 prompts go to reward.reward_model={rm} as it was trained to read them (its "
            f"tokenizer's chat template; without data.system_prompt)") in caplog.text
    # a reward model trained without a template reads the user turn's text, as its training
    # did: a conversation (a system turn here) was refused at start-up (helper-73)
    (rm / META_FILE).write_text(json.dumps({"format": FORMAT, "chat_template": False}))
    conv = {"id": 1, "question": "Write a poem.", "reward": "reward_model", "messages": [
        {"role": "system", "content": "Rhyme."}, {"role": "user", "content": "Write a poem."}]}
    conv["prompt"] = render_prompt(conv, hf, cfg.data)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("r1fast.train.reward_model_io.load_reward_model",
                   lambda *a, **k: (_ for _ in ()).throw(Stop()))
        with pytest.raises(Stop):
            model_reward(cfg, [conv])
    assert conv["rm_prompt"] == "Write a poem.<think>\n"


def test_the_export_tokenizer_ends_texts_with_the_eos_the_head_reads(tmp_path):
    """transformers' classifier scores the last non-pad token; r1fast's head reads the eos it
    appends. The exported tokenizer appends it too, so AutoTokenizer(text) gives r1fast's ids."""
    from transformers import AutoTokenizer

    from r1fast.data.hf_tokenizer import HFTokenizer
    from r1fast.data.tiny_hf import build_tokenizer
    from r1fast.train.reward_model_io import tokenizer_appends_eos

    build_tokenizer(tmp_path, ["Write a poem. assistant user system Roses"] * 20)
    hf = HFTokenizer.load(tmp_path)
    texts = ["Write a poem. Roses", hf.apply_chat_template([{"role": "user", "content": "Hi"}])]
    assert AutoTokenizer.from_pretrained(tmp_path)(texts[0])["input_ids"][-1] != hf.eos_id
    tokenizer_appends_eos(tmp_path)
    exported = AutoTokenizer.from_pretrained(tmp_path)
    again = HFTokenizer.load(tmp_path)  # r1fast reading the export encodes as before
    for text in texts:
        want = hf.encode(text, add_bos=True, add_eos=True)
        assert exported(text)["input_ids"] == want
        assert again.encode(text, add_bos=True, add_eos=True) == want
    tokenizer_appends_eos(tmp_path)  # already ends with the eos: unchanged, not twice
    assert AutoTokenizer.from_pretrained(tmp_path)(texts[0])["input_ids"] == \
        hf.encode(texts[0], add_bos=True, add_eos=True)
