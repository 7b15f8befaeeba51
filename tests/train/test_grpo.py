"""The GRPO trainer on a tiny MoE policy (CPU, megatron-core under gloo)."""
import json
import os
import shutil

import pytest
import torch

from r1fast.ops._dispatch import triton_missing
from r1fast.train.batch import build_update_batch
from r1fast.train.config import load_train_config
from r1fast.train.metrics import read_jsonl
from r1fast.train.policy_io import model_state
from tests.helpers.spawn import run_ranks

BASE = ["--model.vocab_size=128", "--data.prompts_per_step=2", "--algo.group_size=4",
        "--rollout.max_new_tokens=6", "--reward.workers=0", "--run.progress=false",
        "--run.tensorboard=false", "--data.num_train=64"]


def make_cfg(tmp, *extra):
    return load_train_config(None, [*BASE, f"--run.out_dir={tmp}", *extra])


def varied_reward(completion: str, example: dict) -> float:
    """A rule reward that differs within groups from the first step (a random tiny policy
    never solves the task), so the policy-gradient term is exercised."""
    return (sum(map(ord, completion)) % 7) / 6.0


def test_one_update_lowers_the_loss_on_a_fixed_batch(tmp_path):
    from r1fast.train.grpo import GRPOTrainer

    cfg = make_cfg(tmp_path, "--optim.lr=0.01", "--optim.clip_grad=0.0", "--algo.kl_coef=0.01")
    tr = GRPOTrainer(cfg)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 100, (5,), generator=g).tolist() for _ in range(8)]
    comps = [torch.randint(3, 100, (4,), generator=g).tolist() for _ in range(8)]
    adv = torch.tensor([1.0, -1.0] * 4)
    batch = build_update_batch(prompts, comps, [[0.0] * 4] * 8, adv, torch.ones(8, dtype=torch.bool),
                               pad_id=0)
    with torch.no_grad():
        old = tr.policy.logprobs(batch.tokens, batch.targets)
        ref = tr.reference.logprobs(batch.tokens, batch.targets)

    def loss_now():
        mb = [{"tokens": batch.tokens, "targets": batch.targets, "mask": batch.mask,
               "adv": batch.advantages, "old": old, "rollout": batch.rollout_logp, "ref": ref}]
        out = tr.policy.forward_backward(mb, tr._loss_fn(tr._global_normalizer(batch)[0]))
        return float(out[0]["loss"])

    before = loss_now()
    metrics = tr._update(batch, old, ref)
    after = loss_now()
    assert metrics["grad_norm"] > 0
    assert after < before - 1e-3, (before, after)


@pytest.mark.parametrize("layout", [[], ["--parallel.max_tokens_per_microbatch=256"]],
                         ids=["padded", "packed"])
