"""The MoE layer's permutation and combine through r1fast's kernels (r1fast.policy.dispatcher):
the expert ids read off a routing map are those the map holds; r1fast's permutation has
megatron's row order; a MoE layer computes megatron's outputs and gradients; no op sums rows
with atomics (forward or backward) or makes the host read a size; the only host read left is
megatron's planned copy of the expert counts; and on a GPU repeated forwards and backwards
are bitwise equal."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from torch.utils._python_dispatch import TorchDispatchMode

from r1fast.ops.moe_permute import moe_permute, moe_permute_rows
from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.dispatcher import FixedOrderDispatcher, routing_rows
from r1fast.policy.parallel import destroy_parallel
from tests.helpers.moe_layer import first_moe_layer, layer_forward_backward

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROW_SUMS = {"aten::scatter_add_", "aten::scatter_add", "aten::index_add_", "aten::index_add"}
SIZE_READS = {"aten::masked_select", "aten::nonzero"}


def _random_map(T: int, E: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    chosen = torch.rand(T, E, generator=g).topk(k, dim=-1).indices
    return torch.zeros(T, E, dtype=torch.bool).scatter_(1, chosen, True)  # [T, E]


@settings(max_examples=40, deadline=None)
@given(T=st.integers(0, 40), E=st.integers(1, 20), data=st.data())
def test_routing_rows_are_the_maps_experts_in_megatrons_order(T, E, data):
    k = data.draw(st.integers(1, E))
    routing_map = _random_map(T, E, k, seed=data.draw(st.integers(0, 2**16)))
    indices, row_map = routing_rows(routing_map, k)
    assert torch.equal(indices, routing_map.nonzero()[:, 1].view(T, k))  # ascending per token
    # the rows: moe_permute's stable argsort of the ids (megatron's order), another way
    assert torch.equal(row_map, moe_permute(torch.zeros(T, 1), indices, num_experts=E).row_map)


def test_routing_rows_refuse_a_short_row_under_debug_checks(monkeypatch):
    routing_map = _random_map(5, 8, 3, seed=0)
    routing_map[2, routing_map[2].nonzero()[0]] = False
    monkeypatch.setenv("R1FAST_DEBUG_CHECKS", "1")
    with pytest.raises(ValueError, match=r"exactly topk=3 experts per token, got counts \[2, 3\]"):
        routing_rows(routing_map, 3)


@pytest.mark.parametrize("T, E, k", [(1, 4, 1), (13, 8, 2), (33, 16, 6), (0, 4, 2)])
def test_permutation_has_megatrons_row_order(T, E, k):
    """The all-to-all splits and expert counts megatron computes assume its order."""
    from megatron.core.transformer.moe.moe_utils import permute

    routing_map = _random_map(T, E, k, seed=T)
    tokens = torch.randn(T, 24, generator=torch.Generator().manual_seed(1))
    theirs, _, _ = permute(tokens, routing_map, num_out_tokens=T * k)
    _, row_map = routing_rows(routing_map, k)
    assert torch.equal(moe_permute_rows(tokens, row_map, impl="torch"), theirs)


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dsv3"])  # dsv3: shared expert, sigmoid
def test_moe_layer_equals_megatrons(preset):
    from r1fast.policy.model import build_policy

    # the loop's experts: this compares dispatchers (the grouped experts: test_local_experts)
    policy = build_policy(ModelConfig.preset(preset), ParallelConfig(experts="sequential"),
                          seed=0, trainable=False)
    try:
        layer = first_moe_layer(policy)
        assert isinstance(layer.token_dispatcher, FixedOrderDispatcher)
        out, dx, grads = layer_forward_backward(layer, FixedOrderDispatcher)
        their_out, their_dx, their_grads = layer_forward_backward(layer, MoEAlltoAllTokenDispatcher)
    finally:
        destroy_parallel()
    torch.testing.assert_close(out, their_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, their_dx, rtol=1e-6, atol=1e-6)
    assert grads.keys() == their_grads.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads[name], their_grads[name], rtol=1e-6, atol=1e-6,
                                   msg=name)


class _Ops(TorchDispatchMode):
    """The ops run while active, with their first output's shape."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) else out
        self.ops.append((func._schema.name, tuple(getattr(first, "shape", ()))))
        return out


