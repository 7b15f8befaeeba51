"""The training engine's checkpoint state (r1fast.train.engine): a resumed engine's next update
equals the uninterrupted one bit for bit, with bf16 weights over fp32 masters and with the
non-distributed optimizer; settings that could train but not resume fail before any build."""
import dataclasses

import pytest
import torch
import torch.distributed as dist

from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.optim import OptimConfig
from tests.helpers.spawn import run_ranks


def _loss(hidden, weight, micro_batch):
    return (hidden.float() @ weight.float().t()).logsumexp(-1).mean(), {}


def _resume_worker(rank, folder, dtype, distributed):
    from r1fast.train.engine import TrainEngine

    dist.init_process_group("gloo")
    model = dataclasses.replace(ModelConfig.preset("tiny-moe"), vocab_size=64,
                                params_dtype=dtype)

    def make():
        return TrainEngine(model, ParallelConfig(), OptimConfig(
            lr=1e-4, use_distributed_optimizer=distributed), total_updates=10, seed=0)

    batch = [{"tokens": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))}]
    first = make()
    for _ in range(3):  # lr 1e-4: most updates are below bf16's precision of the weights
        first.update(batch, _loss)
    first.write_shared(folder)
    meta, rank_state = first.checkpoint_meta(), first.rank_state()
    second = make()
    second.load_checkpoint(folder, rank_state, meta)
    first.update(batch, _loss)
    second.update(batch, _loss)
    want, got = first.policy.gpt.state_dict(), second.policy.gpt.state_dict()
    moved = 0
    for k, v in want.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            assert torch.equal(got[k], v), k
            moved += 1
    assert moved > 0


@pytest.mark.parametrize("dtype, distributed", [("bfloat16", True), ("float32", False)],
                         ids=["bf16-dist-optim", "fp32-plain-optim"])
def test_resumed_update_equals_the_uninterrupted_one(tmp_path, dtype, distributed):
    run_ranks(1, _resume_worker, str(tmp_path / "ckpt"), dtype, distributed)


def _optimizer_kinds_worker(rank):
    from r1fast.train.engine import TrainEngine

    dist.init_process_group("gloo")
    model = dataclasses.replace(ModelConfig.preset("tiny-moe"), vocab_size=64)
    batch = [{"tokens": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))}]
    weights, norms = [], []
    for distributed in (True, False):
        engine = TrainEngine(model, ParallelConfig(), OptimConfig(
            lr=1e-2, use_distributed_optimizer=distributed), total_updates=10, seed=0)
        norms.append([engine.update(batch, _loss).grad_norm for _ in range(3)])
        weights.append(engine.policy.gpt.state_dict())
    # the gradient itself: Adam's m / sqrt(v) would hide a doubled one in the weights
    assert norms[1] == pytest.approx(norms[0], rel=1e-5), norms
    for k, v in weights[0].items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            torch.testing.assert_close(weights[1][k], v, rtol=0, atol=1e-6, msg=k)


def test_the_plain_optimizer_steps_as_the_distributed_one():
    """Without the distributed optimizer megatron leaves each .grad pointing at its main_grad
    after a step; unless zeroed, the next backward counts the old gradient again."""
    run_ranks(1, _optimizer_kinds_worker)


def _lr_worker(rank):
    from r1fast.train.engine import TrainEngine

    dist.init_process_group("gloo")
    model = dataclasses.replace(ModelConfig.preset("tiny-moe"), vocab_size=64)
    engine = TrainEngine(model, ParallelConfig(), OptimConfig(lr=1e-2, warmup_steps=2),
                         total_updates=10, seed=0)
    batch = [{"tokens": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))}]
    before = {k: v.clone() for k, v in engine.policy.gpt.state_dict().items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}
    used = [engine.update(batch, _loss).lr]
    after = engine.policy.gpt.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # it stepped with lr 0
    used += [engine.update(batch, _loss).lr for _ in range(2)]
    assert used == [0.0, 5e-3, 1e-2], used


def test_an_update_reports_the_lr_it_stepped_with():
    """Metrics rows report UpdateResult.lr; the engine's lr after an update is the next one's
    (warmup from 0: the first update does not move the weights)."""
    run_ranks(1, _lr_worker)


@pytest.mark.parametrize("model, optim, match", [
    (dict(params_dtype="float16"), {}, r"model.params_dtype='float16' cannot be trained here"),
    ({}, dict(optimizer="sgd", use_distributed_optimizer=False),
     r"optim.optimizer='sgd' cannot be trained here: megatron-core cannot load"),
    (dict(params_dtype="bfloat16"), dict(use_distributed_optimizer=False),
     r"optim.use_distributed_optimizer=false with model.params_dtype='bfloat16' cannot be "
     r"checkpointed"),
])
def test_settings_that_could_not_resume_fail_before_the_build(model, optim, match):
    from r1fast.train.engine import check_trainable

    with pytest.raises(ValueError, match=match):
        check_trainable(dataclasses.replace(ModelConfig.preset("tiny-moe"), **model),
                        OptimConfig(**optim))


def test_the_schedule_spans_the_run_and_says_so(caplog):
    """optim.total_steps was replaced by the run's length without a word (a linear decay
    asked over 1000 steps ran over 2), and a warmup as long as the run was stretched."""
    from r1fast.policy.optim import OptimConfig
    from r1fast.train.engine import _check_schedule

    with pytest.raises(ValueError, match=r"optim.total_steps=1234 is set by the trainer to the "
                                         r"run's 8 optimizer updates"):
        _check_schedule(OptimConfig(lr=1e-3, total_steps=1234), 8)
    _check_schedule(OptimConfig(lr=1e-3, total_steps=8), 8)  # the same length: no word
    with caplog.at_level("WARNING", logger="r1fast.train"):
        _check_schedule(OptimConfig(lr=1e-3, warmup_steps=10), 8)
    assert "optim.warmup_steps=10 >= the run's 8 optimizer updates: the LR never reaches " \
        "optim.lr=0.001" in caplog.text


def test_a_bad_schedule_fails_before_the_model_is_built(monkeypatch):
    """The total_steps check ran after the policy was built (minutes for a large model)."""
    from r1fast.policy.config import ModelConfig, ParallelConfig
    from r1fast.policy.optim import OptimConfig
    from r1fast.train.engine import TrainEngine

    def built(*args, **kwargs):
        raise AssertionError("the model was built before the schedule was checked")
    monkeypatch.setattr(TrainEngine, "_build_policy", built)
    with pytest.raises(ValueError, match="optim.total_steps=50 is set by the trainer"):
        TrainEngine(ModelConfig.preset("tiny-dense"), ParallelConfig(),
                    OptimConfig(lr=1e-3, total_steps=50), total_updates=2, seed=0)


def test_optimizer_choices_fail_when_the_config_is_read():
    """optim.optimizer / lr_decay_style were checked when the optimizer was built, after the
    policy (minutes for a real checkpoint), by a name the user did not write."""
    from r1fast.train.config import load_train_config

    with pytest.raises(ValueError, match=r"optim.optimizer must be one of \('adam', 'sgd'\), "
                                         r"got 'adamw'"):
        load_train_config(None, ["--optim.optimizer=adamw"])
    with pytest.raises(ValueError, match=r"optim.lr_decay_style must be one of"):
        load_train_config(None, ["--optim.lr_decay_style=cosin"])
    with pytest.raises(ValueError, match=r"optim.warmup_steps must be an int >= 0, got -1"):
        load_train_config(None, ["--optim.warmup_steps=-1"])
