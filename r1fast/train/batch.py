"""From sampled completions to the tensors of a policy update.

A GRPO batch is ``N = prompts x group_size`` sequences ``prompt + completion``. The trainer
predicts token ``t+1`` from position ``t``, so each row becomes ``tokens = seq[:-1]`` and
``targets = seq[1:]``, padded to one length ``L`` (the pipeline sends fixed shapes), with a loss
mask that is 1 exactly on the completion's targets. Dropped rows (dynamic sampling, overlong
filtering) keep their place with an all-zero mask, so shapes and group layout never change,
and the normalisers count only what is kept.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch


@dataclasses.dataclass
class UpdateBatch:
    tokens: torch.Tensor  # [N, L] int64 model input
    targets: torch.Tensor  # [N, L] int64 next tokens (pad where masked)
    mask: torch.Tensor  # [N, L] float32, 1 on completion targets that enter the loss
    rollout_logp: torch.Tensor  # [N, L] float32 sampler log-probs at the completion targets
    advantages: torch.Tensor  # [N] float32
    keep: torch.Tensor  # [N] bool, rows that enter the loss
    lengths: torch.Tensor  # [N] int64 real tokens per row (len(prompt) + len(completion) - 1)
    prompt_lengths: torch.Tensor  # [N] int64 prompt tokens: completion targets start at p - 1

    def rows(self, idx: torch.Tensor | slice) -> "UpdateBatch":
        return UpdateBatch(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))

    @staticmethod
    def cat(batches: Sequence["UpdateBatch"]) -> "UpdateBatch":
        """The rows of ``batches`` one after the other (one padded length L)."""
        return UpdateBatch(*(torch.cat([getattr(b, f.name) for b in batches])
                             for f in dataclasses.fields(UpdateBatch)))

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]


def build_update_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                       rollout_logprobs: Sequence[Sequence[float]], advantages: torch.Tensor,
                       keep: torch.Tensor, pad_id: int, length: int | None = None) -> UpdateBatch:
    """Pad ``prompt + completion`` rows to one length (``length`` or the longest row - 1)."""
    n = len(prompts)
    if not (len(completions) == len(rollout_logprobs) == n == advantages.numel() == keep.numel()):
        raise ValueError("prompts, completions, rollout_logprobs, advantages and keep must have "
                         "one entry per sequence")
    longest = max(len(p) + len(c) for p, c in zip(prompts, completions)) - 1
    L = longest if length is None else length
    if L < longest:
        raise ValueError(f"length {L} is shorter than the longest sequence ({longest})")
    tokens = torch.full((n, L), pad_id, dtype=torch.long)
    targets = torch.full((n, L), pad_id, dtype=torch.long)
    mask = torch.zeros(n, L)
    roll = torch.zeros(n, L)
    for i, (p, c, lp) in enumerate(zip(prompts, completions, rollout_logprobs)):
        seq = torch.tensor(list(p) + list(c), dtype=torch.long)
        m = len(seq) - 1
        tokens[i, :m] = seq[:-1]
        targets[i, :m] = seq[1:]
        if c and bool(keep[i]):
            mask[i, len(p) - 1: m] = 1.0
        roll[i, len(p) - 1: m] = torch.tensor(lp, dtype=torch.float32)
    lengths = torch.tensor([len(p) + len(c) - 1 for p, c in zip(prompts, completions)])
    prompt_lengths = torch.tensor([len(p) for p in prompts])
    return UpdateBatch(tokens, targets, mask, roll, advantages.float(), keep.bool(), lengths,
                       prompt_lengths)


def groups_with_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] bool: rows of groups whose rewards are not all equal (DAPO dynamic sampling)."""
    g = rewards.view(-1, group_size)
    varied = (g.max(-1).values - g.min(-1).values) > 0
    return varied.repeat_interleave(group_size)


def _collective_device() -> torch.device:
    """Where a collective's tensor lives: the current GPU (NCCL takes no CPU tensors), else
    the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def all_ranks_int(value: int, op: str) -> int:
    """min or max (``op``) of an int over every process: shapes the pipeline and collectives
    need equal, and the length of generation loops."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    dev = _collective_device()
    t = torch.tensor([value], dtype=torch.long, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
    return int(t.item())


def _model_parallel_group():
    """This rank's model-parallel group (TP x PP: the ranks that hold the same completions),
    None without one or when it is this rank alone."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        return None
    group = ps.get_model_parallel_group()
    return group if dist.get_world_size(group) > 1 else None


def scores_for_model_parallel_group() -> bool:
    """Whether this rank computes the rule rewards of its model-parallel group: its first
    rank does and :func:`model_parallel_agreed` hands them to the others (on a node of 8
    TP ranks, scoring on each would run every math check 8 times)."""
    import torch.distributed as dist

    group = _model_parallel_group()
    return group is None or dist.get_rank(group) == 0


def model_parallel_agreed(values: dict[str, list[float]]) -> dict[str, list[float]]:
    """``values`` as the first rank of this rank's model-parallel group has them: that rank
    scored the rule rewards (the others hold zeros), and a reward model's scores, computed on
    every rank, must be the same on ranks that train one replica (else their sharded
    gradients disagree). Collective over that group; a no-op without one."""
    import torch.distributed as dist

    group = _model_parallel_group()
    if group is None:
        return values
    keys = sorted(values)  # the same parts on every rank (one config)
    dev = _collective_device()
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=dev)  # [parts, n]
    dist.broadcast(t, dist.get_global_rank(group, 0), group=group)
    return {k: row.tolist() for k, row in zip(keys, t.cpu())}


def rank_prompts(n: int, dp: int, dp_rank: int, mini_batches: int = 1) -> list[int]:
    """The prompts (groups) of a step's ``n`` that data-parallel rank ``dp_rank`` of ``dp``
    holds, as indices into the step's batch, in its local order: its share of each of the
    ``mini_batches`` consecutive mini-batches in turn. Its local mini-batch j (``split_even``
    of its rows) is then its share of a one-rank run's mini-batch j, so every optimizer step
    trains on the same rows at any DP size. Where ``n`` is not a multiple of
    ``mini_batches * dp`` a mini-batch cannot be shared in whole groups: slice ``dp_rank``
    (:func:`mini_batches_follow_dp` says when)."""
    if n % (mini_batches * dp):  # (at dp 1 or one mini-batch, the share below is the slice)
        k = n // dp
        return list(range(dp_rank * k, (dp_rank + 1) * k))
    per, share = n // mini_batches, n // (mini_batches * dp)
    return [j * per + dp_rank * share + t for j in range(mini_batches) for t in range(share)]


def rank_rows(n: int, dp: int, dp_rank: int, mini_batches: int, group_size: int) -> list[int]:
    """The rows (``group_size`` per prompt) of :func:`rank_prompts` in the step's batch."""
    return [p * group_size + j for p in rank_prompts(n, dp, dp_rank, mini_batches)
            for j in range(group_size)]


def mini_batches_follow_dp(n: int, dp: int, mini_batches: int) -> bool:
    """Whether the rows of an optimizer step depend on the DP size (each rank's mini-batch j
    from its own slice, as verl's): ``n`` prompts not a multiple of ``mini_batches * dp``."""
    return dp > 1 and mini_batches > 1 and n % (mini_batches * dp) != 0


def split_even(n: int, parts: int) -> list[slice]:
    """``parts`` contiguous slices of ``range(n)``; n must divide evenly."""
    if parts < 1 or n % parts != 0:
        raise ValueError(f"cannot split {n} rows into {parts} equal parts")
    k = n // parts
    return [slice(i * k, (i + 1) * k) for i in range(parts)]
