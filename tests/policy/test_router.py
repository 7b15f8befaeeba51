"""R1fastRouter (r1fast.ops.moe_route inside megatron's router) against megatron's own
TopKRouter: the same dispatcher inputs (probs, routing map), the same gradients including the
load-balancing (batch- and sequence-wise) and z losses, the same expert-load counts for the aux-loss-free bias; padding
tokens excluded from the losses and counts; the routing hook (replay/record)."""
from __future__ import annotations

import pytest
import torch

from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.model import transformer_config
from r1fast.policy.parallel import destroy_parallel, init_parallel

CONFIGS = {
    "softmax-after-topk+aux+z": ModelConfig.preset("tiny-moe").replace(aux_loss_coef=1e-2,
                                                                       z_loss_coef=1e-3),
    "softmax-before-topk": ModelConfig.preset("tiny-moe").replace(router_pre_softmax=True,
                                                                  aux_loss_coef=0.0),
    "sigmoid-groups-bias+aux+z": ModelConfig.preset("tiny-dsv3").replace(aux_loss_coef=1e-2,
                                                                         z_loss_coef=1e-3),
    "sigmoid-groups-bias+seq_aux": ModelConfig.preset("tiny-dsv3").replace(
        aux_loss_coef=1e-2, aux_loss_type="seq_aux_loss"),
    "softmax-after-topk+seq_aux+z": ModelConfig.preset("tiny-moe").replace(
        aux_loss_coef=1e-2, aux_loss_type="seq_aux_loss", z_loss_coef=1e-3),
}


@pytest.fixture(scope="module", autouse=True)
def _single_rank():
    init_parallel(ParallelConfig())
    yield
    destroy_parallel()