def test_fit_writes_metrics_and_resume_is_bitwise(tmp_path, layout):
    from r1fast.train.grpo import GRPOTrainer

    trainers = {}

    def run(folder, steps, *extra):
        trainers[folder] = GRPOTrainer(make_cfg(tmp_path / folder, f"--run.steps={steps}",
                                                "--optim.lr=0.003", *layout, *extra),
                                       reward=varied_reward)
        return trainers[folder].fit()

    full = run("full", 4, "--run.save_every=2")
    assert len(full) == 4 and full[0]["reward_std"] > 0
    first = run("resumed", 2)
    rest = run("resumed", 4)
    # the weights too, not only the logged numbers
    ours, theirs = (model_state(trainers[f].policy) for f in ("full", "resumed"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert [r["step"] for r in rest] == [3, 4]
    skip = {"time", "tokens_per_s", "time_generation_s", "time_rewards_s", "time_logprobs_s",
            "time_update_s", "time_fwd_bwd_s", "time_optimizer_s"}
    for a, b in zip(full[2:], rest):
        assert {k: v for k, v in a.items() if k not in skip} == \
            {k: v for k, v in b.items() if k not in skip}
    for a, b in zip(full[:2], first):
        assert a["loss"] == b["loss"] and a["reward_mean"] == b["reward_mean"]
    # the per-expert load of every step, once each also after the resume
    loads = read_jsonl(tmp_path / "resumed" / "expert_load.jsonl")
    assert [r["step"] for r in loads] == [1, 2, 3, 4]
    for row, metrics in zip(loads, full):
        counts = row["tokens_per_expert"]
        assert sorted(counts) == ["0", "1"] and all(sum(c) > 0 for c in counts.values())
        worst = max(max(c) * len(c) / sum(c) for c in counts.values())
        assert metrics["moe/load_imbalance_max"] == pytest.approx(worst)
    rows = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    for key in ("reward_mean", "reward_std", "response_length", "clip_frac", "kl",
                "entropy", "grad_norm", "tokens_per_s", "logp_mismatch"):
        assert key in rows[-1], key


# ----------------------------------------------------------------------------- multi-rank

def _worker(rank, out_dir, extra):
    from r1fast.train.grpo import GRPOTrainer

    rows = GRPOTrainer(make_cfg(out_dir, *extra), reward=varied_reward).fit()
    if rank == 0:
        with open(os.path.join(out_dir, "rows.json"), "w") as f:
            json.dump(rows, f)


def _save_init(rank, out_dir):
    """Write a Hugging Face checkpoint both layouts start from (random init differs by layout:
    each EP rank draws its experts from the same seed)."""
    from r1fast.policy import build_policy, save_hf_checkpoint

    cfg = make_cfg(out_dir, "--model.aux_loss_coef=0.0")
    save_hf_checkpoint(build_policy(cfg.model, cfg.parallel, trainable=False), str(out_dir))


def _run(world, out_dir, extra):
    run_ranks(world, _worker, str(out_dir), extra)
    with open(os.path.join(out_dir, "rows.json")) as f:
        return json.load(f)


@pytest.mark.multiproc
@pytest.mark.parametrize("world, layout, packed", [
    # the padded layouts are slow: the packed ones run the same layouts (plus packing and DP
    # balancing) in the default suite, and padded micro-batches are tested at one rank
    pytest.param(4, ["--parallel.tp=2", "--parallel.ep=2"], False,  # TP2 x EP2 (x DP2 dense)
                 marks=pytest.mark.slow),
    pytest.param(2, ["--parallel.pp=2"], False,  # PP2: generation recomputes the prefix
                 marks=pytest.mark.slow),
    (4, ["--parallel.tp=2", "--parallel.ep=2"], True),  # packed micro-batches under a budget
    (2, ["--parallel.pp=2"], True),
], ids=["tp2xep2", "pp2", "tp2xep2-packed", "pp2-packed"])
def test_parallel_steps_equal_one_rank(tmp_path, world, layout, packed):
    # the load-balancing loss is computed per rank's tokens (megatron's micro-batch form), a
    # different objective under DP, so it is off for this equality
    init = tmp_path / "init"
    run_ranks(1, _save_init, str(init))
    extra = ["--run.steps=2", "--optim.lr=0.003", "--algo.kl_coef=0.01",
             "--model.aux_loss_coef=0.0", f"--run.init_from={init}",
             *(["--parallel.max_tokens_per_microbatch=256"] if packed else []),  # ~2 rows each
             "--data.num_test=3", "--data.eval_k=3"]  # 9 samples: DP2 replicas share 5 + 4
    if packed and world == 4:  # DP2 with two optimizer steps per step: each trains on the
        # rows of the one-rank run's mini-batch (they came from each rank's own slice)
        extra += ["--algo.mini_batches=2", "--data.prompts_per_step=4"]
    one = _run(1, tmp_path / "one", extra)
    four = _run(world, tmp_path / "many", [*extra, *layout])
    (ev_one,), (ev_many,) = (read_jsonl(tmp_path / d / "eval.jsonl") for d in ("one", "many"))
    assert ev_many["num_samples"] == ev_one["num_samples"] == 9  # one row, every sample
    for a, b in zip(one, four):
        assert a["reward_std"] > 0  # the policy gradient is not trivially zero
        if packed and world == 4:  # DP2: rows balanced over the DP ranks (r1fast.train.balance)
            assert b["dp_token_imbalance_after"] <= b["dp_token_imbalance_before"], b
            assert b["dp_balance_rows_sent"] >= 0 and b["dp_balance_bytes_sent"] >= 0, b
        for key in ("reward_mean", "response_length", "loss", "grad_norm", "kl", "entropy",
                    "clip_frac", "logp_mismatch"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])


def test_router_replay_and_dynamic_sampling_run(tmp_path):
    from r1fast.train.grpo import GRPOTrainer

    rows = GRPOTrainer(make_cfg(tmp_path, "--run.steps=2", "--algo.router_replay=true",
                                "--algo.dynamic_sampling=true",
                                "--algo.ppo_epochs=2", "--algo.mini_batches=2"),
                       reward=varied_reward).fit()
    assert len(rows) == 2
    # on-policy first mini-batch with replayed routing: the ratio is exactly 1 at the start
    assert rows[0]["ratio_min"] <= 1.0 <= rows[0]["ratio_max"]
    assert 0.0 <= rows[0]["kept_frac"] <= 1.0


@pytest.mark.parametrize("capture", ["rollout", "posthoc"])
def test_replay_capture_and_recompute_decoder_are_config_switches(tmp_path, caplog, capture,
                                                                  monkeypatch):
    """[algo] router_replay_capture and [rollout] decoder reach the trainer: the recompute
    decoder samples the same completions as the KV cache (it is the slow reference) and says
    so loudly; either capture trains. [rollout] prefill_tokens reaches the decoder, and a
    prefill in slices (its routing recorded for replay) trains the same step."""
    import logging

    import r1fast.train.grpo as grpo_mod
    from r1fast.train.grpo import GRPOTrainer

    made = []
    real_make = grpo_mod.make_decoder
    monkeypatch.setattr(grpo_mod, "make_decoder",
                        lambda policy, **kw: made.append(kw) or real_make(policy, **kw))

    def run(name, *extra):
        return GRPOTrainer(make_cfg(tmp_path / name, "--run.steps=1", "--algo.router_replay=true",
                                    f"--algo.router_replay_capture={capture}", *extra),
                           reward=varied_reward).fit()

    kv = run("kv")
    if capture == "rollout":  # the recompute decoder cannot record while decoding: said early
        sliced = run("sliced", "--rollout.prefill_tokens=8")
        assert made[-1]["prefill_tokens"] == 8
        assert kv[0]["response_length"] == sliced[0]["response_length"]
        assert abs(kv[0]["loss"] - sliced[0]["loss"]) <= 1e-5 * max(1.0, abs(kv[0]["loss"]))
        with pytest.raises(ValueError, match="router_replay_capture='posthoc'"):
            run("slow", "--rollout.decoder=recompute")
        return
    with caplog.at_level(logging.WARNING, logger="r1fast"):
        slow = run("slow", "--rollout.decoder=recompute")
    assert "PREFIX RECOMPUTATION" in caplog.text
    assert kv[0]["response_length"] == slow[0]["response_length"]
    assert abs(kv[0]["loss"] - slow[0]["loss"]) <= 1e-5 * max(1.0, abs(kv[0]["loss"]))
    with pytest.raises(ValueError, match="rollout.decoder"):
        make_cfg(tmp_path / "bad", "--rollout.decoder=fast")


def test_fused_and_full_logits_updates_agree(tmp_path):
    """use_fused_kernels=false (full logits, plain loss) is the same objective as the fused op."""
    from r1fast.train.grpo import GRPOTrainer

    def run(name, *extra):
        return GRPOTrainer(make_cfg(tmp_path / name, "--run.steps=2", "--algo.kl_coef=0.01",
                                    *extra), reward=varied_reward).fit()

    for a, b in zip(run("fused"), run("full", "--algo.use_fused_kernels=false")):
        for key in ("loss", "grad_norm", "entropy", "kl", "reward_mean"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])