@pytest.fixture(scope="module")
def policy():
    from r1fast.policy.model import build_policy

    # the loop's experts (the tests count its host reads; the grouped ones: test_local_experts)
    yield build_policy(ModelConfig.preset("tiny-dsv3"), ParallelConfig(experts="sequential"),
                       seed=0, trainable=False)
    destroy_parallel()


def test_no_row_sums_with_atomics_and_no_size_reads(policy):
    """Forward of the policy: no scatter_add/index_add at all, and nothing that makes the host
    read a size. Backward of a MoE layer: the only scatter_adds are gather gradients into
    [T, E] routing tensors (the torch router's, the dispatcher's weights; one entry per chosen
    expert: no collisions); no [*, H] row sums. megatron's dispatcher fails both (masked_select;
    index_select's gradient is index_add)."""
    tokens = torch.randint(0, 256, (3, 11)).to(policy.device)
    with _Ops() as fwd:
        policy.logprobs(tokens, tokens)
    names = {name for name, _ in fwd.ops}
    assert not (ROW_SUMS | SIZE_READS) & names, sorted(names)

    layer = first_moe_layer(policy)
    out, _ = layer(torch.randn(37, 3, layer.config.hidden_size, device=policy.device))
    with _Ops() as bwd:
        out.sum().backward()
    H, E = layer.config.hidden_size, layer.config.num_moe_experts
    sums = [(name, shape) for name, shape in bwd.ops if name in ROW_SUMS | SIZE_READS]
    assert all(name.startswith("aten::scatter_add") and shape[-1] == E != H
               for name, shape in sums), sums


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the recorder refuses every "
                    "synchronising CUDA call, megatron's planned wait included; the GPU check "
                    "of a sync-free MoE forward is tests/policy/test_local_experts.py's")
def test_only_the_planned_count_copy_reaches_the_host(policy, monkeypatch):
    """Per MoE layer, one host read: the sequential experts' split sizes, from the counts
    megatron copies to the host once at its planned point (on a GPU a CPU tensor by then).
    megatron's own permutation adds two masked_selects and the chunk sort's split lists."""
    from tests.helpers.host_sync import SyncRecorder

    moe_layers = sum(hasattr(l.mlp, "token_dispatcher") for l in policy.gpt.decoder.layers)
    tokens = torch.randint(0, 256, (3, 11)).to(policy.device)
    with SyncRecorder(monkeypatch) as rec:
        policy.logprobs(tokens, tokens)
    assert rec.calls == ["Tensor.tolist"] * moe_layers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float atomics are a GPU matter")
def test_forwards_and_backwards_are_bitwise_equal_on_a_gpu():
    from r1fast.policy.model import build_policy

    cfg = ModelConfig.preset("tiny-moe").replace(params_dtype="bfloat16")
    gpu = build_policy(cfg, ParallelConfig(), seed=0, trainable=False)
    try:
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, 256, (16, 97), generator=g).to(gpu.device)
        first = gpu.logprobs(tokens, tokens)
        assert all(torch.equal(first, gpu.logprobs(tokens, tokens)) for _ in range(5))
        layer = first_moe_layer(gpu)
        out, dx, grads = layer_forward_backward(layer, FixedOrderDispatcher, torch.bfloat16)
        for _ in range(5):
            again = layer_forward_backward(layer, FixedOrderDispatcher, torch.bfloat16)
            assert torch.equal(out, again[0]) and torch.equal(dx, again[1])
            assert all(torch.equal(grads[n], again[2][n]) for n in grads)
    finally:
        destroy_parallel()
