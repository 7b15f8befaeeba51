"""Will a GRPO recipe fit the GPUs? ``r1fast plan`` answers before anything is launched.

A 30B or 671B MoE run either fits its GPUs or dies out of memory after minutes of start-up.
Every byte a rank holds is a closed formula of the recipe, so the planner answers instantly:

- :mod:`~r1fast.plan.memory`: the memory model. :func:`plan_memory` turns a
  ``TrainConfig`` and a world size into a :class:`MemoryPlan`: per pipeline stage
  (:class:`StagePlan`) the parameters, fp32 gradients, optimizer shard, reference policy,
  saved activations (per recompute mode), log-prob head, rollout KV cache and sampling
  logits, the worst stage's peak and whether it fits; :mod:`~r1fast.plan.activations` holds
  the saved-activation formulas per recompute mode.
- :mod:`~r1fast.plan.measure`: :func:`measure_state_bytes`, :func:`measure_saved_bytes` and
  :func:`measure_peak_saved_bytes` measure a built megatron policy, which is how the tests
  hold the formulas to the real thing.
- :mod:`~r1fast.plan.cli`: the ``r1fast plan RECIPE`` command (:func:`plan_main`) and the
  report (:func:`format_plan`: rich tables or plain columns; ``--json`` for scripts).

    from r1fast.plan import GiB, plan_memory
    from r1fast.train.config import load_train_config

    plan = plan_memory(load_train_config("recipes/qwen3_30b_a3b.toml"), 16, gpu_mem_gib=80)
    print(plan.fits, plan.worst.peak / GiB)

Importing this package does not import megatron-core (only measuring a built policy needs it).
"""
from r1fast.plan.cli import format_plan, plan_main
from r1fast.plan.memory import (DECODERS, RECOMPUTE_MODES, SPECS, GiB, MemoryPlan, PlanOptions,
                                StagePlan, measure_peak_saved_bytes, measure_saved_bytes,
                                measure_state_bytes, plan_memory)

__all__ = ["plan_main", "format_plan", "plan_memory", "MemoryPlan", "StagePlan", "PlanOptions",
           "GiB", "RECOMPUTE_MODES", "DECODERS", "SPECS", "measure_saved_bytes",
           "measure_peak_saved_bytes", "measure_state_bytes"]