def test_logprob_heads_give_the_same_updates(tmp_path, monkeypatch):
    """algo.logprob_head picks an arrangement of the LM head's GEMMs, not another objective:
    Triton's fused tiles, cuBLAS tiles and the in-forward gradient (kernel_impl="triton", under
    the interpreter here) match the torch path step for step, updates included."""
    from r1fast import ops
    from r1fast.train.grpo import GRPOTrainer

    op, seen = ops.fused_linear_policy_loss, []

    def spy(*args, **kw):
        seen.append((kw["impl"], kw["tiles"], kw["grad_in_forward"]))
        return op(*args, **kw)

    monkeypatch.setattr(ops, "fused_linear_policy_loss", spy)

    def run(name, *extra):  # one step: its metrics, and the weights its update left
        tr = GRPOTrainer(make_cfg(tmp_path / name, "--run.steps=1", "--algo.kl_coef=0.01",
                                  *extra), reward=varied_reward)
        rows = tr.fit()
        return rows, {k: v.detach().clone() for k, v in tr.policy.gpt.state_dict().items()
                      if isinstance(v, torch.Tensor)}

    base, weights = run("torch")
    assert set(seen) == {("auto", None, False)}
    for head, used in (("fused", ("triton", None, False)), ("gemm", ("triton", "gemm", False)),
                       ("grad-in-forward", ("triton", None, True))):
        seen.clear()
        rows, after = run(head, "--algo.kernel_impl=triton", f"--algo.logprob_head={head}")
        assert set(seen) == {used}, (head, set(seen))
        for a, b in zip(base, rows, strict=True):
            for key in ("loss", "grad_norm", "entropy", "kl", "reward_mean"):
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), \
                    (head, key, a[key], b[key])
        moved = max((after[k] - weights[k]).abs().max().item() for k in weights)
        assert moved <= 1e-6, (head, moved)  # the update itself, not only its loss


