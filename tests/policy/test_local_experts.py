"""LeanSequentialMLP (r1fast.policy.local_experts) against megatron's own SequentialMLP forward on
the same module: outputs and the gradients of tokens, probabilities and every expert weight,
with experts that get no token; the configurations that must fall back to megatron's; the
grouped kernels in decoding (grouped_experts) and in training (parallel.experts): the loop's
numbers, no host read, the modes and their errors."""
from __future__ import annotations

import copy

import pytest
import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from r1fast.ops._dispatch import triton_missing
from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.local_experts import LeanSequentialMLP


@pytest.fixture(scope="module")
def experts():
    from r1fast.policy.model import build_policy
    from r1fast.policy.parallel import destroy_parallel

    policy = build_policy(ModelConfig.preset("tiny-moe"), ParallelConfig(), seed=1)
    yield [m for m in policy.gpt.modules() if isinstance(m, SequentialMLP)]
    destroy_parallel()


def _run(module, forward, x, counts, probs):
    x, probs = x.clone().requires_grad_(), probs.clone().requires_grad_()
    out, bias = forward(module, x, counts, probs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad((out * w).sum(), [x, probs, *params])
    return out.detach(), bias, grads


def test_lean_experts_equal_megatron_sequential_mlp(experts):
    assert len(experts) == 2 and all(type(e) is LeanSequentialMLP for e in experts)
    e = experts[0]
    assert e._lean()
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 0, 7, 2, 4])  # two experts with no token
    n, h = int(counts.sum()), e.config.hidden_size
    x = torch.randn(n, h, generator=g)
    probs = torch.rand(n, generator=g)
    got = _run(e, LeanSequentialMLP.forward, x, counts, probs)
    want = _run(e, SequentialMLP.forward, x, counts, probs)  # megatron's, on the same weights
    assert got[1] is None and want[1] is None
    assert (got[0] - want[0]).abs().max().item() < 1e-6
    assert want[0].abs().max().item() > 1e-3
    for a, b in zip(got[2], want[2]):
        assert (a - b).abs().max().item() < 1e-6


@pytest.mark.parametrize("field,value", [
    ("add_bias_linear", True), ("moe_apply_probs_on_input", True),
    ("activation_func_clamp_value", 7.0), ("recompute_granularity", "selective"),
])
def test_other_configurations_run_megatrons_forward(experts, field, value):
    e = copy.copy(experts[0])  # a shallow copy: same weights, its own config object
    e.config = copy.copy(e.config)
    setattr(e.config, field, value)
    if field == "recompute_granularity":
        e.config.recompute_modules = ["moe_act"]
    assert not e._lean()


# ----------------------------------------------------------------------------- grouped_experts

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(triton_missing(DEVICE) is not None,
                                  reason=str(triton_missing(DEVICE)))


@pytest.fixture(scope="module")
def policy():
    from r1fast.policy.model import build_policy
    from r1fast.policy.parallel import destroy_parallel

    # built with the loop (on a GPU "auto" would build it grouped): the tests switch
    yield build_policy(ModelConfig.preset("tiny-dsv3"), ParallelConfig(experts="sequential"),
                       seed=2, trainable=False)
    destroy_parallel()


