import pytest
import torch

from r1fast.rollout.sampler import SamplingConfig, filter_logits, generate, sample_tokens


class ToyDecoder:
    """A causal 'model' whose next-token logits depend on the whole prefix (sum of embeddings),
    with a KV cache (the running prefix) so cached stepping can be checked against recompute."""

    def __init__(self, vocab=11, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(vocab, vocab, generator=g)
        self.calls = 0

    def full_logits(self, tokens):  # [B, n] -> [B, n, V]
        return torch.cumsum(self.emb[tokens], dim=1) + 0.3 * torch.arange(tokens.shape[1])[None, :, None]

    def reset(self, batch, max_len):
        self.cache = torch.zeros(batch, 0, dtype=torch.long)

    def step(self, tokens, offset):
        assert offset == self.cache.shape[1], "tokens must be fed contiguously"
        self.cache = torch.cat([self.cache, tokens], 1)
        self.calls += 1
        return self.full_logits(self.cache)[:, offset:]


def test_generate_matches_recompute_and_respects_prompts():
    dec = ToyDecoder()
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    cfg = SamplingConfig(temperature=0.7, max_new_tokens=6, stop_token_ids=(10,))
    out = generate(dec, prompts, cfg, eos_token_id=0, generator=torch.Generator().manual_seed(1))
    for p, c, lp, tr in zip(prompts, out.completion_ids, out.logprobs, out.truncated):
        assert 1 <= len(c) <= 6 and len(lp) == len(c)
        seq = torch.tensor([p + c])
        ref = torch.log_softmax(dec.full_logits(seq)[0, len(p) - 1: -1] / 0.7, -1)
        ref_lp = ref.gather(-1, torch.tensor(c)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(lp), ref_lp)
        stopped = c[-1] in (0, 10)
        assert tr == (not stopped)
        assert all(t not in (0, 10) for t in c[:-1])


def test_greedy_is_argmax():
    dec = ToyDecoder()
    out = generate(dec, [[1, 2]], SamplingConfig(temperature=0, max_new_tokens=4), eos_token_id=99)
    seq = [1, 2]
    for _ in range(4):
        seq.append(int(dec.full_logits(torch.tensor([seq]))[0, -1].argmax()))
    assert out.completion_ids[0] == seq[2:]
    assert out.truncated == [True]


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 1.0, 2)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, 0.8, 0))
    assert kept.tolist() == [[True, True, False, False]]
    kept = ~torch.isinf(filter_logits(logits, 0.81, 0))
    assert kept.tolist() == [[True, True, True, False]]


def test_sampling_frequencies_follow_truncated_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).repeat(20000, 1)
    tok, lp = sample_tokens(logits, SamplingConfig(top_p=0.8), torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=4).float() / tok.numel()
    torch.testing.assert_close(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.02, rtol=0)
    # recorded log-probs are of the untruncated distribution
    assert torch.allclose(lp[tok == 0], torch.log(torch.tensor(0.5)))


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_k=-1),
                                dict(max_new_tokens=0)])
def test_bad_sampling_config(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplingConfig(**kw)


def test_row_seeds_make_rows_independent_of_batch():
    dec = ToyDecoder()
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=5)
    prompts = [[1, 2], [3], [4, 5, 6], [7], [8, 9, 10, 1]]
    seeds = [11, 12, 13, 14, 15]
    full = generate(dec, prompts, cfg, eos_token_id=0, row_seeds=seeds)
    for part in (slice(2, 5), slice(4, 5), slice(0, 2)):  # other batch-mates, other min length
        alone = generate(dec, prompts[part], cfg, eos_token_id=0, row_seeds=seeds[part])
        assert full.completion_ids[part] == alone.completion_ids
        torch.testing.assert_close(torch.tensor(sum(full.logprobs[part], [])),
                                   torch.tensor(sum(alone.logprobs, [])))


def test_inverse_cdf_sampling_frequencies():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).repeat(20000, 1)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tok, _ = sample_tokens(logits, SamplingConfig(top_k=3), uniforms=u)
    freq = torch.bincount(tok, minlength=4).float() / tok.numel()
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.02, rtol=0)