def routers(cfg: ModelConfig, seed: int = 0):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from r1fast.policy.router import R1fastRouter

    config = transformer_config(cfg, ParallelConfig())
    pg = get_default_pg_collection()
    mine, ref = R1fastRouter(config, pg), TopKRouter(config, pg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = torch.randn(mine.weight.shape, generator=g)
        mine.weight.copy_(w)
        ref.weight.copy_(w)
        if mine.expert_bias is not None:
            b = 0.3 * torch.randn(cfg.num_experts, generator=g)
            mine.expert_bias.copy_(b)
            ref.expert_bias.copy_(b)
    for r in (mine, ref):
        r.set_layer_number(1)
        r.train()
    return mine, ref


def run(router, x, mask=None, seed=1):
    """probs, map, and the gradients of a random linear function of probs (plus whatever
    auxiliary losses the router attaches)."""
    x = x.clone().requires_grad_()
    router.weight.grad = None
    probs, rmap = router(x, padding_mask=mask)
    r = torch.randn(probs.shape, generator=torch.Generator().manual_seed(seed))
    (probs * r).sum().backward()
    return probs.detach(), rmap, x.grad, router.weight.grad.clone()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_megatron_topk_router(name):
    cfg = CONFIGS[name]
    mine, ref = routers(cfg)
    x = torch.randn(7, 3, 64, generator=torch.Generator().manual_seed(2))  # [S, B, H]
    p1, m1, gx1, gw1 = run(mine, x)
    p2, m2, gx2, gw2 = run(ref, x)
    assert p1.shape == (21, cfg.num_experts) and m1.dtype == torch.bool
    assert torch.equal(m1, m2)
    assert (p1 - p2).abs().max().item() < 1e-6
    assert (gx1 - gx2).abs().max().item() < 1e-5
    assert (gw1 - gw2).abs().max().item() < 1e-5
    if cfg.router_expert_bias:
        assert torch.equal(mine.local_tokens_per_expert, ref.local_tokens_per_expert)
        assert mine.local_tokens_per_expert.sum().item() == 21 * cfg.moe_router_topk


def test_aux_and_z_losses_contribute_gradient():
    """Turning the losses off changes the router weight's gradient (they are wired in)."""
    cfg = CONFIGS["softmax-after-topk+aux+z"]
    with_losses, _ = routers(cfg)
    without, _ = routers(cfg.replace(aux_loss_coef=0.0, z_loss_coef=0.0))
    x = torch.randn(5, 2, 64, generator=torch.Generator().manual_seed(3))
    *_, gw1 = run(with_losses, x)
    *_, gw2 = run(without, x)
    assert (gw1 - gw2).abs().max().item() > 1e-6


@pytest.mark.parametrize("name", ["softmax-after-topk+aux+z", "sigmoid-groups-bias+aux+z",
                                  "sigmoid-groups-bias+seq_aux"])
def test_padding_tokens_are_excluded_from_losses_and_counts(name):
    """Router on [S, B] with the last position padded == router on the first S-1 positions,
    for the valid rows' probabilities, all gradients, and the expert-load counts."""
    cfg = CONFIGS[name]
    a, _ = routers(cfg)
    b, _ = routers(cfg)
    x = torch.randn(6, 2, 64, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(6, 2, dtype=torch.bool)
    mask[-1] = True
    valid = 5 * 2  # rows are sequence-major: the first 10 are positions 0..4

    def masked_loss(router, inp, m):
        inp = inp.clone().requires_grad_()
        router.weight.grad = None
        probs, _ = router(inp, padding_mask=m)
        r = torch.randn(valid, cfg.num_experts, generator=torch.Generator().manual_seed(9))
        (probs[:valid] * r).sum().backward()
        return probs[:valid].detach(), inp.grad, router.weight.grad.clone()

    pa, gxa, gwa = masked_loss(a, x, mask)
    pb, gxb, gwb = masked_loss(b, x[:5], None)
    assert (pa - pb).abs().max().item() < 1e-6
    assert (gxa[:5] - gxb).abs().max().item() < 1e-6
    assert gxa[5].abs().max().item() == 0.0
    assert (gwa - gwb).abs().max().item() < 1e-6
    if cfg.router_expert_bias:
        assert torch.equal(a.local_tokens_per_expert, b.local_tokens_per_expert)
    assert torch.equal(a.load_counts, b.load_counts) and a.load_counts.sum() == valid * \
        cfg.moe_router_topk


@pytest.mark.parametrize("padded", [False, True], ids=["no-pads", "pads"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_training_forward_does_not_wait_for_the_device(name, padded, monkeypatch):
    """The router issues no host sync from r1fast code (on a GPU each would stall the launch
    queue once per MoE layer per micro-batch): the load counts come from the routing op, not
    from bincount, and pads are masked out of the losses and counts, not indexed away (every
    trainer micro-batch carries lengths, so a mask is the common case)."""
    from tests.helpers.host_sync import SyncRecorder

    mine, _ = routers(CONFIGS[name])
    x = torch.randn(7, 3, 64, generator=torch.Generator().manual_seed(6))
    mask = None
    if padded:
        mask = torch.zeros(7, 3, dtype=torch.bool)
        mask[5:, 1] = True  # the last two positions of the second row
    run(mine, x, mask)  # warm-up
    with SyncRecorder(monkeypatch) as rec:
        run(mine, x, mask)
    assert rec.calls == []
    assert mine.load_counts.sum().item() == 2 * (21 - 2 * padded) * CONFIGS[name].moe_router_topk


class Hook:
    def __init__(self, indices=None):
        self.indices, self.recorded = indices, []

    def replay_indices(self, layer_index, num_tokens, device):
        return self.indices

    def record(self, layer_index, indices):
        self.recorded.append((layer_index, indices))


def test_routing_hook_replays_and_records():
    mine, _ = routers(CONFIGS["sigmoid-groups-bias+aux+z"])
    x = torch.randn(4, 2, 64, generator=torch.Generator().manual_seed(5))
    forced = torch.tensor([[7, 6]] * 8)
    mine.routing_hook = Hook(forced)
    probs, rmap = mine(x)
    assert mine.routing_hook.recorded[0][0] == 0  # layer number 1 -> index 0
    assert torch.equal(mine.routing_hook.recorded[0][1], forced)
    assert bool(rmap[:, 6:].all()) and not bool(rmap[:, :6].any())
    assert bool((probs[:, 6:] > 0).all())
    mine.routing_hook = None


@pytest.mark.parametrize("name", ["sigmoid-groups-bias+seq_aux", "softmax-after-topk+seq_aux+z"])
def test_sequence_wise_loss_is_the_mean_of_each_rows_own(name):
    """seq_aux_loss on a [S, 2] micro-batch whose first row ends early (pads after position
    3): the router weight's gradient from the loss alone is the mean of the two rows' routed
    alone, each over its own tokens; the batch-wise loss is not (it pools the rows)."""
    cfg = CONFIGS[name].replace(z_loss_coef=0.0)
    x = torch.randn(6, 2, 64, generator=torch.Generator().manual_seed(6))  # [S, B, H]
    mask = torch.zeros(6, 2, dtype=torch.bool)
    mask[4:, 0] = True

    def aux_grad(c, inp, m=None):
        router, _ = routers(c)
        router.weight.grad = None
        probs, _ = router(inp, padding_mask=m)
        (probs * 0).sum().backward()  # only the attached loss reaches the weight
        return router.weight.grad.clone()

    both = aux_grad(cfg, x, mask)
    alone = (aux_grad(cfg, x[:4, :1]) + aux_grad(cfg, x[:, 1:])) / 2
    assert both.abs().max().item() > 1e-6
    torch.testing.assert_close(both, alone, atol=1e-8, rtol=1e-5)
    pooled = aux_grad(cfg.replace(aux_loss_type="aux_loss"), x, mask)
    assert (pooled - both).abs().max().item() > 1e-6


def test_unsupported_load_balancing_type():
    cfg = CONFIGS["softmax-after-topk+aux+z"]
    mine, _ = routers(cfg)
    mine.routing_type = "global_aux_loss"
    with pytest.raises(ValueError, match="'aux_loss' and 'seq_aux_loss', got 'global_aux_loss'"):
        run(mine, torch.randn(2, 1, 64))


# ------------------------------------------------------------------------ token layout

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 4), length=st.integers(1, 9), k=st.integers(1, 3),
       tp=st.sampled_from([1, 2, 4]), sp=st.booleans())
def test_token_layout_matches_megatron_order(b, length, k, tp, sp):
    """Rows a router sees are megatron's [S, B] flattened (sequence-major) over the padded
    sequence; under sequence parallelism the TP ranks' rows concatenate to all of them, and
    from_router_order inverts to_router_order (checked without SP: it gathers under SP)."""
    from r1fast.policy.router import TokenLayout

    sp = sp and tp > 1
    idx = torch.randint(0, 8, (b, length, k))
    layouts = [TokenLayout(tp=tp, tp_rank=r, sequence_parallel=sp) for r in range(tp)]
    lp = layouts[0].padded_len(length)
    assert lp % (tp if sp else 1) == 0 and length <= lp < length + (tp if sp else 1)
    rows = torch.cat([lay.to_router_order(idx) for lay in (layouts if sp else layouts[:1])])
    assert rows.shape == (lp * b, k)
    for s in range(length):
        for j in range(b):
            assert torch.equal(rows[s * b + j], idx[j, s])
    if not sp:
        assert torch.equal(layouts[0].from_router_order(rows, b, length), idx)


def test_models_of_another_depth_train_in_one_process():
    """megatron's per-layer loss table is sized by the first model that writes it: training a
    deeper model after a shallower one in the same process failed in the router with
    IndexError (a Python-API user, a pipeline that trains two models)."""
    from r1fast.policy import build_policy

    for layers in (2, 3):
        cfg = ModelConfig.preset("tiny-moe").replace(num_layers=layers)
        assert cfg.aux_loss_coef > 0  # the load-balancing loss is logged per layer
        policy = build_policy(cfg, ParallelConfig(), seed=0)
        tokens = torch.randint(0, cfg.vocab_size, (1, 8),
                               generator=torch.Generator().manual_seed(0))
        policy.forward_backward([{"tokens": tokens, "targets": tokens}],
                                lambda h, w, mb: (h.float().pow(2).mean(), {}))
