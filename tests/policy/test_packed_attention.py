"""Per-sequence attention of packed rows (r1fast.policy.packed_attention).

``segment_attention`` against an independent fp64 formula (a loop over segments and heads with
an explicit causal softmax), forward and the gradients of query, key and value, on odd shapes:
empty and length-1 segments, grouped-query heads, every grouping (each segment alone, one
padded batch); a hypothesis property test over random boundaries. Then the policy: packed rows
attending per sequence give the log-probs and every gradient of the explicit-mask path and of
each sequence run alone; and at TP 2 (heads split; with and without sequence parallelism, the
row one token longer than a multiple of tp so the sequence-parallel pad is in play) they equal
one rank's (slow). The boundaries' derived tensors are planned on the host and sent in one
copy: they build for the meta device (whose values cannot be read) and, on a GPU, under
torch's sync-error mode.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.packed import packed_layout
from r1fast.policy.packed_attention import (segment_attention, segment_groups, segment_plan,
                                            thd_params)
from tests.helpers.hf_parity import summed_logprob_loss
from tests.helpers.spawn import run_ranks


def reference(q, k, v, cu, scale):
    """fp64 causal softmax attention of each segment alone; kv head of query head h: h // rep."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros_like(q)
    rep = q.shape[1] // k.shape[1]
    for s, e in zip(cu[:-1], cu[1:]):
        if e == s:
            continue
        causal = torch.ones(e - s, e - s, dtype=torch.bool).tril()
        for h in range(q.shape[1]):
            scores = (q[s:e, h] @ k[s:e, h // rep].T) * scale
            probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
            out[s:e, h] = probs @ v[s:e, h // rep]
    return out


def _check(lengths, nq, nkv, d, slack, dtype=torch.float64, tol=1e-10, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    cu = [0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()]
    q, k, v = (torch.randn(T, n, d, generator=g, dtype=torch.float64).to(dtype)
               .requires_grad_() for n in (nq, nkv, nkv))
    w = torch.randn(T, nq, d, generator=g, dtype=torch.float64)  # a generic upstream gradient
    scale = d ** -0.5 * 1.3
    got = segment_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), scale, slack=slack)
    assert got.shape == (T, nq, d) and got.dtype == dtype
    got_grads = torch.autograd.grad((got.double() * w).sum(), (q, k, v)) if T else (q, k, v)
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    want = reference(qr, kr, vr, cu, scale)
    assert (got.double() - want).abs().max().item() <= tol if T else True
    if T:
        want_grads = torch.autograd.grad((want * w).sum(), (qr, kr, vr))
        for name, a, b in zip("qkv", got_grads, want_grads):
            assert (a.double() - b).abs().max().item() <= tol, name


@pytest.mark.parametrize("lengths", [
    [7],                        # one segment: the whole row
    [0, 3, 0, 1, 5, 0],         # empty segments first, between and last; a length-1 segment
    [1, 1, 1, 1],               # every token alone
    [9, 2, 8, 1, 4, 4, 0, 13],  # uneven: several groups at the default slack
])
@pytest.mark.parametrize("slack", [1.0, 1.5, 1e9])  # each alone (unequal lengths) .. one group
@pytest.mark.parametrize("nq,nkv", [(4, 4), (6, 2)])
def test_segment_attention_equals_fp64_per_segment_formula(lengths, slack, nq, nkv):
    _check(lengths, nq, nkv, d=5, slack=slack)


def test_segment_attention_fp32_and_a_row_of_nothing():
    _check([0, 11, 1, 6], 4, 2, d=8, slack=1.5, dtype=torch.float32, tol=1e-5)
    out = segment_attention(torch.zeros(0, 2, 3), torch.zeros(0, 2, 3), torch.zeros(0, 2, 3),
                            torch.tensor([0, 0]), 1.0)
    assert out.shape == (0, 2, 3)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 12), min_size=1, max_size=8),
       heads=st.sampled_from([(1, 1), (2, 1), (3, 3), (4, 2)]), d=st.integers(1, 6),
       slack=st.sampled_from([1.0, 1.2, 1.5, 3.0, 1e9]), seed=st.integers(0, 2**16))
