"""Non-finite and out-of-range values: refused at config load time with a one-line error naming
the key; a non-finite loss or gradient norm never changes the weights (skipped up to
optim.max_nonfinite_skips times, then a clear error); nothing non-finite is exported."""
import logging

import pytest
import torch

from r1fast.train.config import load_train_config
from r1fast.typed_toml import ConfigError

pytestmark = pytest.mark.reliability


@pytest.mark.parametrize("override,key", [
    ("--optim.lr=inf", "optim.lr"),
    ("--optim.lr=-inf", "optim.lr"),
    ("--optim.lr=nan", "optim.lr"),
    ("--optim.lr=0", "optim.lr"),
    ("--optim.lr=-0.1", "optim.lr"),
    ("--optim.adam_beta1=1.5", "optim.adam_beta1"),
    ("--optim.adam_eps=0", "optim.adam_eps"),
    ("--optim.max_nonfinite_skips=-1", "optim.max_nonfinite_skips"),
    ("--model.rms_norm_eps=nan", "model.rms_norm_eps"),
    ("--model.router_scaling_factor=nan", "model.router_scaling_factor"),
    ("--model.router_scaling_factor=inf", "model.router_scaling_factor"),
    ("--algo.kl_coef=nan", "algo.kl_coef"),
    ("--algo.clip_high=inf", "algo.clip_high"),
    ("--rollout.temperature=nan", "rollout.temperature"),
    ("--reward.timeout_s=inf", "reward.timeout_s"),
    ("--reward.timeout_s=0", "reward.timeout_s"),
    ("--reward.cpu_time_s=0", "reward.cpu_time_s"),
    ("--reward.cpu_time_s=nan", "reward.cpu_time_s"),
    ("--reward.workers=-1", "reward.workers"),
    ("--run.steps=-3", "run.steps"),
    ("--run.steps=0", "run.steps"),
    ("--run.save_every=-2", "run.save_every"),
    ("--algo.group_size=1", "algo.group_size"),
    ("--algo.group_size=0", "algo.group_size"),
    ("--algo.adv_eps=0", "algo.adv_eps"),
    ("--algo.ref_reset_every=-1", "algo.ref_reset_every"),
    ("--rollout.temperature=0", "rollout.temperature"),
    ("--rollout.top_p=0", "rollout.top_p"),
    ("--rollout.top_p=1.5", "rollout.top_p"),
    ("--rollout.top_k=-1", "rollout.top_k"),
    ("--rollout.logprobs=processed", "rollout.logprobs"),
    ("--rollout.max_new_tokens=0", "rollout.max_new_tokens"),
    ("--rollout.prefill_tokens=-1", "rollout.prefill_tokens"),
    ("--reward.weights={accuracy=nan}", "reward.weights.accuracy"),
    ("--reward.weights={accuracy=inf, format=0.1}", "reward.weights.accuracy"),
    ('--reward.weights={accuracy="x"}', "reward.weights.accuracy"),
    # [data] counts: prompts_per_step=0 passed the load and failed after the model was built,
    # named 'batch_size'; the others were accepted
    ("--data.prompts_per_step=0", "data.prompts_per_step"),
    ("--data.prompts_per_step=-4", "data.prompts_per_step"),
    ("--data.num_train=0", "data.num_train"),
    ("--data.num_test=-1", "data.num_test"),
    ("--data.eval_k=0", "data.eval_k"),
    ("--data.eval_max_problems=-1", "data.eval_max_problems"),
    ("--data.max_prompt_tokens=-5", "data.max_prompt_tokens"),
    # the synthetic task's options: a typo was a raw TypeError when the data was built
    ("--data.task_options={min_digit=1}", "data.task_options.min_digits"),
    ('--data.task_options={max_digits="2"}', "data.task_options.max_digits"),
    ("--data.task_options={min_digits=0}", "data.task_options.min_digits"),
    ('--data.task_options={ops=["/"]}', "data.task_options.ops"),
    ("--data.task_options={min_value=1}", "data.task_options.min_value"),  # arithmetic has none
    # the loss options [algo] embeds flat are named as written, not bare ('clip_low must ...')
    ("--algo.clip_low=-1", "algo.clip_low"),
    ("--algo.clip_low=1.5", "algo.clip_low"),
    ("--algo.tis_cap=-1", "algo.tis_cap"),
    ("--algo.dual_clip=0.5", "algo.dual_clip"),
])
def test_bad_config_value_is_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_train_config(None, [override])
    msg = str(e.value)
    assert key in msg and "\n" not in msg, msg


