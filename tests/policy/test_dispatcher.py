"""The MoE layer's combine without float atomics (r1fast.policy.dispatcher): the policy's MoE
layers use it; it equals megatron's un-permutation (to fp32 rounding; in bf16 it is closer to
fp64, since megatron rounds after every add); no
scatter_add_ / index_add_ runs in a forward; and on a GPU two forwards of the same batch are
bitwise equal (megatron's unfused scatter_add_ is not)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from r1fast.ops.moe_permute import moe_unpermute
from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.dispatcher import DeterministicCombineDispatcher, combine_row_map
from r1fast.policy.parallel import destroy_parallel

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def policy():
    from r1fast.policy.model import build_policy

    yield build_policy(ModelConfig.preset("tiny-moe"), ParallelConfig(), seed=0, trainable=False)
    destroy_parallel()


def _megatron_permutation(T: int, E: int, k: int, H: int, dtype, seed: int = 0):
    """megatron's permute of random tokens under a random top-k routing map, and the permuted
    rows scaled as its experts leave them."""
    from megatron.core.transformer.moe.moe_utils import permute

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(T, H, generator=g).to(dtype)
    chosen = torch.rand(T, E, generator=g).topk(k, dim=-1).indices
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter_(1, chosen, True)
    permuted, _, sorted_indices = permute(tokens, routing_map, num_out_tokens=T * k)
    scaled = (permuted.float() * torch.rand(T * k, 1, generator=g)).to(dtype)
    return scaled, sorted_indices, routing_map


@pytest.mark.parametrize("T, E, k", [(1, 4, 1), (13, 8, 2), (33, 16, 6)])
def test_combine_equals_megatrons_unpermute(T, E, k):
    from megatron.core.transformer.moe.moe_utils import unpermute

    H = 24
    rows, sorted_indices, routing_map = _megatron_permutation(T, E, k, H, torch.float32)
    row_map = combine_row_map(sorted_indices, T, k)
    assert torch.equal(sorted_indices[row_map], torch.arange(T)[:, None].expand(T, k))
    mine = moe_unpermute(rows, row_map, torch.ones(T, k), impl="torch")
    theirs = unpermute(rows, sorted_indices, restore_shape=torch.Size([T, H]),
                       routing_map=routing_map)
    torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)

    rows16, sorted_indices, routing_map = _megatron_permutation(T, E, k, H, torch.bfloat16)
    row_map = combine_row_map(sorted_indices, T, k)
    exact = torch.zeros(T, H, dtype=torch.float64).index_add_(0, sorted_indices,
                                                               rows16.double())
    mine = moe_unpermute(rows16, row_map, torch.ones(T, k), impl="torch")
    theirs = unpermute(rows16, sorted_indices, restore_shape=torch.Size([T, H]),
                       routing_map=routing_map)
    assert mine.dtype == theirs.dtype == torch.bfloat16
    assert (mine.double() - exact).abs().max() <= (theirs.double() - exact).abs().max()


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_the_policy_combines_without_atomics(policy):
    layers = [layer.mlp for layer in policy.gpt.decoder.layers]
    assert layers and all(isinstance(m.token_dispatcher, DeterministicCombineDispatcher)
                          for m in layers)
    tokens = torch.randint(0, 256, (3, 11)).to(policy.device)
    with _Ops() as ops:
        policy.logprobs(tokens, tokens)
    assert not {"aten::scatter_add_", "aten::scatter_add", "aten::index_add_",
                "aten::index_add"} & ops.names, sorted(ops.names)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float atomics are a GPU matter")
def test_two_forwards_are_bitwise_equal_on_a_gpu():
    from r1fast.policy.model import build_policy

    cfg = ModelConfig.preset("tiny-moe").replace(params_dtype="bfloat16")
    gpu = build_policy(cfg, ParallelConfig(), seed=0, trainable=False)
    try:
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, 256, (16, 97), generator=g).to(gpu.device)
        first = gpu.logprobs(tokens, tokens)
        assert all(torch.equal(first, gpu.logprobs(tokens, tokens)) for _ in range(5))
    finally:
        destroy_parallel()