@pytest.mark.parametrize("overrides, match", [
    (["--algo.use_fused_kernels=false", "--algo.logprob_head=gemm"],
     r"algo.logprob_head='gemm' is a choice of the fused op"),
    (["--algo.use_fused_kernels=false", "--algo.kernel_impl=triton"],
     r"algo.kernel_impl='triton' is a choice of the fused op"),
    (["--algo.loss=gspo", "--algo.logprob_head=grad-in-forward"],
     r"algo.logprob_head=\"grad-in-forward\" needs a token-level algo.loss .* got 'gspo'"),
])
def test_logprob_head_refuses_what_would_not_run(overrides, match):
    from r1fast.typed_toml import ConfigError

    with pytest.raises(ConfigError, match=match) as e:
        load_train_config(None, overrides)
    assert "\n" not in str(e.value)


def test_logprob_head_off_triton_stops_before_the_model(tmp_path, monkeypatch):
    """On a CPU, kernel_impl="auto" is torch, which has no cuBLAS-tile arrangement: the trainer
    refuses at once (no model is built) instead of failing at the first loss."""
    from r1fast.train import grpo

    def no_engine(*a, **k):
        raise AssertionError("the model was built before the refusal")

    monkeypatch.setattr(grpo, "TrainEngine", no_engine)
    cfg = make_cfg(tmp_path, "--algo.logprob_head=grad-in-forward")
    with pytest.raises(ValueError, match=r"algo.logprob_head='grad-in-forward' runs on Triton, "
                                         r"but algo.kernel_impl='auto' resolves to 'torch'"):
        grpo.GRPOTrainer(cfg, reward=varied_reward)