def test_segment_attention_property(lengths, heads, d, slack, seed):
    _check(lengths, heads[0], heads[1], d, slack, seed=seed)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 50), min_size=1, max_size=20),
       slack=st.floats(1.0, 4.0))
def test_segment_groups_cover_each_segment_once_within_the_slack(lengths, slack):
    groups = segment_groups(lengths, slack)
    flat = sorted(i for grp in groups for i in grp)
    assert flat == [i for i, n in enumerate(lengths) if n > 0]
    for grp in groups:
        longest = lengths[grp[0]]
        assert all(lengths[i] <= longest for i in grp)
        assert len(grp) * longest ** 2 <= slack * sum(lengths[i] ** 2 for i in grp) + 1e-9


def _plans(cu: torch.Tensor, device: torch.device):
    T = int(cu[-1])
    plan = segment_plan(cu, T, device)
    params = thd_params(cu, T, device)
    pos, mask = packed_layout(cu, T, device)
    flat = [t for g in plan.groups for t in g] + [params.cu_seqlens_q, pos, mask]
    return plan, params, flat + ([] if plan.inverse is None else [plan.inverse])


BOUNDARY_CASES = [[5, 0, 3, 9], [7], [0, 4, 4], [1] * 6, [2, 11, 2, 3]]


@pytest.mark.parametrize("lengths", BOUNDARY_CASES)
def test_packed_plans_are_made_on_the_host(lengths):
    """On the meta device nothing can be read back (nonzero, repeat_interleave without a size,
    .tolist() all raise), as on a GPU nothing can without a wait: the plan, the thd params and
    the packed layout still build from a host ``cu_seqlens``, with the CPU ones' shapes."""
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    cpu_plan, cpu_params, cpu_flat = _plans(cu, torch.device("cpu"))
    meta_plan, meta_params, meta_flat = _plans(cu, torch.device("meta"))
    assert all(t.device.type == "meta" for t in meta_flat)
    assert [t.shape for t in meta_flat] == [t.shape for t in cpu_flat]
    assert meta_params.max_seqlen_q == cpu_params.max_seqlen_q == max(lengths)
    assert cpu_params.cu_seqlens_q.tolist() == cu.tolist()
    assert cpu_params.cu_seqlens_q.dtype == meta_params.cu_seqlens_q.dtype == torch.int32


@pytest.mark.parametrize("lengths", BOUNDARY_CASES)
@pytest.mark.parametrize("pads", [0, 3])
def test_mla_boundaries_from_the_host_equal_those_read_off_the_positions(lengths, pads):
    """packed_inputs hands MLA the thd boundaries built from the host's cu_seqlens; they must
    be what mla_packed_params finds in the positions (pads continue the last sequence)."""
    from r1fast.policy.mla import mla_packed_params, mla_thd_params

    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    T = int(cu[-1])
    pos, _ = packed_layout(cu, T, mask=False)
    pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, pads + 1)], dim=1)  # [1, T + pads]
    read = mla_packed_params(pos, T + pads)
    host = mla_thd_params(cu, T + pads, torch.device("cpu"))
    assert (read is None) == (host is None)
    if host is not None:
        assert torch.equal(read.cu_seqlens_q, host.cu_seqlens_q)
        assert read.max_seqlen_q == host.max_seqlen_q
        assert [[t.tolist() for t in g] for g in read.plan.groups] == \
            [[t.tolist() for t in g] for g in host.plan.groups]
        assert mla_packed_params(pos, T + pads, host) is host  # given: nothing read
        assert mla_thd_params(cu, T + pads, torch.device("meta")).cu_seqlens_q.is_meta


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_plans_reach_the_gpu_without_a_wait():
    """The plans of every case built on the GPU under sync-error mode (a pageable copy or a
    data-dependent shape would raise), equal to the CPU ones."""
    for lengths in BOUNDARY_CASES:
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        _, _, cpu_flat = _plans(cu, torch.device("cpu"))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _, _, gpu_flat = _plans(cu, torch.device("cuda"))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for a, b in zip(cpu_flat, gpu_flat):
            assert b.is_cuda and torch.equal(a, b.cpu())


