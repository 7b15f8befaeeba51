"""Rule-based and model-based rewards for R1-style RL, and their sandboxed execution.

A reward is any callable ``(completion: str, example: dict) -> float``; ``example`` holds the
ground truth (``answer``, ``numbers``/``target``, ...). Provided: :class:`MathAccuracyReward`,
:class:`CountdownReward`, :class:`FormatReward`, :class:`LanguageReward`,
:class:`RewardModelReward`; :class:`CompositeReward` sums weighted parts; :func:`get_reward`
builds one by name; :class:`RewardRunner` scores batches in killable worker processes with
per-call timeouts and counts every failure instead of crashing.

Importing this package needs neither torch nor math-verify (they load when first used).
"""
from r1fast.rewards.arith import ArithConfig, ArithError, evaluate
from r1fast.rewards.compose import CompositeReward, RewardPart, reward_name
from r1fast.rewards.countdown import CountdownReward, CountdownRewardConfig, check_equation
from r1fast.rewards.extract import extract_answer, last_boxed, split_think, thought_text
from r1fast.rewards.format import FormatReward, FormatRewardConfig, is_well_formed
from r1fast.rewards.language import LanguageReward, LanguageRewardConfig, language_consistency
from r1fast.rewards.math import MathAccuracyReward, MathRewardConfig, answers_equal
from r1fast.rewards.registry import RoutedReward, available_rewards, get_reward, register_reward
from r1fast.rewards.reward_model import RewardModelConfig, RewardModelReward
from r1fast.rewards.runner import RewardOutput, RewardRunner, RunnerConfig
from r1fast.rewards.workers import TaskOutcome, WorkerPool

__all__ = [
    "ArithConfig", "ArithError", "evaluate",
    "CompositeReward", "RewardPart", "reward_name",
    "CountdownReward", "CountdownRewardConfig", "check_equation",
    "extract_answer", "last_boxed", "split_think", "thought_text",
    "FormatReward", "FormatRewardConfig", "is_well_formed",
    "LanguageReward", "LanguageRewardConfig", "language_consistency",
    "MathAccuracyReward", "MathRewardConfig", "answers_equal",
    "available_rewards", "get_reward", "register_reward", "RoutedReward",
    "RewardModelConfig", "RewardModelReward",
    "RewardOutput", "RewardRunner", "RunnerConfig",
    "TaskOutcome", "WorkerPool",
]