@pytest.mark.slow  # ~4.5 min here: the interpreter runs every MoE layer of every forward
@pytest.mark.skipif(triton_missing(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
                    is not None, reason="the grouped expert kernels need Triton")
def test_grouped_experts_train_the_loops_steps(tmp_path):
    """[parallel] experts = "grouped" reaches the trainer: its forwards and backwards run the
    grouped kernels (policy and reference) and two GRPO steps give the loop's metrics (fp32,
    to rounding). The default suite checks one MoE layer (tests/policy/test_local_experts.py)."""
    from r1fast.policy.local_experts import LeanSequentialMLP
    from r1fast.train.grpo import GRPOTrainer

    rows = {}
    for mode in ("sequential", "grouped"):
        trainer = GRPOTrainer(make_cfg(tmp_path / mode, "--run.steps=2", "--optim.lr=0.003",
                                       "--algo.kl_coef=0.01", f"--parallel.experts={mode}"),
                              reward=varied_reward)
        experts = [m for m in trainer.policy.gpt.modules() if isinstance(m, LeanSequentialMLP)]
        assert experts and all(e.grouped_impl == (None if mode == "sequential" else "triton")
                               for e in experts)
        rows[mode] = trainer.fit()
    for a, b in zip(rows["sequential"], rows["grouped"]):
        assert a["reward_std"] > 0
        for key in ("reward_mean", "loss", "grad_norm", "kl", "entropy", "logp_mismatch"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])


def test_sampled_logprobs_weigh_a_truncated_sampler(tmp_path, caplog):
    """rollout.logprobs='sampled' records the truncated distribution's log-probs: the same
    completions as 'full', a positive logp_mismatch (old log-probs are of the full policy) and
    TIS weights pi/mu < 1; the untruncated-loss bias of 'full' is a WARNING."""
    import logging

    from r1fast.train.grpo import GRPOTrainer

    def run(name, *extra):
        with caplog.at_level(logging.WARNING, logger="r1fast"):
            caplog.clear()
            rows = GRPOTrainer(make_cfg(tmp_path / name, "--run.steps=1", "--rollout.top_k=8",
                                        "--algo.tis_cap=2.0", *extra),
                               reward=varied_reward).fit()
            return rows[0], caplog.text

    full, full_log = run("full")
    sampled, sampled_log = run("sampled", "--rollout.logprobs=sampled")
    assert "rollout.top_k=8: completions are drawn from a truncated" in full_log
    assert "truncated distribution" not in sampled_log
    assert full["response_length"] == sampled["response_length"]
    assert full["logp_mismatch"] < 1e-4 < sampled["logp_mismatch"]
    assert abs(full["tis_mean"] - 1.0) < 1e-4
    assert 0.0 < sampled["tis_mean"] < 1.0 - 1e-3


def test_synthetic_task_evaluates_its_held_out_split(tmp_path):
    """data.num_test used to be read and never used: a synthetic run now evaluates that many
    problems of the task's test split (none of them a training problem) at the end."""
    from r1fast.train.grpo import GRPOTrainer
    from r1fast.train.task import held_out_examples

    cfg = make_cfg(tmp_path, "--run.steps=1", "--data.num_test=3", "--data.eval_k=2")
    tr = GRPOTrainer(cfg)
    source, held_out = held_out_examples(cfg, tr.task.tokenizer)
    train_ids = {ex["id"] for ex in tr.task.dataset.examples}
    assert source == "arithmetic:test" and len(held_out) == 3
    assert all(ex["split"] == "test" and ex["id"] not in train_ids for ex in held_out)
    tr.fit()
    (ev,) = read_jsonl(tmp_path / "eval.jsonl")
    assert (ev["step"], ev["held_out"], ev["num_problems"], ev["k"]) == (1, "arithmetic:test", 3, 2)
    # a rerun of the finished run has nothing to do: no second evaluation row
    assert GRPOTrainer(cfg).fit() == [] and len(read_jsonl(tmp_path / "eval.jsonl")) == 1
    # the default asks for no evaluation; num_test with a dataset names what to use instead
    assert held_out_examples(make_cfg(tmp_path), tr.task.tokenizer) is None
    with pytest.raises(ValueError, match=r"data.eval_every must be >= 0 \(0: only at the end\)"):
        make_cfg(tmp_path, "--data.eval_every=-1")
    with pytest.raises(ValueError, match=r"data.num_test=3 counts held-out problems of the "
                                         r"synthetic data.task, but data.path is set"):
        make_cfg(tmp_path, "--data.path=x.jsonl", "--data.num_test=3")


