"""Tests of router replay: recording the top-k indices of each MoE layer over a prefill and
decode steps, replaying them in training (same experts, weights from the current logits,
gradients flowing), the routing-hook protocol of ``r1fast.policy.router``, and misuse."""
from __future__ import annotations

import pytest
import torch

from r1fast.ops.moe_route import moe_route
from r1fast.policy.router_replay import RouterReplay

KW = dict(topk=2, score="sigmoid", impl="torch")


def generate(replay: RouterReplay, layers=(0, 3), steps=(5, 2, 2), E=8, seed=0):
    """Fake rollout: a prefill of 5 tokens then two decode steps of 2 sequences, two layers."""
    g = torch.Generator().manual_seed(seed)
    calls = []
    for T in steps:
        for layer in layers:
            logits = torch.randn(T, E, generator=g)
            calls.append((layer, logits, replay.route(layer, logits, **KW)))
    return calls


def test_record_concatenates_calls_per_layer():
    replay = RouterReplay()
    with replay.record():
        calls = generate(replay)
    assert replay.mode == "idle" and replay.layers() == [0, 3]
    for layer in (0, 3):
        mine = [r.indices for (lay, _, r) in calls if lay == layer]
        assert [s.shape[0] for s in replay.steps(layer)] == [5, 2, 2]
        assert torch.equal(replay.indices(layer), torch.cat(mine))
    rec = replay.recorded()
    assert set(rec) == {0, 3} and rec[3].shape == (9, 2) and rec[3].dtype == torch.int64


def test_recorded_indices_are_copies():
    replay = RouterReplay()
    with replay.record():
        r = replay.route(1, torch.randn(4, 8), **KW)
    r.indices.zero_()  # the router's tensor may be reused; the record must not change
    assert not bool((replay.indices(1) == 0).all())


def test_replay_reproduces_routing_when_selection_would_change():
    """Training sees different logits (the policy moved) and a different bias: without replay
    the experts change; with replay they are the recorded ones and the weights are recomputed
    from the new logits, with gradients."""
    replay = RouterReplay()
    old = torch.randn(9, 8)
    with replay.record():
        before = replay.route(0, old, **KW)
    new = (old + torch.randn(9, 8)).requires_grad_()
    bias = torch.randn(8)
    fresh = moe_route(new.detach(), expert_bias=bias, **KW)
    assert not torch.equal(fresh.indices, before.indices)
    with replay.replay(replay.recorded()):
        got = replay.route(0, new, expert_bias=bias, **KW)
        again = replay.route(0, new, expert_bias=bias, **KW)  # activation recomputation
    assert torch.equal(got.indices, before.indices) and torch.equal(again.indices, got.indices)
    want = moe_route(new.detach(), replay_indices=before.indices, **KW)
    torch.testing.assert_close(got.weights.detach(), want.weights, atol=0, rtol=0)
    got.weights.sum().backward()
    assert new.grad is not None and bool(new.grad.abs().sum() > 0)


def test_replay_accepts_per_step_lists_and_skips_unknown_layers():
    replay = RouterReplay()
    with replay.record():
        generate(replay)
    steps = {0: replay.steps(0)}
    logits = torch.randn(9, 8)
    with replay.replay(steps):
        r0 = replay.route(0, logits, **KW)
        r5 = replay.route(5, logits, **KW)  # no entry: routes normally
    assert torch.equal(r0.indices, replay.indices(0))
    assert torch.equal(r5.indices, moe_route(logits, **KW).indices)


def test_routing_hook_protocol():
    """What r1fast.policy.router calls: replay_indices(layer, T, device) then
    record(layer, indices) after every routing, whatever the mode."""
    replay = RouterReplay()
    idx = torch.tensor([[0, 1], [2, 3]])
    assert replay.replay_indices(0, 2, torch.device("cpu")) is None
    replay.record(0, idx)  # idle: ignored
    with replay.record():
        assert replay.replay_indices(0, 2, torch.device("cpu")) is None
        replay.record(0, idx)
        replay.record(0, idx + 4)
    assert replay.indices(0).tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with replay.replay({0: idx}):
        assert torch.equal(replay.replay_indices(0, 2, torch.device("cpu")), idx)
        assert replay.replay_indices(1, 2, torch.device("cpu")) is None
        replay.record(0, idx + 1)  # replay mode: not recorded
    assert replay.indices(0).shape == (4, 2)


def test_record_to_cpu():
    replay = RouterReplay()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with replay.record(to_cpu=True):
        replay.route(0, torch.randn(3, 8, device=dev), **{**KW, "impl": "auto"})
    assert replay.indices(0).device.type == "cpu"


def test_record_restarts_clean_and_clear():
    replay = RouterReplay()
    with replay.record():
        generate(replay)
    with replay.record():
        replay.route(7, torch.randn(2, 8), **KW)
    assert replay.layers() == [7]
    replay.clear()
    assert replay.layers() == []


def test_misuse_raises():
    replay = RouterReplay()
    with replay.record():
        with pytest.raises(RuntimeError, match="already in 'record' mode"):
            with replay.replay({}):
                pass
        with pytest.raises(RuntimeError, match="cannot clear"):
            replay.clear()
    with pytest.raises(KeyError, match="layer 2 was not recorded"):
        replay.indices(2)
    with pytest.raises(ValueError, match="do not pass replay_indices"):
        replay.route(0, torch.randn(2, 8), replay_indices=torch.zeros(2, 2), **KW)
    with pytest.raises(ValueError, match="needs both arguments"):
        replay.record(0)
    with pytest.raises(ValueError, match="keys must be int layer numbers"):
        with replay.replay({"0": torch.zeros(2, 2, dtype=torch.int64)}):
            pass
    with pytest.raises(ValueError, match=r"must be an integer tensor \[T, k\]"):
        with replay.replay({0: torch.zeros(2, 2)}):
            pass
    with replay.replay({0: torch.tensor([[0, 1], [1, 2]])}):
        with pytest.raises(ValueError, match="layer 0: replay indices cover 2 tokens but the "
                                             "router got 3"):
            replay.route(0, torch.randn(3, 8), **KW)
    assert replay.mode == "idle"
