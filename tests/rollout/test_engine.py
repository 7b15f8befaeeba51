"""The ragged rollout loop (r1fast.rollout.engine): left-padded prefill, device-side sampling from
per-row generators, finished rows dropped, host reads only every ``check_every`` steps.

References: a toy causal model (ToyRagged) whose every row is recomputed alone from its own
prefix, and, on the tiny MoE policy, the shared-position loop over prefix recomputation
(RecomputeDecoder), which knows nothing of pads, per-row positions or compaction."""
from __future__ import annotations

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from r1fast.rollout.engine import left_pad, row_uniforms
from r1fast.rollout.sampler import SamplingConfig, generate

V = 13


class ToyRagged:
    """A causal 'model' with the ragged decoder protocol: next-token logits of a row are a
    function of its own prefix and positions only (cumulative embeddings + a position term).
    Each call recomputes every live row alone from its unpadded prefix, so pads, positions and
    compaction are checked against the obvious computation."""

    ragged = True
    device = torch.device("cpu")

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(V, V, generator=g)
        self.decode_calls = 0
        self.batch_sizes: list[int] = []

    def logits_of(self, seq: torch.Tensor) -> torch.Tensor:  # [n] -> [V] of the last position
        return self.emb[seq].sum(0) + 0.3 * (seq.shape[0] - 1)

    def prefill(self, tokens, pads, max_len, dest=None):
        assert tokens.shape[1] <= max_len
        self.rows = [tokens[i, int(pads[i]):] for i in range(tokens.shape[0])]
        return torch.stack([self.logits_of(r) for r in self.rows])

    def decode(self, tokens, dest=None):
        self.decode_calls += 1
        self.batch_sizes.append(tokens.shape[0])
        self.rows = [torch.cat([r, t[None]]) for r, t in zip(self.rows, tokens)]
        return torch.stack([self.logits_of(r) for r in self.rows])

    def keep(self, rows):
        self.rows = [self.rows[i] for i in rows.tolist()]

    def share(self, tok, lp):
        return tok, lp


def reference(toy: ToyRagged, prompt, seed, cfg, stops):
    """One row alone, token by token, with its generator's uniforms (inverse CDF)."""
    from r1fast.rollout.sampler import sample_tokens

    u = row_uniforms([seed], cfg.max_new_tokens)[0]
    seq, out, lps = torch.tensor(prompt), [], []
    for s in range(cfg.max_new_tokens):
        tok, lp = sample_tokens(toy.logits_of(seq)[None], cfg, uniforms=u[s:s + 1])
        out.append(int(tok))
        lps.append(float(lp))
        seq = torch.cat([seq, tok])
        if out[-1] in stops:
            break
    return out, lps


PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11], [7, 3], [12, 1, 1, 2]]
SEEDS = [21, 22, 23, 24, 25]


@pytest.mark.parametrize("check_every", [1, 3, 100])
def test_rows_equal_each_row_alone_and_finished_rows_leave(check_every):
    cfg = SamplingConfig(temperature=0.9, top_p=0.9, max_new_tokens=10, stop_token_ids=(5, 6))
    toy = ToyRagged()
    out = generate(toy, PROMPTS, cfg, eos_token_id=0, row_seeds=SEEDS, check_every=check_every)
    lengths = []
    for p, seed, c, lp, tr in zip(PROMPTS, SEEDS, out.completion_ids, out.logprobs,
                                  out.truncated):
        want, want_lp = reference(toy, p, seed, cfg, {0, 5, 6})
        assert c == want
        torch.testing.assert_close(torch.tensor(lp), torch.tensor(want_lp))
        assert tr == (want[-1] not in (0, 5, 6))
        lengths.append(len(c))
    assert len(set(lengths)) > 1 and min(lengths) < cfg.max_new_tokens  # early stops happen
    # the batch shrinks at the checks: never more rows than were alive at the last check
    # the loop stops at the first check after the last row's last token (or at max_new_tokens)
    assert toy.decode_calls == min(-(-max(lengths) // check_every) * check_every - 1,
                                   cfg.max_new_tokens - 1)
    for call, size in enumerate(toy.batch_sizes, start=1):
        checked = call // check_every * check_every  # steps done at the last check
        alive = sum(1 for n in lengths if n > checked)
        assert size == (len(PROMPTS) if checked == 0 else max(alive, 1)), (call, size)


def test_any_batch_and_order_gives_the_same_completions():
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=8, stop_token_ids=(5,))
    full = generate(ToyRagged(), PROMPTS, cfg, eos_token_id=0, row_seeds=SEEDS, check_every=2)
    for order in ([4, 0, 2], [3], [2, 1, 0, 4, 3]):
        part = generate(ToyRagged(), [PROMPTS[i] for i in order], cfg, eos_token_id=0,
                        row_seeds=[SEEDS[i] for i in order], check_every=5)
        assert part.completion_ids == [full.completion_ids[i] for i in order]