def test_a_step_that_keeps_no_completion_takes_no_optimizer_step(tmp_path, caplog):
    """dynamic_sampling drops every group of a constant reward: such a step used to step the
    optimizer anyway (Adam moments, weight decay and the LR schedule moved the weights)."""
    from r1fast.train.grpo import GRPOTrainer

    tr = GRPOTrainer(make_cfg(tmp_path, "--run.steps=1", "--algo.dynamic_sampling=true",
                              "--algo.overlong_filter=true", "--algo.mini_batches=2",
                              "--optim.weight_decay=0.1"),
                     reward=lambda completion, example: 1.0)
    before = {k: v.detach().clone() for k, v in tr.policy.gpt.state_dict().items()
              if isinstance(v, torch.Tensor)}
    lr_steps = tr.engine.scheduler.num_steps
    with caplog.at_level("WARNING", logger="r1fast.train"):
        (row,) = tr.fit()
    assert row["kept_frac"] == 0 and row["updates_skipped"] == 2 and row["grad_norm"] == 0
    assert "2 of 2 optimizer steps skipped" in caplog.text
    assert tr.engine.scheduler.num_steps == lr_steps
    after = tr.policy.gpt.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # a step with signal skips nothing
    (row,) = GRPOTrainer(make_cfg(tmp_path / "varied", "--run.steps=1",
                                  "--algo.dynamic_sampling=true", "--optim.weight_decay=0.1"),
                         reward=varied_reward).fit()
    assert row["updates_skipped"] == 0 and row["grad_norm"] > 0


def test_reported_loss_is_the_mean_of_the_updates_that_ran_and_no_kl_without_reference(
        tmp_path):
    """The step's loss divided by every planned update, skipped ones included (half the one
    update's loss with one of two skipped); with kl_coef = 0 there is no reference and the
    row said kl = 0.0 while the policy drifted."""
    import copy

    from r1fast.train.grpo import GRPOTrainer

    teaching: set[str] = set()
    tr = GRPOTrainer(make_cfg(tmp_path, "--run.steps=1", "--algo.dynamic_sampling=true",
                              "--algo.mini_batches=2", "--algo.kl_coef=0"),
                     reward=lambda c, ex: varied_reward(c, ex) if ex["prompt"] in teaching
                     else 0.0)
    first, second = copy.deepcopy(tr.task.dataset).next_batch()
    teaching.add(first["prompt"])  # mini-batch 0 (group 0) teaches, mini-batch 1 is skipped
    assert second["prompt"] not in teaching
    losses, update = [], tr.engine.update

    def spy(micro, loss_fn):
        out = update(micro, loss_fn)
        losses.append(sum(float(m["loss"]) for m in out.metrics))
        return out
    tr.engine.update = spy
    (row,) = tr.fit()
    assert row["updates_skipped"] == 1 and len(losses) == 1 and losses[0] != 0
    assert row["loss"] == pytest.approx(losses[0], rel=1e-6)
    assert tr.reference is None and "kl" not in row and "clip_frac" in row


def half_the_prompts_teach(completion: str, example: dict) -> float:
    """varied_reward on about half the prompts (by a stable hash of the prompt), 0 on the
    others: their groups carry no signal."""
    import zlib

    return varied_reward(completion, example) if zlib.crc32(example["prompt"].encode()) % 2 \
        else 0.0


