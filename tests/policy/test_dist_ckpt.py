"""Resharding the policy and its distributed optimizer (r1fast.policy.dist_ckpt): a checkpoint
written at TP2 x EP2 (4 gloo ranks) loads at EP4, PP2 x EP2 and one rank with every weight,
every Adam moment element and the step count exactly as written.

The moments are set to known functions of the fp32 master weights before saving (exp_avg =
w / 2 + 1/8, exp_avg_sq = w^2), so after loading at any layout each rank can check every element
it owns against the weight it loaded, bit for bit."""
import pytest
import torch
import torch.distributed as dist

from tests.helpers.spawn import run_ranks

SAVED_AT = dict(tp=2, ep=2)


def _policy(layout: dict, seed: int):
    from r1fast.policy import build_optimizer, build_policy
    from r1fast.policy.config import ModelConfig, ParallelConfig
    from r1fast.policy.optim import OptimConfig

    world = dist.get_world_size()
    policy = build_policy(ModelConfig.preset("tiny-moe"),
                          ParallelConfig(world_size=world, **layout), seed=seed)
    optimizer, _ = build_optimizer(policy, OptimConfig(lr=1e-3))
    return policy, optimizer


def _adam_states(optimizer):
    """(fp32 master param, its Adam state) of every parameter shard this rank owns."""
    from r1fast.policy.dist_ckpt import _ensure_adam_state

    _ensure_adam_state(optimizer)
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                yield p, opt.optimizer.state[p]


def _save(rank, folder, out):
    from r1fast.policy.dist_ckpt import save_sharded
    from r1fast.policy.hf_checkpoint import gather_hf_state_dict

    dist.init_process_group("gloo")
    policy, optimizer = _policy(SAVED_AT, seed=1)
    with torch.no_grad():
        for p, st in _adam_states(optimizer):
            st["exp_avg"].copy_(p / 2 + 0.125)
            st["exp_avg_sq"].copy_(p * p)
            st["step"] = torch.tensor(3.0)
    save_sharded(policy, optimizer, folder)
    weights = gather_hf_state_dict(policy)
    if rank == 0:
        torch.save(weights, out)


def _load(rank, layout, folder, saved_weights):
    from r1fast.policy.dist_ckpt import load_sharded
    from r1fast.policy.hf_checkpoint import gather_hf_state_dict

    dist.init_process_group("gloo")
    policy, optimizer = _policy(layout, seed=7)  # other random weights, overwritten by the load
    load_sharded(policy, optimizer, folder)
    weights = gather_hf_state_dict(policy)
    if rank == 0:
        want = torch.load(saved_weights)
        assert set(weights) == set(want)
        for k in want:
            assert torch.equal(weights[k], want[k]), k
    steps = set()
    for p, st in _adam_states(optimizer):
        assert torch.equal(st["exp_avg"], p / 2 + 0.125)
        assert torch.equal(st["exp_avg_sq"], p * p)
        assert float(st["step"]) == 3.0
        steps.add(id(st["step"]))
    assert len(steps) == len(list(_adam_states(optimizer)))  # one step tensor per parameter


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_ckpt")
    run_ranks(4, _save, str(tmp / "ckpt"), str(tmp / "weights.pt"))
    return tmp


@pytest.mark.multiproc
@pytest.mark.parametrize("world, layout", [
    # ~30 s each: experts split 2 -> 4 ways, and the same layout back; the default suite
    # reshards to PP2xEP2 and to one rank (experts 2 -> 1)
    pytest.param(4, dict(ep=4), marks=pytest.mark.slow),
    (4, dict(pp=2, ep=2)), (1, {}), pytest.param(4, dict(tp=2, ep=2), marks=pytest.mark.slow),
], ids=["ep4", "pp2xep2", "one-rank", "same-layout"])
def test_reshard_is_exact(saved, world, layout):
    run_ranks(world, _load, layout, str(saved / "ckpt"), str(saved / "weights.pt"))


def _load_weights_only_into_other_model(rank, folder):
    from r1fast.policy import build_policy
    from r1fast.policy.config import ModelConfig, ParallelConfig
    from r1fast.policy.dist_ckpt import load_sharded

    dist.init_process_group("gloo")
    policy = build_policy(ModelConfig.preset("tiny-moe").replace(num_layers=3),
                          ParallelConfig(world_size=1), trainable=False)
    with pytest.raises(ValueError, match=r"does not match this model .*it lacks .*layers\.2"):
        load_sharded(policy, None, folder)


@pytest.mark.multiproc
def test_a_checkpoint_of_another_model_is_refused(saved):
    run_ranks(1, _load_weights_only_into_other_model, str(saved / "ckpt"))



def _bf16_masters_roundtrip(rank, folder):
    """bf16 weights with fp32 masters that bf16 cannot hold: the load must give back the
    masters, not the weights widened (megatron's reload_model_params copies weights ->
    masters, which would round every master to bf16 at each resume)."""
    import dataclasses

    from r1fast.policy import build_optimizer, build_policy
    from r1fast.policy.config import ModelConfig, ParallelConfig
    from r1fast.policy.dist_ckpt import load_sharded, save_sharded
    from r1fast.policy.optim import OptimConfig

    dist.init_process_group("gloo")
    model = dataclasses.replace(ModelConfig.preset("tiny-moe"), params_dtype="bfloat16")

    def make(seed):
        policy = build_policy(model, ParallelConfig(), seed=seed)
        return policy, build_optimizer(policy, OptimConfig(lr=1e-3))[0]

    policy, optimizer = make(seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p, _ in _adam_states(optimizer):
            assert p.dtype == torch.float32  # the master, not the bf16 weight
            p.add_(torch.randn(p.shape, generator=g) * 1e-4)
    masters = [p.clone() for p, _ in _adam_states(optimizer)]
    assert any(not torch.equal(m, m.bfloat16().float()) for m in masters)
    save_sharded(policy, optimizer, folder)
    weights = {k: v.clone() for k, v in policy.gpt.state_dict().items()
               if isinstance(v, torch.Tensor)}

    policy, optimizer = make(seed=7)
    load_sharded(policy, optimizer, folder)
    for want, (got, _) in zip(masters, _adam_states(optimizer), strict=True):
        assert torch.equal(got, want)
    for k, v in policy.gpt.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, weights[k]), k


def test_bf16_resume_keeps_the_fp32_masters(tmp_path):
    run_ranks(1, _bf16_masters_roundtrip, str(tmp_path / "ckpt"))