def test_an_optional_choice_names_its_choices_not_a_typing_repr():
    """'k9' for an Optional[Literal[...]] said 'does not match typing.Optional[...]'."""
    with pytest.raises(ValueError) as e:
        load_train_config(None, ["--algo.kl=k9"])
    assert str(e.value) == ("config key 'algo.kl' must be one of ('k1', 'k2', 'k3', 'k3+'), "
                            "got 'k9' (or \"none\")")
    # a verl recipe's name says what it is here
    with pytest.raises(ConfigError) as e:
        load_train_config(None, ["--algo.kl=low_var_kl"])
    assert str(e.value) == "config key 'algo.kl': 'low_var_kl' is verl's name for 'k3'"


def test_group_size_one_says_why():
    with pytest.raises(ConfigError, match=r"algo.group_size must be >= 2.*always 0"):
        load_train_config(None, ["--algo.group_size=1", "--algo.estimator=rloo"])


def test_world_size_mismatch_is_an_error():
    from r1fast.policy.config import ParallelConfig
    from r1fast.policy.parallel import init_parallel

    with pytest.raises(ValueError, match=r"parallel.world_size=16.*1 process"):
        init_parallel(ParallelConfig(world_size=16))


# ------------------------------------------------------------------------------ the update
@pytest.fixture(scope="module")
def engine_factory():
    from r1fast.policy.config import ModelConfig, ParallelConfig
    from r1fast.policy.optim import OptimConfig
    from r1fast.train.engine import TrainEngine

    def make(skips, preset="tiny-moe"):
        model = ModelConfig.preset(preset)
        model.vocab_size = 64
        return TrainEngine(model, ParallelConfig(), OptimConfig(lr=1e-2,
                                                                max_nonfinite_skips=skips),
                           total_updates=10, seed=0)
    return make


def _batch():
    torch.manual_seed(1)
    return [{"tokens": torch.randint(0, 64, (2, 8))}]


def _loss(kind):
    def fn(hidden, weight, mb):
        logits = hidden.float() @ weight.float().t()
        loss = logits.logsumexp(-1).mean()
        if kind == "nan_loss":
            loss = loss * float("nan")
        elif kind == "inf_loss":
            loss = loss + float("inf")
        elif kind == "nan_grad":  # finite loss (0), NaN gradient: d sqrt(0 * |h|) = inf * 0
            loss = loss * 0 + torch.sqrt(hidden.float().abs() * 0).sum()
        return loss, {}
    return fn


def _weights(engine):
    return {k: v.detach().clone() for k, v in engine.policy.gpt.state_dict().items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()}


def test_a_skipped_step_keeps_the_router_expert_biases(engine_factory):
    """DeepSeek-V3's aux-loss-free biases move inside megatron's backward (finalize step),
    before the guard sees the loss; a skipped step must put them back."""
    eng = engine_factory(1, preset="tiny-dsv3")
    before = _weights(eng)
    assert any(k.endswith("router.expert_bias") for k in before)
    assert eng.update(_batch(), _loss("nan_loss")).skipped
    after = _weights(eng)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert not eng.update(_batch(), _loss("finite")).skipped  # a real step does move them
    moved = _weights(eng)
    assert any(not torch.equal(before[k], moved[k]) for k in before if "expert_bias" in k)


@pytest.mark.parametrize("kind", ["nan_loss", "inf_loss", "nan_grad"])
def test_non_finite_step_never_changes_weights(engine_factory, kind, caplog):
    from r1fast.train.engine import NonFiniteError

    eng = engine_factory(1)
    before, steps_before = _weights(eng), eng.scheduler.num_steps
    with caplog.at_level(logging.WARNING, logger="r1fast.train"):
        res = eng.update(_batch(), _loss(kind))
    assert res.skipped and "optimizer step skipped" in caplog.text
    after = _weights(eng)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert eng.scheduler.num_steps == steps_before
    with pytest.raises(NonFiniteError, match="max_nonfinite_skips=1"):
        eng.update(_batch(), _loss(kind))
    after = _weights(eng)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert eng.nonfinite_skips == 2
    assert eng.state_dict()["nonfinite_skips"] == 2  # saved even before any real step