def test_dynamic_sampling_refills_the_batch_with_groups_that_teach(tmp_path):
    """DAPO's refill: further rounds of prompts until every group of the batch has signal; each
    round advances the data, and a resume takes up the same rounds."""
    from r1fast.train.grpo import GRPOTrainer

    def run(folder, steps):
        tr = GRPOTrainer(make_cfg(tmp_path / folder, f"--run.steps={steps}",
                                  "--algo.dynamic_sampling=true", "--algo.max_sampling_rounds=8"),
                         reward=half_the_prompts_teach)
        return tr, tr.fit()

    tr, rows = run("whole", 3)
    assert [r["kept_frac"] for r in rows] == [1.0] * 3
    assert any(r["sampling_rounds"] > 1 for r in rows)
    assert tr.task.dataset.state_dict()["position"] == 2 * sum(r["sampling_rounds"] for r in rows)
    one_round = GRPOTrainer(make_cfg(tmp_path / "one", "--run.steps=3",
                                     "--algo.dynamic_sampling=true"),
                            reward=half_the_prompts_teach).fit()
    assert [r["sampling_rounds"] for r in one_round] == [1] * 3
    assert min(r["kept_frac"] for r in one_round) < 1.0  # what the refill replaced
    run("resumed", 1)
    _, rest = run("resumed", 3)
    for a, b in zip(rows[1:], rest):
        assert (a["sampling_rounds"], a["loss"], a["reward_mean"]) == \
            (b["sampling_rounds"], b["loss"], b["reward_mean"])


def _refill_worker(rank, out_dir):
    from r1fast.train.grpo import GRPOTrainer

    tr = GRPOTrainer(make_cfg(out_dir, "--run.steps=2", "--algo.dynamic_sampling=true",
                              "--algo.max_sampling_rounds=8", "--data.prompts_per_step=4",
                              "--model.aux_loss_coef=0.0", "--optim.lr=0.003"),
                     reward=half_the_prompts_teach)
    rows = tr.fit()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rows": rows, "position": tr.task.dataset.state_dict()["position"]}, f)


@pytest.mark.multiproc
def test_data_parallel_refill_trains_on_the_batch_of_one_rank(tmp_path):
    """The refill chooses groups over all DP ranks in a one-rank run's order and moves them to
    the rank that trains on them: the rounds, the data position and the update equal one
    rank's (choosing per rank made each of them depend on the layout)."""
    run_ranks(1, _refill_worker, str(tmp_path / "one"))
    run_ranks(2, _refill_worker, str(tmp_path / "two"))
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    two = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(2)]
    assert one["position"] == two[0]["position"] == two[1]["position"] == \
        4 * sum(r["sampling_rounds"] for r in one["rows"])
    assert any(r["sampling_rounds"] > 1 for r in one["rows"])
    for a, b in zip(one["rows"], two[0]["rows"]):
        assert (a["sampling_rounds"], a["kept_frac"]) == (b["sampling_rounds"], b["kept_frac"])
        for key in ("reward_mean", "response_length", "loss", "grad_norm", "entropy"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])


def test_dr_grpo_divides_by_the_generation_budget(tmp_path):
    """Dr.GRPO's divisor was B x the step's padded width (longest prompt + completion), so
    one long prompt in a step shrank every token's gradient (13x in the review's example);
    it is B x rollout.max_new_tokens, the same at every step, as TRL's dr_grpo."""
    from r1fast.train.grpo import GRPOTrainer

    tr = GRPOTrainer(make_cfg(tmp_path, "--algo.agg=seq-mean-token-sum-norm",
                              "--rollout.max_new_tokens=24"))
    comps = [[5] * 10, [6] * 20]
    for prompt_len in (3, 300):
        batch = build_update_batch([[7] * prompt_len] * 2, comps, [[0.0] * 10, [0.0] * 20],
                                   torch.tensor([1.0, -1.0]), torch.ones(2, dtype=torch.bool),
                                   pad_id=0)
        assert tr._global_normalizer(batch) == (2 * 24, 2)


def failing_reward(completion: str, example: dict) -> float:
    raise RuntimeError("reward bug")


