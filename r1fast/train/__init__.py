"""Training the policy: the shared engine and the objectives built on it.

- :class:`TrainEngine` (:mod:`~r1fast.train.engine`): policy + optimizer construction, the
  guarded optimizer step, device-aware data-parallel and last-stage reductions, checkpoint state.
- :class:`GRPOTrainer` (:mod:`~r1fast.train.grpo`): rollout -> rewards -> advantages ->
  log-probs -> update, configured by :class:`TrainConfig` (``load_train_config(recipe, overrides)``
  reads a TOML recipe with ``--section.key=value`` overrides).
- :class:`SFTTrainer` (:mod:`~r1fast.train.sft`): next-token cross-entropy on prompt/completion
  pairs (pre-training, cold start, rejection-sampling SFT, distillation).

Example::

    from r1fast.train import GRPOTrainer, load_train_config

    cfg = load_train_config("recipes/tiny.toml", ["--run.steps=2"])
    rows = GRPOTrainer(cfg).fit()   # one metrics dict per step
"""
from r1fast.train.config import TrainConfig, load_train_config
from r1fast.train.engine import TrainEngine
from r1fast.train.grpo import GRPOTrainer
from r1fast.train.sft import SFTConfig, SFTTrainer

__all__ = ["TrainConfig", "load_train_config", "TrainEngine", "GRPOTrainer", "SFTConfig",
           "SFTTrainer"]
