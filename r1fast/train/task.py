"""What a run trains on: prompts, their tokenizer, and the rewards that score completions.

:func:`build_task` turns the ``[data]`` and ``[reward]`` sections of a recipe into a
:class:`TaskData`: the synthetic task's training split (a resumable :class:`PromptDataset`),
the character tokenizer, and a :class:`RewardRunner` over the weighted reward parts. The reward
name ``accuracy`` means "the checker of the task" (math accuracy for arithmetic, the equation
checker for Countdown), so one recipe section serves every task.
"""
from __future__ import annotations

from typing import Callable, Sequence

from r1fast.data import CharTokenizer, PromptDataset, generate_task, make_prompt
from r1fast.rewards import CompositeReward, RewardRunner, RunnerConfig, get_reward

TASK_REWARD = {"arithmetic": "math_accuracy", "countdown": "countdown"}


class TaskData:
    def __init__(self, examples: Sequence[dict], tokenizer, reward_parts: Sequence[tuple],
                 prompts_per_step: int, seed: int, runner_config: RunnerConfig):
        self.tokenizer = tokenizer
        self.dataset = PromptDataset(list(examples), prompts_per_step, seed=seed)
        self.runner = RewardRunner(CompositeReward(list(reward_parts)), runner_config)
        self.part_names = [name for name, _, _ in reward_parts]

    def next_prompts(self, n: int, dp: int, dp_rank: int) -> list[dict]:
        """This DP rank's slice of the next ``n`` prompts (every rank draws the same batch)."""
        if n % dp != 0:
            raise ValueError(f"data.prompts_per_step ({n}) must be divisible by the data parallel "
                             f"size ({dp})")
        batch = self.dataset.next_batch()
        k = n // dp
        return batch[dp_rank * k:(dp_rank + 1) * k]

    def score(self, texts: Sequence[str], examples: Sequence[dict]) -> dict[str, list[float]]:
        """``{"total": [...], <part>: [...]}`` per completion."""
        out = self.runner(list(texts), list(examples))
        return {"total": list(out.total), **{k: list(v) for k, v in out.parts.items()}}

    def failure_metrics(self) -> dict[str, float]:
        m = self.runner.metrics()
        return {k: m.get(f"rewards/{k}", 0.0) for k in ("errors", "timeouts", "crashes")}

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)

    def close(self) -> None:
        self.runner.close()


def reward_parts(task: str, weights: dict[str, float]) -> list[tuple[str, Callable, float]]:
    parts = []
    for name, w in weights.items():
        registered = TASK_REWARD[task] if name == "accuracy" else name
        parts.append((name, get_reward(registered), float(w)))
    return parts


def build_task(cfg, reward: Callable | None = None) -> TaskData:
    """TaskData for a :class:`~r1fast.train.config.TrainConfig` (``reward`` replaces the
    recipe's reward parts, e.g. a custom function from the Python API)."""
    d, r = cfg.data, cfg.reward
    examples = generate_task(d.task, d.num_train, split="train", seed=d.seed, **d.task_options)
    if d.template is not None:
        for ex in examples:
            ex["prompt"] = make_prompt(ex["question"], d.template)
    parts = reward_parts(d.task, r.weights) if reward is None else [("custom", reward, 1.0)]
    runner_cfg = RunnerConfig(mode="inline" if r.workers == 0 else "auto",
                              num_workers=max(r.workers, 1), timeout_s=r.timeout_s)
    return TaskData(examples, CharTokenizer(), parts, d.prompts_per_step, d.seed, runner_cfg)
