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
from r1fast.rollout.engine import stream_seed
from r1fast.rollout.sampler import SamplingConfig, check_prompt_room, generate


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
                      sampling: SamplingConfig, seed: int = 0, batch_rows: int = 64,
                      dp_group=None, decoder_options: dict | None = None) -> Samples:
    """``k`` completions per prompt and which were cut at ``max_new_tokens``, rows generated
    ``batch_rows`` at a time.

    Row ``j`` of prompt ``i`` uses the random stream ``(seed, i, j)``, so results do not depend
    on batching nor on how the rows are shared. A policy over several processes needs every
    one of them to call this with the same prompts (its forwards are collective); the loop
    lengths are agreed between them. ``dp_group``: the data-parallel group of policy replicas,
    which share the rows (replica r takes rows r, r + size, ...) and then exchange them, so
    every process returns all of them at 1/size of the generation time.
    ``decoder_options``: :func:`~r1fast.rollout.kv_cache.make_decoder`'s keywords (a run's
    ``rollout`` settings: prefill slicing, expert kernels). Every prompt must leave room for
    ``max_new_tokens`` in the model's positions (checked before anything is sampled). The
    tokenizer's stop ids are added to ``sampling``'s, and its vocabulary bounds what is drawn.
    """
    from r1fast.rollout.kv_cache import make_decoder
    from r1fast.train.batch import all_ranks_int

    limit = tokenizer.vocab_size if sampling.vocab_limit is None \
        else min(sampling.vocab_limit, tokenizer.vocab_size)
    stops = tuple(dict.fromkeys((*sampling.stop_token_ids, *tokenizer.stop_ids)))
    sampling = SamplingConfig(**{**sampling.__dict__, "vocab_limit": limit,
                                 "stop_token_ids": stops})
    rows = [(i, j) for i in range(len(prompts)) for j in range(k)]
    mine, padding = _replica_share(rows, dp_group)
    encoded = [tokenizer.encode(p, add_bos=True) for p in prompts]
    positions = policy.model_cfg.max_position_embeddings
    check_prompt_room([len(ids) for ids in encoded], positions - sampling.max_new_tokens,
                      limits=f"max_position_embeddings={positions} leaves beside "
                             f"max_new_tokens={sampling.max_new_tokens}",
                      fix="lower max_new_tokens (--max-new-tokens) or leave those problems out")
    done: dict[tuple[int, int], tuple[str, bool]] = {}
    decoder = make_decoder(policy, **(decoder_options or {}))
    for start in range(0, len(mine), batch_rows):
        chunk = mine[start:start + batch_rows]
        seeds = [stream_seed(seed, i, j) for i, j in chunk]
        ro = generate(decoder, [encoded[i] for i, _ in chunk], sampling,
                      eos_token_id=tokenizer.eos_id, row_seeds=seeds, sync=all_ranks_int)
        for n, (row, ids, truncated) in enumerate(zip(chunk, ro.completion_ids, ro.truncated),
                                                  start):
            if n < len(mine) - padding:
                done[row] = (tokenizer.decode(ids), bool(truncated))
    if dp_group is not None:
        import torch.distributed as dist

        shares: list = [None] * dist.get_world_size(dp_group)
        dist.all_gather_object(shares, done, group=dp_group)
        done = {row: v for share in shares for row, v in share.items()}
    return Samples(texts=[[done[i, j][0] for j in range(k)] for i in range(len(prompts))],
                   truncated=[[done[i, j][1] for j in range(k)] for i in range(len(prompts))])


def _replica_share(rows: list[tuple[int, int]], dp_group) -> tuple[list[tuple[int, int]], int]:
    """This replica's rows (every ``size``-th from its rank) and how many copies of one of
    them pad the list to the same length on every replica: the replicas must run the same
    number of generation batches, whose steps are collective (expert parallelism exchanges
    tokens between them); the copies' results are dropped."""
    if dp_group is None or not rows:
        return rows, 0
    import torch.distributed as dist

    rank, size = dist.get_rank(dp_group), dist.get_world_size(dp_group)
    mine = rows[rank::size]
    padding = -(-len(rows) // size) - len(mine)
    return mine + [mine[-1] if mine else rows[0]] * padding, padding