@needs_triton
def test_grouped_experts_equal_the_loop_without_host_reads(policy, monkeypatch):
    """A forward inside grouped_experts gives the loop's log-probs (fp32: to rounding), reaches
    the host not once (the loop: once per MoE layer) and skips megatron's copy of the counts
    to the host; leaving restores the loop."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from r1fast.policy.local_experts import grouped_experts
    from tests.helpers.host_sync import SyncRecorder

    def no_count_copy(*args, **kwargs):
        raise AssertionError("megatron's copy of the expert counts to the host ran")

    tokens = torch.randint(0, 256, (3, 13), generator=torch.Generator().manual_seed(4))
    tokens = tokens.to(policy.device)
    loop = policy.logprobs(tokens, tokens)
    with grouped_experts(policy.gpt, "grouped") as impl, torch.no_grad():
        assert impl == "triton"
        policy.logprobs(tokens, tokens)  # once: the address tables (and, on a GPU, autotuning)
        with SyncRecorder(monkeypatch) as rec, monkeypatch.context() as m:
            m.setattr(MoEAlltoAllTokenDispatcher, "_maybe_dtoh_and_synchronize", no_count_copy)
            grouped = policy.logprobs(tokens, tokens)
    assert rec.calls == []
    torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-5)
    experts = [m for m in policy.gpt.modules() if isinstance(m, LeanSequentialMLP)]
    assert len(experts) == 2 and all(e.grouped_impl is None for e in experts)
    with SyncRecorder(monkeypatch) as rec:
        again = policy.logprobs(tokens, tokens)
    assert rec.calls == ["Tensor.tolist"] * 2 and torch.equal(again, loop)


def test_grouped_experts_modes(policy, monkeypatch):
    from r1fast.ops._dispatch import ImplUnavailableError
    from r1fast.policy.local_experts import grouped_experts

    with grouped_experts(policy.gpt, "sequential") as impl:
        assert impl is None
    if not torch.cuda.is_available():  # "auto" decodes through the loop on a CPU
        with grouped_experts(policy.gpt, "auto") as impl:
            assert impl is None
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # Triton cannot run on this CPU now
        with pytest.raises(ImplUnavailableError, match="experts='grouped' is unavailable: "
                           "Triton kernels need CUDA tensors"):
            with grouped_experts(policy.gpt, "grouped"):
                pass
    with pytest.raises(ValueError, match=r"experts must be one of \('auto', 'grouped', "
                       r"'sequential'\), got 'fast'"):
        with grouped_experts(policy.gpt, "fast"):
            pass


@needs_triton
@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dsv3"])  # dsv3: shared expert, sigmoid
def test_grouped_training_equals_the_loop_without_host_reads(preset, monkeypatch):
    """parallel.experts="grouped": a MoE layer's forward and backward give the loop's output
    and the gradients of its input and every parameter (router and shared expert included;
    fp32, to rounding), with no host read and no copy of the counts to the host (on a GPU:
    no synchronising CUDA call); switching the built policy to the loop gives the loop back."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from r1fast.policy.local_experts import use_grouped_experts
    from r1fast.policy.model import build_policy
    from r1fast.policy.parallel import destroy_parallel
    from tests.helpers.host_sync import SyncRecorder
    from tests.helpers.moe_layer import first_moe_layer, layer_forward_backward, layer_inputs

    def no_count_copy(*args, **kwargs):
        raise AssertionError("megatron's copy of the expert counts to the host ran")

    policy = build_policy(ModelConfig.preset(preset), ParallelConfig(experts="grouped"),
                          seed=3, trainable=False)
    try:
        layer = first_moe_layer(policy)
        assert layer.experts.grouped_impl == "triton"
        inputs = layer_inputs(layer)
        layer_forward_backward(layer, inputs=inputs)  # once: the address tables (autotuning)
        with SyncRecorder(monkeypatch) as rec, monkeypatch.context() as m:
            m.setattr(MoEAlltoAllTokenDispatcher, "_maybe_dtoh_and_synchronize", no_count_copy)
            out, dx, grads = layer_forward_backward(layer, inputs=inputs)
        assert rec.calls == []
        assert use_grouped_experts(policy.gpt, "sequential") is None
        assert layer.experts.grouped_impl is None
        want_out, want_dx, want_grads = layer_forward_backward(layer, inputs=inputs)
    finally:
        destroy_parallel()
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, want_dx, rtol=1e-5, atol=1e-5)
    assert grads.keys() == want_grads.keys()
    assert sum(name.startswith("experts.local_experts.") for name in grads) == 16  # 8 x 2
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-5, atol=1e-5,
                                   msg=name)


def test_the_decoders_setting_gives_the_trainers_back(policy):
    """rollout.experts switches the experts while decoding; leaving restores what
    parallel.experts set (here the loop, then grouped)."""
    from r1fast.policy.local_experts import grouped_experts, use_grouped_experts

    layers = [m for m in policy.gpt.modules() if isinstance(m, LeanSequentialMLP)]
    impl = "triton" if triton_missing(DEVICE) is None else None
    if impl is not None:
        with grouped_experts(policy.gpt, "grouped"):
            assert all(e.grouped_impl == "triton" for e in layers)
        assert all(e.grouped_impl is None for e in layers)
        use_grouped_experts(policy.gpt, "grouped")
    try:
        with grouped_experts(policy.gpt, "sequential") as inside:
            assert inside is None and all(e.grouped_impl is None for e in layers)
        assert all(e.grouped_impl == impl for e in layers)
    finally:
        use_grouped_experts(policy.gpt, "sequential")