def test_a_rank_whose_rows_are_done_keeps_calling_until_every_rank_is():
    """``sync`` says another rank is still running: the loop keeps one finished row, makes the
    same number of decode calls as the other rank (up to max_new_tokens) and returns the same
    completions as alone."""
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=9, stop_token_ids=tuple(range(1, V)))
    alone = generate(ToyRagged(), PROMPTS[:2], cfg, eos_token_id=0, row_seeds=SEEDS[:2])
    assert max(len(c) for c in alone.completion_ids) <= 2  # every token but 0 stops
    toy = ToyRagged()
    synced = generate(toy, PROMPTS[:2], cfg, eos_token_id=0, row_seeds=SEEDS[:2],
                      sync=lambda value, op: 0, check_every=2)
    assert synced.completion_ids == alone.completion_ids
    assert toy.decode_calls == cfg.max_new_tokens - 1 and toy.batch_sizes[-1] == 1


def test_left_pad():
    tokens, pads = left_pad([[1, 2], [3], [4, 5, 6]], "cpu")
    assert tokens.tolist() == [[0, 1, 2], [0, 0, 3], [4, 5, 6]] and pads.tolist() == [1, 2, 0]


def test_row_uniforms_are_the_generators_one_at_a_time_draws():
    u = row_uniforms([7, 8], 5)
    for row, seed in zip(u, (7, 8)):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(row, torch.cat([torch.rand(1, generator=g, dtype=torch.float64)
                                           for _ in range(5)]))


@pytest.mark.parametrize("kw, match", [
    (dict(check_every=0), r"check_every must be an int >= 1, got 0"),
    (dict(record_routing=True), r"record_routing: .* cannot record routing"),
])
def test_bad_arguments(kw, match):
    from tests.rollout.test_sampler import ToyDecoder

    cfg = SamplingConfig(max_new_tokens=3)
    dec = ToyRagged() if "check_every" in kw else ToyDecoder()
    with pytest.raises(ValueError, match=match):
        generate(dec, PROMPTS, cfg, eos_token_id=0, row_seeds=SEEDS, **kw)


# ----------------------------------------------------------------------------- host syncs

_SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero",
             "aten::masked_select", "aten::bincount", "aten::_unique2"}


def _caller() -> str:
    """File of the innermost frame outside torch (who asked torch for the value)."""
    f = sys._getframe(3)  # past _caller, _note and the wrapper / __torch_dispatch__
    while f is not None and "/torch/" in f.f_code.co_filename:
        f = f.f_back
    return "" if f is None else f.f_code.co_filename


