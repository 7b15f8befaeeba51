"""Training plumbing around the policy: megatron ``DistributedDataParallel`` (contiguous fp32
gradient buffers, bucketed DP reduce-scatter), megatron's distributed optimizer (Adam/SGD whose
fp32 state is sharded over the data-parallel ranks, global grad-norm clipping across TP/PP/EP)
and megatron's ``OptimizerParamScheduler`` (linear warmup, then cosine/linear/constant).

Usage::

    policy = build_policy(model_cfg, parallel_cfg)          # wraps in DDP (trainable=True)
    opt, sched = build_optimizer(policy, OptimConfig(lr=1e-6, clip_grad=1.0, total_steps=100))
    policy.forward_backward(microbatches, loss_fn)
    ok, grad_norm, _ = opt.step(); sched.step(1)

Checkpoints: :func:`optim_state_dict` / :func:`load_optim_state_dict` hold the optimizer state
of this rank's shard (``opt.sharded_state_dict`` is megatron's distributed-checkpoint path) and
the scheduler state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule of the trainer."""

    optimizer: str = "adam"
    """"adam" (AdamW: decoupled weight decay) or "sgd"."""
    lr: float = 1e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of the decay."""
    weight_decay: float = 0.0
    """Decoupled weight decay (not applied to norms and biases, megatron's default grouping)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    sgd_momentum: float = 0.0
    """SGD momentum."""
    clip_grad: float = 1.0
    """Clip the global gradient norm (over all TP/PP/EP/DP shards) to this; 0 disables."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many steps."""
    total_steps: int = 1000
    """Steps of the schedule (the decay ends here), for :func:`build_optimizer`. The trainers
    (GRPO, SFT, reward model) set it to the run's optimizer updates: another value given to
    them is an error."""
    lr_decay_style: str = "constant"
    """After warmup: "constant", "cosine" or "linear" decay to min_lr."""
    use_distributed_optimizer: bool = True
    """Shard the fp32 optimizer state over the data-parallel ranks (ZeRO-1)."""
    max_nonfinite_skips: int = 0
    """Optimizer steps whose loss or global gradient norm is NaN/Inf that may be skipped (each
    with a WARNING; weights, moments and LR unchanged) in a run before it stops with an error."""

    def __post_init__(self):
        self._check_values()

    def _check_values(self) -> None:
        """The checks of single values (run when the config is made, i.e. at load time)."""
        for name in ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
                     "sgd_momentum", "clip_grad"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"OptimConfig: optim.{name} must be a finite number, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"OptimConfig: optim.lr must be > 0, got {self.lr}")
        if self.clip_grad < 0 or self.weight_decay < 0:
            raise ValueError(f"OptimConfig: clip_grad and weight_decay must be >= 0, got "
                             f"optim.clip_grad={self.clip_grad}, "
                             f"optim.weight_decay={self.weight_decay}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1 and self.adam_eps > 0):
            raise ValueError(f"OptimConfig: optim.adam_beta1 and optim.adam_beta2 must be in "
                             f"[0, 1) and optim.adam_eps > 0, got {self.adam_beta1}, "
                             f"{self.adam_beta2}, {self.adam_eps}")
        if self.max_nonfinite_skips < 0:
            raise ValueError(f"OptimConfig: optim.max_nonfinite_skips must be >= 0, got "
                             f"{self.max_nonfinite_skips}")
        # choices too: a recipe's misspelling is an error at load, not after the model is built
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"OptimConfig: optim.optimizer must be one of ('adam', 'sgd'), "
                             f"got {self.optimizer!r}")
        if self.lr_decay_style not in ("constant", "cosine", "linear"):
            raise ValueError(f"OptimConfig: optim.lr_decay_style must be one of ('constant', "
                             f"'cosine', 'linear'), got {self.lr_decay_style!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"OptimConfig: optim.min_lr must be in [0, lr={self.lr}], got "
                             f"{self.min_lr}")
        if self.optimizer == "sgd" and self.use_distributed_optimizer:
            raise ValueError("OptimConfig: megatron's distributed optimizer supports adam only; "
                             "use optim.optimizer='adam' or "
                             "optim.use_distributed_optimizer=false")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) \
                or self.warmup_steps < 0:
            raise ValueError(f"OptimConfig: optim.warmup_steps must be an int >= 0, got "
                             f"{self.warmup_steps!r}")

    def validate(self) -> "OptimConfig":
        self._check_values()
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"OptimConfig: warmup_steps must be in [0, total_steps="
                             f"{self.total_steps}), got {self.warmup_steps}")
        return self


def wrap_ddp(policy, distributed_optimizer: bool = True) -> None:
    """Wrap ``policy.gpt`` in megatron DDP (fp32 grad buffers; no overlap, so the step is
    deterministic) and install megatron's finalize_model_grads in the config. Its buffers are
    laid out for ``distributed_optimizer`` (ZeRO-1), which :func:`build_optimizer` then must
    match."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer, bucket_size=None)
    policy.module = DistributedDataParallel(config=policy.config, ddp_config=ddp_config,
                                            module=policy.gpt)
    policy.config.finalize_model_grads_func = finalize_model_grads
    policy.config.no_sync_func = policy.module.no_sync
    policy.module.train()


def build_optimizer(policy, cfg: OptimConfig):
    """megatron's (distributed) optimizer over ``policy.module`` and its LR scheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    cfg.validate()
    if not hasattr(policy.module, "ddp_config"):
        raise ValueError("build_optimizer: the policy must be trainable (wrapped in DDP)")
    if cfg.use_distributed_optimizer != policy.module.ddp_config.use_distributed_optimizer:
        raise ValueError("build_optimizer: use_distributed_optimizer must match the DDP config "
                         f"({policy.module.ddp_config.use_distributed_optimizer})")
    mc = policy.config
    lr = float(cfg.lr)  # a plain float: megatron saves it, and a resume reads it weights-only
    opt_cfg = OptimizerConfig(
        optimizer=cfg.optimizer, lr=lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        sgd_momentum=cfg.sgd_momentum, clip_grad=cfg.clip_grad,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        bf16=mc.bf16, fp16=mc.fp16, params_dtype=mc.params_dtype)
    optimizer = get_megatron_optimizer(opt_cfg, [policy.module])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if cfg.warmup_steps > 0 else lr, max_lr=lr,
        min_lr=cfg.min_lr, lr_warmup_steps=cfg.warmup_steps, lr_decay_steps=cfg.total_steps,
        lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.total_steps, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=False)
    return optimizer, scheduler