def test_default_stops_at_the_first_non_finite_step(engine_factory):
    from r1fast.train.engine import NonFiniteError

    eng = engine_factory(0)
    ok = eng.update(_batch(), _loss("ok"))
    assert not ok.skipped and ok.grad_norm > 0
    before = _weights(eng)
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        eng.update(_batch(), _loss("nan_loss"))
    assert all(torch.equal(v, _weights(eng)[k]) for k, v in before.items())


def test_non_finite_weights_are_never_exported(engine_factory, tmp_path):
    from r1fast.policy.hf_checkpoint import save_hf_checkpoint

    eng = engine_factory(0)
    w = eng.policy.gpt.decoder.final_layernorm.weight
    with torch.no_grad():
        w[0] = float("nan")
    with pytest.raises(FloatingPointError, match="model.norm.weight"):
        save_hf_checkpoint(eng.policy, str(tmp_path / "hf"))
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    from r1fast.train.checkpoint import save_checkpoint
    with pytest.raises(FloatingPointError, match="final_layernorm"):
        save_checkpoint(tmp_path / "ckpt", 1, eng.state_dict(), {})


def test_a_grpo_run_that_diverges_stops_and_never_saves_non_finite(tmp_path):
    """lr=1e30 is finite (so it passes the config check) but blows the weights up: the run
    must stop (a non-finite update, or the next rollout's overflowing logits, which are an
    error rather than samples) instead of finishing "done", and every checkpoint it wrote
    holds finite tensors only."""
    from r1fast.train.checkpoint import nonfinite_tensors
    from r1fast.train.engine import NonFiniteError
    from tests.helpers.ckpt_state import checkpoint_state
    from r1fast.train.grpo import GRPOTrainer

    cfg = load_train_config(None, [
        "--model.vocab_size=128", "--data.prompts_per_step=1", "--algo.group_size=2",
        "--rollout.max_new_tokens=4", "--reward.workers=0", "--run.progress=false",
        "--run.tensorboard=false", "--data.num_train=16", "--algo.kl_coef=0",
        "--optim.lr=1e30", "--optim.clip_grad=0", "--run.steps=6", "--run.save_every=1",
        f"--run.out_dir={tmp_path}"])
    with pytest.raises(FloatingPointError) as stopped:
        GRPOTrainer(cfg).fit()
    assert isinstance(stopped.value, NonFiniteError) and "max_nonfinite_skips=0" in str(
        stopped.value) or "the policy's weights have diverged" in str(stopped.value)
    saved = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert saved  # steps before the blow-up were checkpointed
    for path in saved:  # the model and optimizer (distributed checkpoint) and the rank file
        state = checkpoint_state(path, tmp_path)
        assert state["policy"] and nonfinite_tensors(state) == [], path


def test_task_options_with_a_dataset_are_an_error():
    """data.task_options configure the synthetic task only; with data.path they did nothing."""
    with pytest.raises(ConfigError, match=r"data.task_options=\{'min_digits': 1\} configures "
                                          r"the synthetic data.task, but data.path=x.jsonl"):
        load_train_config(None, ["--data.path=x.jsonl", "--data.task_options={min_digits=1}"])


def test_a_skipped_sft_step_says_so_in_its_metrics(tmp_path):
    """A step skipped for a non-finite loss looked like a normal one in metrics.jsonl."""
    import dataclasses

    from r1fast.data import CharTokenizer
    from r1fast.policy.config import ModelConfig, ParallelConfig
    from r1fast.policy.optim import OptimConfig
    from r1fast.train.sft import SFTConfig, SFTTrainer
    from tests.train.test_sft_microbatches import uneven_examples

    class NanAtStep2(SFTTrainer):
        def _loss_fn(self, total):
            loss_fn = super()._loss_fn(total)
            if self.step_idx + 1 != 2:
                return loss_fn

            def nan_loss(h, w, mb):
                loss, metrics = loss_fn(h, w, mb)
                return loss * float("nan"), metrics
            return nan_loss

    cfg = SFTConfig(model=dataclasses.replace(ModelConfig.preset("tiny-moe"), vocab_size=128),
                    parallel=ParallelConfig(), optim=OptimConfig(lr=1e-3, max_nonfinite_skips=1),
                    steps=3, batch_size=8, out_dir=str(tmp_path))
    trainer = NanAtStep2(cfg, uneven_examples(), CharTokenizer())
    rows = [trainer.step() for _ in range(3)]
    assert [r["skipped"] for r in rows] == [0.0, 1.0, 0.0]
