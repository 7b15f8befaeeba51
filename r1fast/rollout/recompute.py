"""The exact, layout-independent reference decoder: recompute the whole prefix at every step.

:class:`RecomputeDecoder` is a shared-position decoder (``reset`` / ``step``, see
r1fast.rollout.sampler): each step runs the policy on the whole prefix through
:meth:`r1fast.policy.model.Policy.logits` (full ``[B, L, V]`` logits, gathered over TP,
broadcast from the last pipeline stage) and keeps the logits of the new positions. Quadratic in
length and 10-100x slower than the KV cache: it is the tests' reference, and a rollout decoder
only when asked for (``make_decoder(policy, recompute=True)``, which warns).
"""
from __future__ import annotations

import torch


class RecomputeDecoder:
    """``reset(B, max_len)`` allocates the token buffer; ``step(tokens[B, n], offset)`` returns
    the logits ``[B, n, V]`` fp32 (CPU) of positions ``offset .. offset+n-1``. Every rank of the
    model must call ``step`` together (the forward is collective)."""

    def __init__(self, policy) -> None:
        self.policy = policy
        self.buf: torch.Tensor | None = None  # [B, max_len] int64, the prefix so far

    def reset(self, batch_size: int, max_len: int) -> None:
        self.buf = torch.zeros(batch_size, max_len, dtype=torch.long)

    def step(self, tokens: torch.Tensor, offset: int) -> torch.Tensor:
        n = tokens.shape[1]
        self.buf[:, offset: offset + n] = tokens.cpu()
        logits = self.policy.logits(self.buf[:, : offset + n])  # [B, offset + n, V]
        return logits[:, offset: offset + n].float().cpu()
