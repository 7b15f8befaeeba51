"""Loading a saved model folder and sampling from it: what evaluation, rejection sampling and
distillation share.

A model folder (written by :func:`r1fast.train.policy_io.save_model`, the GRPO stage, or any
Hugging Face ``save_pretrained``) holds safetensors, ``config.json`` / ``r1fast_config.json``
(the architecture) and the tokenizer (r1fast's character tokenizer or a Hugging Face one, whose
stop tokens end the samples).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from r1fast.data import load_tokenizer
from r1fast.rollout.sampler import SamplingConfig, generate


def load_model(path: str | Path, parallel=None):
    """``(policy, tokenizer)`` of a model folder, frozen (no optimizer)."""
    from r1fast.policy import ParallelConfig, build_policy, load_hf_checkpoint
    from r1fast.policy.hf_checkpoint import load_model_config

    path = Path(path)
    cfg = load_model_config(str(path))
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"model folder {path}: the tokenizer has {tokenizer.vocab_size} tokens "
                         f"but the model's vocab_size is {cfg.vocab_size}")
    policy = build_policy(cfg, parallel or ParallelConfig(), trainable=False)
    load_hf_checkpoint(policy, str(path))
    return policy, tokenizer


@dataclass(kw_only=True)
class Samples:
    """Completions of :func:`sample_with_flags`, indexed ``[prompt][sample]``."""

    texts: list[list[str]]
    """Decoded completions (the stop token excluded)."""
    truncated: list[list[bool]]
    """True where generation hit ``max_new_tokens`` before a stop token: the text is cut."""


def sample(policy, tokenizer, prompts: Sequence[str], k: int, sampling: SamplingConfig,
           seed: int = 0, batch_rows: int = 64) -> list[list[str]]:
    """``k`` completions (decoded text) per prompt: :func:`sample_with_flags`'s texts."""
    return sample_with_flags(policy, tokenizer, prompts, k, sampling, seed, batch_rows).texts


def sample_with_flags(policy, tokenizer, prompts: Sequence[str], k: int,
                      sampling: SamplingConfig, seed: int = 0, batch_rows: int = 64) -> Samples:
    """``k`` completions per prompt and which were cut at ``max_new_tokens``, rows generated
    ``batch_rows`` at a time.

    Row ``j`` of prompt ``i`` uses the random stream ``(seed, i, j)``, so results do not depend
    on batching. A policy over several processes needs every one of them to call this with the
    same prompts (its forwards are collective); the loop lengths are agreed between them.
    """
    from r1fast.rollout.kv_cache import make_decoder
    from r1fast.train.batch import all_ranks_int

    sampling = SamplingConfig(**{**sampling.__dict__, "vocab_limit": tokenizer.vocab_size,
                                 "stop_token_ids": tuple(tokenizer.stop_ids)})
    rows = [(i, j) for i in range(len(prompts)) for j in range(k)]
    encoded = [tokenizer.encode(p, add_bos=True) for p in prompts]
    out: list[list[str]] = [[""] * k for _ in prompts]
    cut = [[False] * k for _ in prompts]
    decoder = make_decoder(policy)
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start:start + batch_rows]
        seeds = [hash((seed, i, j)) & 0x7FFF_FFFF_FFFF_FFFF for i, j in chunk]
        ro = generate(decoder, [encoded[i] for i, _ in chunk], sampling,
                      eos_token_id=tokenizer.eos_id, row_seeds=seeds, sync=all_ranks_int)
        for (i, j), ids, truncated in zip(chunk, ro.completion_ids, ro.truncated):
            out[i][j], cut[i][j] = tokenizer.decode(ids), bool(truncated)
    return Samples(texts=out, truncated=cut)
