"""The Megatron-core MoE policy of r1fast.

- :mod:`~r1fast.policy.config`: ``ModelConfig`` (architecture, presets, HF translation) and
  ``ParallelConfig`` (TP/PP/EP/DP layout with validation).
- :mod:`~r1fast.policy.parallel`: start torch.distributed and megatron's parallel state;
  ``init_parallel`` is where :mod:`r1fast.megatron_compat` (the bridges that let
  megatron-core run on CPU/gloo and without Transformer Engine) is installed.
- :mod:`~r1fast.policy.model`: ``build_policy`` -> ``Policy`` (hidden states, vocab-parallel
  log-probs via r1fast.ops.linear_logprob, logits, pipelined forward/backward).
- :mod:`~r1fast.policy.router`: the MoE router calling r1fast.ops.moe_route (with replay hook).
- :mod:`~r1fast.policy.optim`: megatron DDP, distributed optimizer, LR schedule.
- :mod:`~r1fast.policy.hf_checkpoint`: Hugging Face safetensors import/export at any layout.

Importing this package imports neither megatron-core nor Triton; the submodules that need
megatron import it when used.
"""
from r1fast.policy.config import ModelConfig, ParallelConfig

__all__ = ["ModelConfig", "ParallelConfig", "build_policy", "Policy", "OptimConfig",
           "build_optimizer", "load_hf_checkpoint", "save_hf_checkpoint", "init_parallel",
           "destroy_parallel"]

_LAZY = {
    "build_policy": "r1fast.policy.model", "Policy": "r1fast.policy.model",
    "OptimConfig": "r1fast.policy.optim", "build_optimizer": "r1fast.policy.optim",
    "load_hf_checkpoint": "r1fast.policy.hf_checkpoint",
    "save_hf_checkpoint": "r1fast.policy.hf_checkpoint",
    "init_parallel": "r1fast.policy.parallel", "destroy_parallel": "r1fast.policy.parallel",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'r1fast.policy' has no attribute {name!r}")