def test_segment_attention_bad_input():
    x = torch.zeros(5, 2, 3)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to the packed length 5"):
        segment_attention(x, x, x, torch.tensor([0, 3, 2, 5]), 1.0)
    with pytest.raises(ValueError, match="query heads \\(3\\) must be a multiple"):
        segment_attention(torch.zeros(5, 3, 3), x, x, torch.tensor([0, 5]), 1.0)


# ------------------------------------------------------------------------------ in the policy

LENGTHS = (6, 0, 1, 9, 3)  # an empty and a length-1 sequence; 19 tokens (tp=2 pads to 20)


def _rows(vocab, seed=3):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in LENGTHS:
        t = torch.randint(0, vocab, (1, n), generator=g)
        y = torch.roll(t, -1, dims=1)
        if n:
            y[:, -1] = -100
        rows.append((t, y))
    cu = torch.tensor([[0, *torch.tensor(LENGTHS).cumsum(0).tolist()]])
    return ([r for r in rows if r[0].shape[1]], torch.cat([t for t, _ in rows], 1),
            torch.cat([y for _, y in rows], 1), cu)


def _packed_run(policy, vocab):
    """(packed log-probs [1, T], every gradient of one packed micro-batch, by HF name)."""
    from r1fast.policy.hf_checkpoint import gather_hf_state_dict
    from r1fast.policy.optim import unshard_main_grads

    _, tokens, targets, cu = _rows(vocab)
    lp = policy.logprobs(tokens, targets, cu_seqlens=cu)
    n = float((targets != -100).sum())
    policy.forward_backward([{"tokens": tokens, "targets": targets, "cu_seqlens": cu}],
                            summed_logprob_loss(policy, n))
    unshard_main_grads(policy)
    grads = gather_hf_state_dict(policy, grads=True)  # on rank 0; None elsewhere
    return lp, None if grads is None else {k: v.clone() for k, v in grads.items()}


def _alone_run(policy, vocab):
    """(log-probs [1, T] of each sequence run alone, concatenated; their gradients)."""
    from r1fast.policy.hf_checkpoint import gather_hf_state_dict

    rows, _, targets, _ = _rows(vocab)
    n = float((targets != -100).sum())
    lp = torch.cat([policy.logprobs(t, y) for t, y in rows], 1)
    policy.forward_backward([{"tokens": t, "targets": y} for t, y in rows],
                            summed_logprob_loss(policy, n))
    grads = gather_hf_state_dict(policy, grads=True)
    return lp, {k: v.clone() for k, v in grads.items()}


def _assert_close(got, want, tol=1e-5):
    lp, grads = got
    assert (lp - want[0]).abs().max().item() < tol
    assert set(grads) == set(want[1])
    for k in want[1]:
        assert (grads[k] - want[1][k]).abs().max().item() < tol, k
    assert max(v.abs().max().item() for v in want[1].values()) > 1e-3  # gradients are not ~0


MOE = ModelConfig.preset("tiny-moe").replace(aux_loss_coef=0.0)
DENSE = ModelConfig.preset("tiny-dense")


