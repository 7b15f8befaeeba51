"""Batches of prompts with a resumable position.

The RL trainer draws a batch of examples per step, forever, and must continue from exactly the
same place after a checkpoint restore. :class:`PromptDataset` walks the examples epoch after
epoch, each epoch in its own deterministic order (a permutation seeded by ``(seed, epoch)``,
so it depends on nothing but those two numbers), and its whole position is two integers:
``state_dict() -> {"epoch", "position", ...}``. ``load_state_dict`` checks that the examples are
the same ones (count and a fingerprint of their ids/prompts) before resuming.
:class:`RowStream` is the same walk for trainers that take fixed-size batches across epoch
ends (SFT, the reward model): its state is one integer.
"""
from __future__ import annotations

import hashlib
import random
from typing import Iterator, Sequence


def _fingerprint(examples: Sequence[dict]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(str(ex.get("id", ex.get("prompt", ""))).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def epoch_order(num_rows: int, seed: int, epoch: int) -> list[int]:
    """Epoch ``epoch``'s permutation of ``range(num_rows)``: a function of the three numbers
    only (string seeding is stable across processes and Python versions)."""
    order = list(range(num_rows))
    random.Random(f"r1fast/dataset/{seed}/{epoch}").shuffle(order)
    return order


class RowStream:
    """Row indices drawn without replacement: epoch after epoch, each a fresh
    :func:`epoch_order`, read in order; a batch may straddle two epochs (Megatron's samplers
    do the same). Its whole state is ``position``, the rows handed out so far, so a trainer
    resumes by setting it (``steps * batch_size`` when the batch size is fixed)."""

    def __init__(self, num_rows: int, seed: int):
        if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 1:
            raise ValueError(f"num_rows must be an int >= 1, got {num_rows!r}")
        self.num_rows, self.seed, self.position = num_rows, int(seed), 0
        self._epoch, self._order = -1, []

    def take(self, k: int) -> list[int]:
        """The next ``k`` row indices."""
        out = []
        while len(out) < k:
            epoch, at = divmod(self.position, self.num_rows)
            if epoch != self._epoch:
                self._epoch, self._order = epoch, epoch_order(self.num_rows, self.seed, epoch)
            got = self._order[at:at + k - len(out)]
            out += got
            self.position += len(got)
        return out


class PromptDataset:
    """Endless batches of ``batch_size`` examples.

    ``drop_last=True`` (default) skips an epoch's final partial batch so every batch has the
    same size; ``shuffle=False`` keeps the given order.
    """

    def __init__(self, examples: Sequence[dict], batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True):
        if not isinstance(examples, Sequence) or len(examples) == 0:
            raise ValueError("examples must be a non-empty sequence of dict")
        for i, ex in enumerate(examples):
            if not isinstance(ex, dict):
                raise ValueError(f"examples[{i}] must be a dict, got {type(ex).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if drop_last and batch_size > len(examples):
            raise ValueError(f"batch_size must be <= the number of examples ({len(examples)}) with "
                             f"drop_last=True, got {batch_size}")
        self.examples = list(examples)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, int(seed), drop_last
        self.fingerprint = _fingerprint(self.examples)
        self.epoch = 0
        self.position = 0  # index into this epoch's order of the next example to hand out
        self._order_epoch = -1
        self._order: list[int] = []

    def __len__(self) -> int:
        """Batches per epoch."""
        n, b = len(self.examples), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def _order_for(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            n = len(self.examples)
            order = epoch_order(n, self.seed, epoch) if self.shuffle else list(range(n))
            self._order, self._order_epoch = order, epoch
        return self._order

    def next_batch(self) -> list[dict]:
        """The next batch; moves to the next epoch when this one is used up."""
        n = len(self.examples)
        remaining = n - self.position
        if remaining <= 0 or (self.drop_last and remaining < self.batch_size):
            self.epoch, self.position = self.epoch + 1, 0
        order = self._order_for(self.epoch)
        idx = order[self.position:self.position + self.batch_size]
        self.position += len(idx)
        return [self.examples[i] for i in idx]

    def __iter__(self) -> Iterator[list[dict]]:
        """Endless batches (the trainer decides when to stop)."""
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "num_examples": len(self.examples),
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s position; the examples must be the ones it was saved with."""
        for key in ("epoch", "position", "seed", "num_examples", "fingerprint"):
            if key not in state:
                raise ValueError(f"state must have key {key!r}, got keys {sorted(state)}")
        if state["num_examples"] != len(self.examples) or state["fingerprint"] != self.fingerprint:
            raise ValueError(f"state is for a different dataset (num_examples={state['num_examples']}, "
                             f"fingerprint={state['fingerprint']}); this one has {len(self.examples)} "
                             f"examples, fingerprint {self.fingerprint}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.examples):
            raise ValueError(f"state epoch must be >= 0 and position in [0, {len(self.examples)}], "
                             f"got epoch={epoch}, position={position}")
        self.seed, self.epoch, self.position = int(state["seed"]), epoch, position
        self._order_epoch = -1