def test_reward_failure_counts_continue_across_a_resume(tmp_path):
    """reward_failures/* are the run's cumulative counts; a resumed run restarted them at 0
    (its step-2 row said 4 errors where the uninterrupted run says 8)."""
    from r1fast.train.grpo import GRPOTrainer

    def run(steps):
        cfg = make_cfg(tmp_path, f"--run.steps={steps}", "--algo.group_size=2")
        return GRPOTrainer(cfg, reward=failing_reward).fit()

    (first,) = run(1)
    (second,) = run(2)  # resumes from step 1's checkpoint
    per_step = 2 * 2  # prompts_per_step x group_size calls, each an error
    assert first["reward_failures/errors"] == per_step
    assert second["reward_failures/errors"] == 2 * per_step
    assert second["reward_failures/timeouts"] == 0


def test_held_out_rows_have_a_baseline_a_schedule_and_their_statistics(tmp_path, caplog):
    """GRPO evaluated only at the end, and its log line had neither a standard error nor what
    the scores were over. With data.eval_before_train and data.eval_every each due step gets
    one eval.jsonl row (kept exactly once through kills and resumes) with its statistics and,
    after step 0, the paired change since step 0."""
    from r1fast.pipeline.demo_report import gain
    from r1fast.train.grpo import GRPOTrainer

    cfg = make_cfg(tmp_path, "--run.steps=3", "--run.save_every=2", "--data.num_test=3",
                   "--data.eval_k=2", "--data.eval_every=2", "--data.eval_before_train=true")
    with caplog.at_level("INFO", logger="r1fast.train"):
        GRPOTrainer(cfg).fit()
    rows = read_jsonl(tmp_path / "eval.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 3]
    for r in rows:
        assert (r["num_problems"], r["k"], r["num_samples"], r["seed"]) == (3, 2, 6, 0)
        assert r["held_out_dropped"] == 0 and r["pass_at_1_se"] >= 0
    assert "vs_step_0" not in rows[0]
    for r in rows[1:]:
        for key in ("pass_at_1", "cons_at_k"):
            diff, se = gain(r, rows[0], key)
            assert r["vs_step_0"][key] == pytest.approx(diff)
            assert r["vs_step_0"][f"{key}_se"] == pytest.approx(se, nan_ok=True)
    assert (f"eval at step 3: pass@1 {rows[2]['pass_at_1']:.3f} +- {rows[2]['pass_at_1_se']:.3f}"
            in caplog.text)
    assert "(3 problems x 2 samples of arithmetic:test, seed 0); since step 0: pass@1" in caplog.text
    # a resume from step 2's checkpoint cuts the rows after it and evaluates step 3 again
    def back_to_step_2():
        ckpts = tmp_path / "checkpoints"
        shutil.rmtree(next(p for p in ckpts.iterdir() if p.name.endswith("3")))
        (ckpts / "latest").unlink()

    back_to_step_2()
    GRPOTrainer(cfg).fit()
    again = read_jsonl(tmp_path / "eval.jsonl")
    assert [r["step"] for r in again] == [0, 2, 3]
    # a kill during step 2's evaluation (after its checkpoint) used to lose that row for good
    # (at the end of a run, the rerun said "nothing to do"); the restart now evaluates it, from
    # the same weights with the same sampling streams: the same scores (checked on the CPU)
    back_to_step_2()
    (tmp_path / "eval.jsonl").write_text(json.dumps(rows[0]) + "\n")
    GRPOTrainer(cfg).fit()
    redone = read_jsonl(tmp_path / "eval.jsonl")
    assert [r["step"] for r in redone] == [0, 2, 3]
    assert redone[1]["per_problem"] == rows[1]["per_problem"]
    # options that need held-out problems say so when there are none
    from r1fast.train.config import config_warnings
    warned = config_warnings(make_cfg(tmp_path, "--data.eval_every=5"))
    assert any(w.startswith("data.eval_every=5 is not used: there are no held-out") for w in warned)