def test_sync_makes_every_rank_run_the_same_model_calls():
    """With a global prefill length / last position / done flag (as another rank with longer
    prompts would impose), the decoder is called once per global position and the completions
    are the same as without sync."""
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=4, stop_token_ids=(3,))
    prompts, seeds = [[1, 2], [4, 5, 6]], [1, 2]
    alone = generate(ToyDecoder(), prompts, cfg, eos_token_id=0, row_seeds=seeds)

    answers = iter([1, 12])  # the global prefill length (min), the global last position (max)

    def other_rank(value, op):  # afterwards: "all done?" -> the other rank is never done
        return next(answers, 0)

    dec = ToyDecoder()
    synced = generate(dec, prompts, cfg, eos_token_id=0, row_seeds=seeds, sync=other_rank)
    assert synced.completion_ids == alone.completion_ids
    assert dec.calls == 12 - 1  # prefill of 1 token, then one call per position up to 12


@pytest.mark.parametrize("kw, kept", [(dict(top_p=0.8), [0.5, 0.3, 0.0, 0.0]),
                                      (dict(top_k=3), [0.5, 0.3, 0.15, 0.0]),
                                      (dict(top_k=3, vocab_limit=2), [0.5, 0.3, 0.0, 0.0])])
def test_sampled_logprobs_are_of_the_truncated_distribution(kw, kept):
    """logprobs='sampled' records log mu of the distribution sampled from; the tokens are the
    same as with 'full' (the same uniforms), whose log-probs are of the untruncated softmax."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    logits = torch.log(p).float().repeat(64, 1) * 0.7  # temperature 0.7 undoes the 0.7
    u = torch.rand(64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    full_tok, full_lp = sample_tokens(logits, SamplingConfig(temperature=0.7, **kw), uniforms=u)
    tok, lp = sample_tokens(logits, SamplingConfig(temperature=0.7, logprobs="sampled", **kw),
                            uniforms=u)
    assert torch.equal(tok, full_tok)
    mu = torch.tensor(kept, dtype=torch.float64) / sum(kept)
    torch.testing.assert_close(lp.double(), mu.log()[tok], rtol=0, atol=1e-6)
    torch.testing.assert_close(full_lp.double(), p.log()[tok], rtol=0, atol=1e-6)


def test_sampled_logprobs_of_greedy_are_zero():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    tok, lp = sample_tokens(logits, SamplingConfig(temperature=0, logprobs="sampled"))
    assert torch.equal(tok, logits.argmax(-1)) and torch.equal(lp, torch.zeros(5))


def test_bad_logprobs_mode_is_named():
    with pytest.raises(ValueError, match="logprobs must be one of .*'processed'"):
        SamplingConfig(logprobs="processed")


def test_low_probability_ids_late_in_the_vocabulary_can_be_drawn():
    """In an fp32 CDF near 1, an id under half an fp32 step had zero width (tens of thousands
    of a 152k vocabulary could never be sampled); the fp64 CDF gives it its width."""
    V, rare = 151_936, 100_000
    logits = torch.full((1, V), -40.0)
    logits[0, 0], logits[0, rare], logits[0, V - 1] = 0.0, -18.5, -7.0  # p(rare) ~ 9e-9
    p = torch.softmax(logits.double(), -1)[0]
    below = float(p[:rare].sum())  # the CDF just before the rare id
    u = torch.tensor([below + float(p[rare]) / 2], dtype=torch.float64)  # inside its width
    tok, lp = sample_tokens(logits, SamplingConfig(temperature=1.0), uniforms=u)
    assert int(tok) == rare and abs(float(lp) - float(p[rare].log())) < 1e-4


@pytest.mark.parametrize("kw", [dict(), dict(top_p=0.7, vocab_limit=50),
                                dict(top_k=5, logprobs="sampled")])
def test_chunked_sampling_equals_one_chunk(monkeypatch, kw):
    """Rows sampled in chunks (which bound the fp64 CDF's temporaries) give exactly what one
    chunk gives: each row inverts its own CDF at its own uniform."""
    from r1fast.rollout import sampler

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(23, 61, generator=g).to(torch.bfloat16)
    u = torch.rand(23, generator=g, dtype=torch.float64)
    cfg = SamplingConfig(temperature=0.8, **kw)
    whole = sample_tokens(logits, cfg, uniforms=u)
    monkeypatch.setattr(sampler, "SAMPLE_CHUNK_LOGITS", 5 * 61 + 7)  # chunks of 5 rows
    assert sampler.sample_rows_per_chunk(61) == 5
    chunked = sample_tokens(logits, cfg, uniforms=u)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


@pytest.mark.parametrize("rows, chunk_rows, top_p, vocab_limit, dtype", [
    (48, 0, 1.0, None, torch.float32),    # one chunk, no filter: 29 bytes per logit
    (48, 0, 0.9, -3, torch.bfloat16),     # top-p's sort, vocab_limit and a 16-bit input
    (48, 0, 1.0, -3, torch.float32),
    (512, 48, 0.9, -3, torch.float32),    # 11 chunks of <= 48 rows: bounded by one chunk
])
def test_sampling_temporaries_stay_within_the_planned_bytes(monkeypatch, rows, chunk_rows,
                                                            top_p, vocab_limit, dtype):
    """The sampler's peak memory beside its input is at most SAMPLE_BYTES_PER_LOGIT per logit
    of one chunk, what r1fast.plan.memory counts (it was 40-46 bytes per logit of the whole
    batch before rows were chunked and temporaries freed early)."""
    from r1fast.plan.measure import measure_peak_alloc_bytes
    from r1fast.rollout import sampler

    V = 65536
    if chunk_rows:
        monkeypatch.setattr(sampler, "SAMPLE_CHUNK_LOGITS", chunk_rows * V)
    g = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, V, generator=g).to(dtype)
    u = torch.rand(rows, generator=g, dtype=torch.float64)
    cfg = SamplingConfig(temperature=0.9, top_p=top_p,
                         vocab_limit=None if vocab_limit is None else V + vocab_limit)
    _, peak, _ = measure_peak_alloc_bytes(lambda: sample_tokens(logits, cfg, uniforms=u))
    planned = sampler.SAMPLE_BYTES_PER_LOGIT * min(rows, chunk_rows or rows) * V
    # + per-row outputs and vocab_limit's [V] masks
    assert peak <= planned + 64 * rows + 2 * V, (peak / 2**20, planned / 2**20)


class BrokenDecoder(ToyDecoder):
    """ToyDecoder whose logits of ``row`` turn NaN (or +inf) from generated token ``at`` on."""

    def __init__(self, row, at, value=float("nan")):
        super().__init__()
        self.row, self.at, self.value = row, at, value

    def step(self, tokens, offset):
        out = super().step(tokens, offset)
        if self.cache.shape[1] >= 3 + self.at:  # prompts of 3 tokens
            out[self.row] = self.value
        return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(temperature=0.7, top_p=0.9),
                                dict(temperature=0), dict(temperature=0, logprobs="sampled"),
                                dict(temperature=0.7, logprobs="sampled")],
                         ids=["sample", "top_p", "greedy", "greedy-sampled", "sampled"])
def test_broken_logits_are_an_error_not_a_completion(kw, value):
    """NaN logits were sampled as id 0 (the CDF search's first id; greedy: the NaN's own id)
    with a NaN log-prob, and generation went on: a broken checkpoint or KV cache looked like
    a model that writes one token forever."""
    dec = BrokenDecoder(row=1, at=2, value=value)
    cfg = SamplingConfig(max_new_tokens=5, **kw)
    with pytest.raises(FloatingPointError, match=r"NaN or infinite at \d+ sampled tokens of 1 "
                                                 r"of 2 rows \(first: row 1, generated token 2\)"):
        generate(dec, [[1, 2, 3], [4, 5, 6]], cfg, eos_token_id=99, row_seeds=[1, 2])


@pytest.mark.parametrize("kw,match", [(dict(temperature=float("nan")), "finite"),
                                      (dict(temperature=float("inf")), "finite"),
                                      (dict(vocab_limit=0), "vocab_limit must be >= 1"),
                                      (dict(top_k=-1), "vLLM's and verl's -1")])
def test_sampling_values_that_would_sample_garbage_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kw)
