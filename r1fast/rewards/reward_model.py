"""Reward-model reward: a learned scalar score, for R1's final all-scenario RL stage.

R1's fourth stage scores general (non-verifiable) prompts with reward models for helpfulness
and harmlessness. :class:`RewardModelReward` wraps any model into the common reward signature:

- with a tokenizer (anything with ``encode(str) -> list[int]``, e.g.
  :class:`r1fast.data.tokenizer.CharTokenizer`), texts are encoded, cut to their LAST
  ``max_length`` tokens (the answer is at the end), right-padded with the tokenizer's pad id
  into ``input_ids`` [B, T] and ``attention_mask`` [B, T], and the model is called as
  ``model(input_ids, attention_mask)`` (or ``model(input_ids)``); it must return [B], [B, 1],
  or an object whose ``.logits`` is one of those (a Hugging Face sequence classifier);
- without a tokenizer the model is called on the list of texts and returns B numbers.

Scoring runs in batches of ``batch_size`` under ``torch.no_grad`` in the calling process (the
model lives there, on its device), so the runner treats it as a batched, in-process reward.
torch is imported only when a batch is scored.

``sync`` is for models whose forward is collective over several processes (a megatron model
under expert or pipeline parallelism, :mod:`r1fast.train.reward_model_io`): each process
counts its batches, ``sync(count)`` (called before the first batch) returns the largest count
over the processes, and a process with fewer batches calls the model on empty batches (an empty text list, or ``[0, 1]``
id/mask tensors) until it has made as many calls as the others; the model must return no
scores for them. Named in a recipe (``[reward] reward_model = FOLDER``), a trained reward
model is loaded by :func:`r1fast.train.reward_model_io.load_reward_model`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence
from r1fast.checks import check_range


@dataclass(frozen=True)
class RewardModelConfig:
    """Batching, truncation and scaling of a reward model."""

    batch_size: int = 16
    """Texts per model call."""
    max_length: int = 1024
    """Tokens per text; longer texts keep their last ``max_length`` tokens."""
    include_prompt: bool = True
    """Score ``example[prompt_key] + completion`` rather than the completion alone."""
    prompt_key: str = "prompt"
    """Field of the example holding the prompt text."""
    pass_attention_mask: bool = True
    """Call ``model(input_ids, attention_mask)``; False: ``model(input_ids)``."""
    scale: float = 1.0
    """The reward is ``scale * score + bias``."""
    bias: float = 0.0
    """See ``scale``."""

    def __post_init__(self):
        check_range("batch_size", self.batch_size, 1)
        check_range("max_length", self.max_length, 1)
        if not (math.isfinite(self.scale) and math.isfinite(self.bias)):
            raise ValueError(f"scale and bias must be finite, got {self.scale}, {self.bias}")


class RewardModelReward:
    """Scores ``(completion, example)`` pairs with ``model``; see the module docstring."""

    name = "reward_model"
    sandbox = False  # the model lives in this process; batching matters more than isolation
    batched = True

    def __init__(self, model: Callable[..., Any], tokenizer: Any = None,
                 config: RewardModelConfig | None = None, *,
                 sync: Callable[[int], int] | None = None, **overrides):
        if not callable(model):
            raise ValueError(f"model must be callable (a torch module or a function), got {type(model).__name__}")
        if tokenizer is not None and not callable(getattr(tokenizer, "encode", None)):
            raise ValueError("tokenizer must have an encode(str) -> list[int] method")
        base = config or RewardModelConfig()
        self.config = replace(base, **overrides) if overrides else base
        if sync is not None and not callable(sync):
            raise ValueError(f"sync must be callable (int -> int) or None, got {type(sync).__name__}")
        self.model, self.tokenizer, self.sync = model, tokenizer, sync

    def _text(self, completion: str, example: dict) -> str:
        if not self.config.include_prompt:
            return completion
        key = self.config.prompt_key
        if key not in example:  # it was scored as an empty prompt, without a word
            raise ValueError(f"reward model: the example has no {key!r} (the prompt scored "
                             f"before the completion; include_prompt=False scores completions "
                             f"alone), got keys {sorted(example)}")
        return str(example[key]) + completion

    def _device(self):
        params = getattr(self.model, "parameters", None)
        if callable(params):
            for p in params():
                return p.device
        return None

    def _pad_id(self) -> int:
        for attr in ("pad_id", "pad_token_id"):
            v = getattr(self.tokenizer, attr, None)
            if isinstance(v, int):
                return v
        return 0

    def _run(self, texts: list[str]) -> list[float]:
        import torch

        if self.tokenizer is None:
            with torch.no_grad():
                out = self.model(texts)
        else:
            ids = [list(self.tokenizer.encode(t))[-self.config.max_length:] for t in texts]
            longest = max(1, max((len(x) for x in ids), default=0))
            input_ids = torch.full((len(ids), longest), self._pad_id(), dtype=torch.long)  # [B, T]
            mask = torch.zeros((len(ids), longest), dtype=torch.long)  # [B, T]
            for row, seq in enumerate(ids):
                input_ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[row, :len(seq)] = 1
            device = self._device()
            if device is not None:
                input_ids, mask = input_ids.to(device), mask.to(device)
            with torch.no_grad():
                out = self.model(input_ids, mask) if self.config.pass_attention_mask else self.model(input_ids)
        out = getattr(out, "logits", out)
        scores = torch.as_tensor(out).detach().to(device="cpu", dtype=torch.float32)
        if scores.dim() == 2 and scores.shape[1] == 1:
            scores = scores[:, 0]
        if scores.shape != (len(texts),):
            raise ValueError(f"reward model output must have shape [{len(texts)}] or [{len(texts)}, 1], "
                             f"got {list(scores.shape)}")
        return [self.config.scale * float(s) + self.config.bias for s in scores]

    def score_batch(self, completions: Sequence[str], examples: Sequence[dict]) -> list[float]:
        """One score per pair, computed ``batch_size`` texts at a time."""
        if len(completions) != len(examples):
            raise ValueError(f"completions and examples must have the same length, got "
                             f"{len(completions)} and {len(examples)}")
        texts = [self._text(c, e) for c, e in zip(completions, examples)]
        bs = self.config.batch_size
        batches = [texts[i:i + bs] for i in range(0, len(texts), bs)]
        if self.sync is not None:  # agree first (before any collective forward), then pad
            batches += [[]] * (int(self.sync(len(batches))) - len(batches))
        out: list[float] = []
        for batch in batches:
            out.extend(self._run(batch))
        return out

    def __call__(self, completion: str, example: dict) -> float:
        return self.score_batch([completion], [example])[0]