def _sub_optimizers(optimizer) -> list:
    """megatron chains one optimizer per parameter kind (dense, experts)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _shard_params(opt) -> list:
    """The model params whose DP shard this distributed optimizer owns, in its bucket order."""
    return [param for gbuf_range_maps in opt.gbuf_ranges
            for maps in gbuf_range_maps.values() for bucket in maps
            for param in bucket["param_map"]]


def _snapshot(obj: Any) -> Any:
    """A detached copy of every tensor in a nested state (megatron returns live views of the
    parameters and moments, which the next step would overwrite)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


def _init_unstepped_adam(inner) -> None:
    """Give an Adam that has not stepped yet (a checkpoint before the first step, or after
    only skipped non-finite steps) the state torch would create at its first step: zero
    moments and step 0 (megatron's state_dict needs a "step"; resuming from it is identical
    to starting fresh)."""
    if inner is None or not all("betas" in g for g in inner.param_groups):
        return
    if any("step" in st for st in inner.state.values()):
        return
    for group in inner.param_groups:
        for p in group["params"]:
            st = inner.state[p]
            st.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
            st.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))
            st["step"] = torch.tensor(0.0)


def optim_state_dict(optimizer, scheduler) -> dict[str, Any]:
    """This rank's optimizer state (its DP shard of Adam's moments and fp32 params, plus the
    rank-independent parts) and the scheduler state, for ``torch.save`` per rank. Reload it
    with :func:`load_optim_state_dict` into an optimizer built for the same layout."""
    for opt in _sub_optimizers(optimizer):
        _init_unstepped_adam(getattr(opt, "optimizer", None))
    params = []
    for opt in _sub_optimizers(optimizer):
        if hasattr(opt, "gbuf_ranges"):  # distributed: fp32 main param + moments per shard
            params.append([opt._get_main_param_and_optimizer_states(p)
                           for p in _shard_params(opt)])
        else:
            params.append(None)  # non-distributed: the state is inside state_dict()
    return _snapshot({"optimizer": optimizer.state_dict(), "param_state": params,
                      "scheduler": scheduler.state_dict()})


def load_optim_state_dict(optimizer, scheduler, state: dict[str, Any]) -> None:
    """Inverse of :func:`optim_state_dict`."""
    if not isinstance(state, dict) or not {"optimizer", "param_state", "scheduler"} <= set(state):
        raise ValueError("state must be a dict from optim_state_dict() with 'optimizer', "
                         "'param_state' and 'scheduler' entries")
    subs = _sub_optimizers(optimizer)
    if len(state["param_state"]) != len(subs):
        raise ValueError(f"state holds {len(state['param_state'])} optimizer shards, this "
                         f"optimizer has {len(subs)} (built for another model or layout?)")
    optimizer.load_state_dict(state["optimizer"])
    for opt in subs:
        # megatron 0.16 (torch Adam, no apex/TE) gives every parameter's state the SAME "step"
        # tensor; torch Adam increments it in place once per parameter, which would corrupt
        # the bias correction of every later step. One tensor per parameter, as torch makes.
        for param_state in opt.optimizer.state.values():
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"] = param_state["step"].clone()
    for opt, param_state in zip(subs, state["param_state"]):
        if param_state is None:
            continue
        shard = _shard_params(opt)
        if len(shard) != len(param_state):
            raise ValueError(f"state holds {len(param_state)} parameter shards, this optimizer "
                             f"has {len(shard)} (built for another model or layout?)")
        with torch.no_grad():
            for p, tensors in zip(shard, param_state):
                opt._set_main_param_and_optimizer_states(p, tensors)
    load_scheduler_state(scheduler, state["scheduler"])


def load_scheduler_state(scheduler, state: dict[str, Any]) -> None:
    """Restore megatron's ``OptimizerParamScheduler`` from its ``state_dict()``."""
    scheduler.num_steps = 0  # megatron's load_state_dict advances by the saved step count
    scheduler.load_state_dict(state)


def unshard_main_grads(policy) -> None:
    """With the distributed optimizer, DDP reduce-scatters the gradients: after
    ``forward_backward`` each DP rank holds the reduced gradient of its own shard of every
    bucket only. This all-gathers the shards so that every rank's ``param.main_grad`` is the
    full gradient (for inspection, logging or export; the owned shards are unchanged, so an
    optimizer step afterwards is unaffected). A no-op without the distributed optimizer."""
    import torch.distributed as dist
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    ddp = policy.module
    if not ddp.ddp_config.use_distributed_optimizer:
        return
    for buffer in ddp.buffers + ddp.expert_parallel_buffers:
        group = buffer.data_parallel_group
        size, rank = group.size(), group.rank()
        if size == 1:
            continue
        for bucket in buffer.buckets:
            for r, shard in enumerate(shard_buffer(bucket.grad_data, size)):
                if r != rank:
                    shard.zero_()
            dist.all_reduce(bucket.grad_data, group=group)


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