def test_policy_segments_equal_the_mask_path_and_each_sequence_alone():
    from r1fast.policy.model import build_policy
    from r1fast.policy.packed_attention import PackedDotProductAttention, packed_inputs
    from r1fast.policy.parallel import destroy_parallel

    policy = build_policy(MOE, ParallelConfig(), seed=2)
    try:
        assert all(isinstance(layer.self_attention.core_attention, PackedDotProductAttention)
                   for layer in policy.gpt.decoder.layers)
        cu = _rows(MOE.vocab_size)[3]
        _, mask, params = packed_inputs(policy, cu, 19)
        assert mask is None and params.cu_seqlens_q.tolist() == [0, 6, 6, 7, 16, 19]
        assert params.rotary_pos_emb.shape == (19, 1, 1, 16)  # roped in the core attention
        segments = _packed_run(policy, MOE.vocab_size)
        policy.packed_attention = "mask"
        _, mask, params = packed_inputs(policy, cu, 19)
        assert params is None and mask.shape == (1, 1, 19, 19)
        masked = _packed_run(policy, MOE.vocab_size)
        alone = _alone_run(policy, MOE.vocab_size)
        _assert_close(segments, masked)
        _assert_close(segments, alone)
        policy.packed_attention = "flash"
        with pytest.raises(ValueError, match="packed_attention must be one of"):
            packed_inputs(policy, cu, 19)
        # another core attention (Transformer Engine's, built causal, drops an explicit mask):
        # packing is refused by its setting, in either mode (it was a warning and the mask)
        layer = policy.gpt.decoder.layers[0]
        layer.self_attention.core_attention = torch.nn.Identity()
        for mode in ("segments", "mask"):
            policy.packed_attention = mode
            with pytest.raises(ValueError, match=r"packed micro-batches \(parallel.max_tokens_"
                                                 r"per_microbatch > 0\) need r1fast's local "
                                                 r"core attention"):
                packed_inputs(policy, cu, 19)
    finally:
        destroy_parallel()


def test_core_attention_refuses_a_mask_with_packed_boundaries():
    from r1fast.policy.model import build_policy
    from r1fast.policy.packed_attention import thd_params
    from r1fast.policy.parallel import destroy_parallel

    policy = build_policy(DENSE, ParallelConfig(), seed=2, trainable=False)
    try:
        core = policy.gpt.decoder.layers[0].self_attention.core_attention
        x = torch.zeros(4, 4, 16)
        params = thd_params(torch.tensor([0, 4], dtype=torch.int32), 4)
        with pytest.raises(ValueError, match="got an attention mask or bias as well"):
            core(x, x[:, :2], x[:, :2], torch.ones(1, 1, 4, 4, dtype=torch.bool),
                 packed_seq_params=params)
        params.qkv_format = "sbhd"
        with pytest.raises(ValueError, match="qkv_format must be 'thd', got 'sbhd'"):
            core(x, x[:, :2], x[:, :2], None, packed_seq_params=params)
    finally:
        destroy_parallel()


def _tp2_worker(rank: int, name: str, ckpt: str, out: str) -> None:
    from r1fast.policy.hf_checkpoint import load_hf_checkpoint
    from r1fast.policy.model import build_policy
    from r1fast.policy.parallel import destroy_parallel

    model, sp = LAYOUTS[name]
    policy = build_policy(model, ParallelConfig(tp=2, sequence_parallel=sp))
    assert policy.sequence_parallel == sp
    load_hf_checkpoint(policy, ckpt)
    got = _packed_run(policy, model.vocab_size)
    if rank == 0:
        torch.save(got, out)
    destroy_parallel()


LAYOUTS = {"moe-sp": (MOE, True), "dense-no-sp": (DENSE, False)}  # (model, sequence parallel)


@pytest.mark.multiproc
@pytest.mark.slow  # two gloo ranks: 10-40 s each, by how busy the 2 cores are
@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo CPU layouts; GPU runs use NCCL")
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_packed_segments_at_tp2_equal_one_rank_alone(tmp_path, name):
    from r1fast.policy.hf_checkpoint import save_hf_checkpoint
    from r1fast.policy.model import build_policy
    from r1fast.policy.parallel import destroy_parallel

    model = LAYOUTS[name][0]
    policy = build_policy(model, ParallelConfig(), seed=4)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "tp2.pt")
    save_hf_checkpoint(policy, ckpt)
    alone = _alone_run(policy, model.vocab_size)
    destroy_parallel()
    run_ranks(2, _tp2_worker, name, ckpt, out)
    _assert_close(torch.load(out), alone)
