"""The router's auxiliary losses (r1fast.ops.moe_losses): the sequence-wise balance loss against
an fp64 per-sequence formula written as DeepSeek-V2's ``seq_aux`` code reads, and against
megatron-core's own ``seq_aux_loss`` arithmetic; its properties (hypothesis): one sequence is
the batch-wise loss, token order does not matter, ranks' shares add up; the z-loss and the
device token counts; every bad input."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1fast.ops.moe_losses import moe_aux_loss, moe_seq_aux_loss, moe_z_loss
from r1fast.ops.moe_route import moe_aux_scores


def sequence_counts(scores: torch.Tensor, sequence: torch.Tensor, valid: torch.Tensor, k: int,
                    n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """c [N, E] (plain top-k of each valid token, per sequence) and L [N] (valid tokens)."""
    top = torch.zeros_like(scores).scatter_(1, scores.topk(k, dim=1).indices, 1.0)
    top = top * valid[:, None]
    counts = torch.zeros(n, scores.shape[1], dtype=scores.dtype).index_add_(0, sequence, top)
    tokens = torch.zeros(n, dtype=scores.dtype).index_add_(0, sequence, valid.to(scores.dtype))
    return counts, tokens


def naive_seq_aux_loss(scores: torch.Tensor, sequence: torch.Tensor, valid: torch.Tensor,
                       k: int, coef: float, n: int) -> torch.Tensor:
    """fp64, one sequence at a time: f_e = E / (k L) * (tokens whose top-k holds e), P_e = the
    mean score, loss = coef * the mean over sequences with tokens of sum_e f_e P_e."""
    E = scores.shape[1]
    losses = []
    for s in range(n):
        rows = [t for t in range(len(sequence)) if int(sequence[t]) == s and bool(valid[t])]
        if not rows:
            continue
        p = scores[rows].double()  # [L, E]
        hot = torch.zeros(E, dtype=torch.float64)
        for r in p.detach():
            for e in sorted(range(E), key=lambda e: (-float(r[e]), e))[:k]:
                hot[e] += 1
        f = hot * E / (k * len(rows))
        losses.append((f * p.mean(0)).sum())
    return coef * torch.stack(losses).mean()


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_seq_aux_loss_and_gradient_match_the_per_sequence_formula(score):
    """Odd sizes, sequences of unequal length scattered over the rows, pads, and a sequence of
    pads only (it does not count in the mean)."""
    T, E, k, n = 37, 12, 3, 5
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=g, requires_grad=True)
    sequence = torch.randint(0, n - 1, (T,), generator=g)  # sequence n-1: no tokens at all
    valid = torch.rand(T, generator=g) > 0.2
    sequence[~valid & (torch.arange(T) % 2 == 0)] = 3  # some pads sit in a real sequence
    scores, _ = moe_aux_scores(logits, k, score=score, impl="torch")
    counts, tokens = sequence_counts(scores.detach(), sequence, valid, k, n)
    loss = moe_seq_aux_loss(scores * valid[:, None], sequence, counts, tokens, k, 0.01)
    xr = logits.detach().double().requires_grad_()
    ref_scores, _ = moe_aux_scores(xr, k, score=score, impl="torch")
    want = naive_seq_aux_loss(ref_scores, sequence, valid, k, 0.01, n)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want, atol=0, rtol=1e-6)
    loss.backward()
    want.backward()
    torch.testing.assert_close(logits.grad.double(), xr.grad, atol=1e-10, rtol=1e-5)
    assert logits.grad[~valid].abs().max().item() == 0.0


def test_seq_aux_loss_equals_megatrons_for_rows_of_one_length():
    """megatron-core's seq_aux_loss (a sequence is a row of the [S, B] micro-batch): the
    switch loss over [S, B*E] divided by B."""
    from megatron.core.transformer.moe.moe_utils import (
        compute_routing_scores_for_aux_loss,
        switch_load_balancing_loss_func,
    )

    S, B, E, k = 9, 3, 8, 2
    logits = torch.randn(S * B, E, generator=torch.Generator().manual_seed(1))  # [S*B, E]
    rmap, scores = compute_routing_scores_for_aux_loss(logits, k, "sigmoid")
    mega = switch_load_balancing_loss_func(
        scores.reshape(S, -1), rmap.reshape(S, -1).sum(0), S, k, E, 1e-3) / B
    ours_scores, _ = moe_aux_scores(logits, k, score="sigmoid", impl="torch")
    row = torch.arange(S * B) % B  # sequence-major: token s*B + b is in row b
    counts, tokens = sequence_counts(ours_scores, row, torch.ones(S * B, dtype=torch.bool), k, B)
    ours = moe_seq_aux_loss(ours_scores, row, counts, tokens, k, 1e-3)
    torch.testing.assert_close(ours, mega.float(), atol=0, rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 24), E=st.integers(2, 9), n=st.integers(1, 4), seed=st.integers(0, 99))
def test_seq_aux_loss_properties(T, E, n, seed):
    """One sequence is the batch-wise loss; the order of the tokens does not matter; two ranks
    holding halves of the tokens, each with its local scores and the summed counts, have
    shares that add up to the loss."""
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, E + 1, (1,), generator=g))
    scores, _ = moe_aux_scores(torch.randn(T, E, generator=g, dtype=torch.float64), k,
                               impl="torch")
    valid = torch.ones(T, dtype=torch.bool)
    one = torch.zeros(T, dtype=torch.int64)
    c1, l1 = sequence_counts(scores, one, valid, k, 1)
    torch.testing.assert_close(moe_seq_aux_loss(scores, one, c1, l1, k, 0.1),
                               moe_aux_loss(scores, c1[0], k, 0.1), atol=1e-15, rtol=1e-12)
    sequence = torch.randint(0, n, (T,), generator=g)
    counts, tokens = sequence_counts(scores, sequence, valid, k, n)
    whole = moe_seq_aux_loss(scores, sequence, counts, tokens, k, 0.1)
    perm = torch.randperm(T, generator=g)
    torch.testing.assert_close(moe_seq_aux_loss(scores[perm], sequence[perm], counts, tokens,
                                                k, 0.1), whole, atol=1e-15, rtol=1e-12)
    half = T // 2
    shares = sum(moe_seq_aux_loss(scores[part], sequence[part], counts, tokens, k, 0.1)
                 for part in (slice(0, half), slice(half, T)))
    torch.testing.assert_close(shares, whole, atol=1e-15, rtol=1e-12)


def test_seq_aux_loss_keeps_device_counts_and_bf16_scores_in_fp32():
    T, E, k = 6, 4, 2
    scores, _ = moe_aux_scores(torch.randn(T, E), k, impl="torch")
    row = torch.arange(T) % 2
    counts, tokens = sequence_counts(scores, row, torch.ones(T, dtype=torch.bool), k, 2)
    want = moe_seq_aux_loss(scores, row, counts, tokens, k, 0.1)
    got = moe_seq_aux_loss(scores.bfloat16(), row.int(), counts.long(), tokens.long(), k, 0.1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0, rtol=1e-2)
    none = moe_seq_aux_loss(scores, row, counts, torch.zeros(2), k, 0.1)  # no sequence counts
    assert none.item() == 0.0


# ----------------------------------------------------------------------------- the z-loss

def test_z_loss_matches_formula_and_megatron():
    from megatron.core.transformer.moe.moe_utils import z_loss_func

    logits = torch.randn(7, 8, requires_grad=True)
    z = moe_z_loss(logits, 1e-3)
    xr = logits.detach().double().requires_grad_()
    naive = 1e-3 / 7 * sum(torch.log(torch.exp(r).sum()) ** 2 for r in xr)
    torch.testing.assert_close(z.double(), naive, atol=1e-10, rtol=1e-6)
    z.backward()
    naive.backward()
    torch.testing.assert_close(logits.grad.double(), xr.grad, atol=1e-9, rtol=1e-5)
    torch.testing.assert_close(z.detach(), z_loss_func(logits.detach(), 1e-3))
    assert moe_z_loss(logits.detach(), 1e-3, num_tokens=14) * 2 == pytest.approx(z.item())


def test_a_device_token_count_and_a_valid_mask_give_the_indexed_losses():
    """A 0-d tensor ``num_tokens`` (a count that stays on the device) gives the int count's
    losses, clamped to >= 1; ``valid`` in the z-loss equals the valid rows alone, with no
    gradient to the others."""
    T, E, k = 9, 8, 2
    logits = torch.randn(T, E, requires_grad=True)
    valid = torch.tensor([True, False, True, True, False, True, True, True, False])
    z = moe_z_loss(logits, 1e-3, num_tokens=torch.tensor(6.0), valid=valid)
    kept = logits.detach()[valid].requires_grad_()
    want = moe_z_loss(kept, 1e-3)
    torch.testing.assert_close(z, want, atol=0, rtol=1e-6)
    z.backward()
    want.backward()
    torch.testing.assert_close(logits.grad[valid], kept.grad, atol=0, rtol=1e-6)
    assert logits.grad[~valid].abs().max().item() == 0.0
    poisoned = logits.detach().clone()
    poisoned[~valid] = float("nan")  # a pad's logits never reach the loss or its gradient
    poisoned.requires_grad_()
    z_nan = moe_z_loss(poisoned, 1e-3, num_tokens=torch.tensor(6.0), valid=valid)
    z_nan.backward()
    assert torch.isfinite(poisoned.grad).all() and torch.equal(z_nan, z.detach())
    p, counts = moe_aux_scores(logits.detach(), k, impl="torch")
    by_int = moe_aux_loss(p, counts, k, 0.01, num_tokens=T)
    by_tensor = moe_aux_loss(p, counts, k, 0.01, num_tokens=torch.tensor(float(T)))
    torch.testing.assert_close(by_tensor, by_int, atol=0, rtol=1e-6)
    assert moe_z_loss(logits.detach(), 1e-3, num_tokens=torch.tensor(0.0)) == \
        pytest.approx(moe_z_loss(logits.detach(), 1e-3, num_tokens=1).item())
    with pytest.raises(ValueError, match="num_tokens must be 0-D"):
        moe_z_loss(logits.detach(), 1e-3, num_tokens=torch.tensor([6.0]))


# ----------------------------------------------------------------------------- bad input

_S, _ONE, _CNT = torch.rand(4, 8), torch.zeros(4, dtype=torch.int64), torch.ones(1, 8)
BAD_LOSS = [
    (lambda: moe_aux_loss(torch.rand(4, 8), torch.ones(7), 2, 0.1),
     r"tokens_per_expert must have shape \[8\]"),
    (lambda: moe_aux_loss(torch.rand(8), torch.ones(8), 2, 0.1), "scores must be 2-D"),
    (lambda: moe_aux_loss(torch.rand(4, 8), torch.ones(8), 9, 0.1), r"topk must be in \[1, 8\]"),
    (lambda: moe_aux_loss(torch.rand(4, 8), torch.ones(8), 2, -1.0), "coef must be in"),
    (lambda: moe_aux_loss(torch.rand(4, 8), torch.ones(8), 2, 0.1, num_tokens=0),
     "num_tokens must be in"),
    (lambda: moe_seq_aux_loss(_S, _ONE[:3], _CNT, torch.ones(1), 2, 0.1),
     r"sequence must have shape \[4\]"),
    (lambda: moe_seq_aux_loss(_S, _ONE.float(), _CNT, torch.ones(1), 2, 0.1),
     "sequence must have dtype"),
    (lambda: moe_seq_aux_loss(_S, _ONE, torch.ones(1, 7), torch.ones(1), 2, 0.1),
     r"tokens_per_expert must have shape \[\*, 8\]"),
    (lambda: moe_seq_aux_loss(_S, _ONE, _CNT, torch.ones(2), 2, 0.1),
     r"tokens must have shape \[1\]"),
    (lambda: moe_seq_aux_loss(_S, _ONE + 1, _CNT, torch.ones(1), 2, 0.1),
     r"sequence holds ids in \[1, 1\], outside \[0, N=1\)"),
    (lambda: moe_seq_aux_loss(_S, _ONE, _CNT, torch.ones(1), 0, 0.1), r"topk must be in"),
    (lambda: moe_seq_aux_loss(_S, _ONE, _CNT, torch.ones(1), 2, -0.1), "coef must be in"),
    (lambda: moe_z_loss(torch.randn(4), 0.1), "logits must be 2-D"),
    (lambda: moe_z_loss(torch.randn(4, 8), -0.1), "coef must be in"),
]


@pytest.mark.parametrize("call,match", BAD_LOSS, ids=[m for _, m in BAD_LOSS])
def test_bad_loss_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