class HostReads(TorchDispatchMode):
    """Records every host read issued by r1fast.rollout code (``.item()``/``int()``/``bool()``,
    ``nonzero``, ``.tolist()``, ``.cpu()``), with the number of decode calls made so far.
    On a CPU nothing waits; on a GPU each of these would stall the stream."""

    def __init__(self, monkeypatch, toy):
        super().__init__()
        self.toy, self.reads = toy, []
        for name in ("item", "tolist", "cpu", "numpy"):
            original = getattr(torch.Tensor, name)

            def wrapper(t, *a, _name=name, _orig=original, **kw):
                self._note(f"Tensor.{_name}")
                return _orig(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, wrapper)

    def _note(self, what: str) -> None:
        if "/r1fast/rollout/" in _caller():
            self.reads.append((self.toy.decode_calls, what))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in _SYNC_OPS:
            self._note(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_no_host_read_between_checks(monkeypatch):
    """Every host read of the loop happens at a check (once per ``check_every`` decode calls)
    or after the last call; none per token."""
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=24, stop_token_ids=(5,))
    toy = ToyRagged(seed=3)
    prompts, seeds = PROMPTS * 2, list(range(10))
    with HostReads(monkeypatch, toy) as rec:
        out = generate(toy, prompts, cfg, eos_token_id=0, row_seeds=seeds, check_every=4)
    calls = toy.decode_calls
    assert calls >= 8 and max(len(c) for c in out.completion_ids) > 8
    in_loop = [(c, w) for c, w in rec.reads if c < calls]
    # the check after step s (every 4th) comes after decode call s: calls 3, 7, 11, ...
    assert in_loop and all((c + 1) % 4 == 0 for c, _ in in_loop), in_loop
    assert len(in_loop) <= 2 * ((calls + 1) // 4)  # the live count; nonzero if rows finished


# ----------------------------------------------------------------------------- the MoE policy

@pytest.fixture(scope="module")
def policy():
    from r1fast.policy.config import ModelConfig, ParallelConfig
    from r1fast.policy.model import build_policy
    from r1fast.policy.parallel import destroy_parallel
    from tests.rollout.test_kv_cache import sharpen

    yield sharpen(build_policy(ModelConfig.preset("tiny-moe"), ParallelConfig(), seed=0,
                               trainable=False))
    destroy_parallel()


def _policy_prompts(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 30, (n,), generator=g).tolist()
    return [torch.randint(0, 256, (k,), generator=g).tolist() for k in lens]


def test_kv_cache_ragged_loop_equals_recomputation_at_shared_positions(policy):
    """Left-padded prefill + per-row positions + dropped rows (KVCacheDecoder) against the
    shared-position loop over whole-prefix recomputation: the same completions and log-probs,
    with many early stops (a seventh of the vocabulary stops)."""
    from r1fast.rollout.kv_cache import KVCacheDecoder
    from r1fast.rollout.recompute import RecomputeDecoder

    prompts, seeds = _policy_prompts(), list(range(100, 112))
    cfg = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=10,
                         stop_token_ids=tuple(range(0, 256, 7)))
    kv = KVCacheDecoder(policy)
    a = generate(kv, prompts, cfg, eos_token_id=1, row_seeds=seeds, check_every=2)
    b = generate(RecomputeDecoder(policy), prompts, cfg, eos_token_id=1, row_seeds=seeds)
    assert a.completion_ids == b.completion_ids and a.truncated == b.truncated
    lengths = [len(c) for c in a.completion_ids]
    assert min(lengths) < 4 and max(lengths) > 5 and kv.batch_size < len(prompts)
    for x, y in zip(a.logprobs, b.logprobs):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=0, atol=1e-5)
    # any batch, any order: row i's completion is a function of its prompt and seed
    order = [7, 2, 11, 0]
    part = generate(KVCacheDecoder(policy), [prompts[i] for i in order], cfg, eos_token_id=1,
                    row_seeds=[seeds[i] for i in order], check_every=5)
    assert part.completion_ids == [a.completion_ids[i] for i in order]


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dsv3-mla"])
def test_kv_cache_loop_reads_the_host_only_at_checks(policy, monkeypatch, preset):
    """The rollout code (r1fast/rollout: loop, sampler, decoder; MLA's latent attention too)
    reads device values on the host only at the checks; megatron's own reads (its MoE
    dispatcher) are not counted."""
    from r1fast.policy.config import ModelConfig, ParallelConfig
    from r1fast.policy.model import build_policy
    from r1fast.rollout.kv_cache import KVCacheDecoder
    from tests.rollout.test_kv_cache import sharpen

    if preset != "tiny-moe":  # the same single-rank layout as the module's policy
        policy = sharpen(build_policy(ModelConfig.preset(preset), ParallelConfig(), seed=0,
                                      trainable=False))

    class Counting(KVCacheDecoder):
        decode_calls = 0

        def decode(self, tokens, dest=None):
            self.decode_calls += 1
            return super().decode(tokens, dest)

    dec = Counting(policy)
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=12, stop_token_ids=(3,))
    generate(dec, _policy_prompts(4), cfg, eos_token_id=1, row_seeds=[1, 2, 3, 4])  # warm-up
    dec.decode_calls = 0
    with HostReads(monkeypatch, dec) as rec:
        generate(dec, _policy_prompts(4), cfg, eos_token_id=1, row_seeds=[1, 2, 3, 4],
                 check_every=4, record_routing=True)
    assert dec.decode_calls == cfg.max_new_tokens - 1  # stop id 3 is rare: no early end
    in_loop = [(c, w) for c, w in rec.reads if c < dec.decode_calls]
    assert in_loop and all((c + 1) % 4 == 0 for c, _ in in_loop), in_loop


class BrokenRagged(ToyRagged):
    """ToyRagged whose logits of every row turn NaN at the second decode call."""

    def decode(self, tokens, dest=None):
        out = super().decode(tokens, dest)
        return out.fill_(float("nan")) if self.decode_calls == 2 else out


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_nan_logits_in_the_ragged_loop_are_an_error(temperature):
    """The ragged loop sampled NaN logits as id 0 with a NaN log-prob, and went on."""
    cfg = SamplingConfig(temperature=temperature, max_new_tokens=6)
    with pytest.raises(FloatingPointError, match=r"of 2 of 2 rows \(first: row 0, generated "
                                                 r"token 2\)"):
        generate(BrokenRagged(), [[1, 2], [3, 4, 5]], cfg, eos_token_id=V + 1, row_seeds=[3, 4])
