"""The training engine: the policy, its optimizer and the collectives every trainer shares.

GRPO (:mod:`r1fast.train.grpo`), SFT (:mod:`r1fast.train.sft`) and any other objective trained
on the megatron-core policy need the same things, so they live here once:

* construction: the policy at the configured TP/PP/EP layout, megatron's distributed optimizer
  and LR schedule sized to the number of updates, optional initial weights;
* :meth:`TrainEngine.update`: one gradient accumulation over this rank's micro-batches
  (megatron's forward-backward schedule) and a *guarded* optimizer step: the loss and the
  global gradient norm are checked BEFORE any weight changes; a non-finite one skips the step
  (weights, optimizer moments, router expert biases and LR schedule untouched, a WARNING), up to
  ``optim.max_nonfinite_skips`` times in the run, then stops training with an error;
* reductions on the policy's device (NCCL rejects CPU tensors): sums over data-parallel
  replicas, and the metrics that only the last pipeline stage computes, averaged or summed
  over DP and received by every rank;
* checkpoint state: the model and optimizer in megatron's distributed-checkpoint format
  (written by every rank, loadable at any TP/PP/EP/DP layout), this rank's RNG states, and the
  layout-free rest (LR schedule, skip count) for ``meta.json``.

An objective supplies only its batches and a ``loss_fn(hidden, output_weight, micro_batch)``
that returns this micro-batch's share of the global loss (see
:meth:`r1fast.policy.model.Policy.forward_backward`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.optim import (OptimConfig, _sub_optimizers, load_optim_state_dict,
                                 load_scheduler_state, optim_state_dict)
from r1fast.train.checkpoint import rng_state, set_rng_state
from r1fast.train.policy_io import keep_mtp_of_init, load_model_state, model_state

log = logging.getLogger("r1fast.train")


class NonFiniteError(FloatingPointError):
    """Training met more non-finite losses / gradient norms than ``optim.max_nonfinite_skips``."""


@dataclasses.dataclass
class UpdateResult:
    """What one :meth:`TrainEngine.update` returns."""

    metrics: list[dict[str, Any]]
    """The loss function's metrics per micro-batch (last pipeline stage; [] elsewhere)."""
    grad_norm: float
    """Global gradient norm before clipping (the same on every rank)."""
    time_fwd_bwd_s: float
    """Seconds in the forward-backward schedule (on a GPU until its kernels finish)."""
    time_optimizer_s: float
    """Seconds in the optimizer step (on a GPU until its kernels finish)."""
    skipped: bool = False
    """The step was skipped (non-finite loss or gradient norm): nothing changed."""
    lr: float = 0.0
    """The learning rate this update stepped with (read before the schedule advances: the
    engine's ``lr`` afterwards is the next update's)."""


def check_trainable(model: ModelConfig, optim: OptimConfig) -> None:
    """One-line ValueError for the settings a run can train but not checkpoint and resume, or
    cannot train right; before anything is built."""
    if model.params_dtype == "float16":
        raise ValueError("model.params_dtype='float16' cannot be trained here: megatron's fp16 "
                         "optimizer needs a scaled loss, which the guarded step does not "
                         "apply; use 'bfloat16' or 'float32'")
    if optim.optimizer == "sgd":
        raise ValueError("optim.optimizer='sgd' cannot be trained here: megatron-core cannot "
                         "load an SGD checkpoint (no state initialiser for a load), so the run "
                         "could not resume; use 'adam'")
    if not optim.use_distributed_optimizer and model.params_dtype != "float32":
        raise ValueError(f"optim.use_distributed_optimizer=false with model.params_dtype="
                         f"{model.params_dtype!r} cannot be checkpointed: megatron-core's "
                         f"16-bit optimizer maps only 16-bit weights to checkpoint keys and "
                         f"the norm weights are fp32; use the distributed optimizer (at one "
                         f"data-parallel rank it shards nothing)")


def _check_schedule(optim: OptimConfig, updates: int) -> None:
    """The schedule spans the run's ``updates``: a ``total_steps`` given for another length
    was dropped without a word, and a warmup as long as the run stretched silently."""
    if optim.total_steps not in (OptimConfig.total_steps, updates):  # the class default
        raise ValueError(f"optim.total_steps={optim.total_steps} is set by the trainer to the "
                         f"run's {updates} optimizer updates (the LR schedule spans the run); "
                         f"leave it out")
    if optim.warmup_steps >= updates:
        log.warning("optim.warmup_steps=%d >= the run's %d optimizer updates: the LR never "
                    "reaches optim.lr=%g", optim.warmup_steps, updates, optim.lr)


class TrainEngine:
    """The trainable policy of a run with its optimizer (see the module docstring)."""

    def __init__(self, model: ModelConfig, parallel: ParallelConfig, optim: OptimConfig, *,
                 total_updates: int, seed: int, init_from: Optional[str] = None,
                 resuming: bool = False):
        from r1fast.policy import build_optimizer

        check_trainable(model, optim)
        _check_schedule(optim, total_updates)  # before the model: seconds, not minutes
        torch.manual_seed(seed)
        self.policy = self._build_policy(model, parallel, seed, optim.use_distributed_optimizer)
        self.info = self.policy.info
        optim = dataclasses.replace(optim, total_steps=max(total_updates, optim.warmup_steps + 1))
        self.optimizer, self.scheduler = build_optimizer(self.policy, optim)
        self.distributed_optimizer = optim.use_distributed_optimizer
        self._expert_biases = [r.expert_bias for r in self.policy._routers()
                               if r.expert_bias is not None]
        """Aux-loss-free balancing's biases (DeepSeek-V3): megatron moves them inside the
        backward's finalize step, so a skipped step must put them back."""
        self.max_nonfinite_skips = optim.max_nonfinite_skips
        self.nonfinite_skips = 0
        """Steps skipped so far in the run (saved in checkpoints)."""
        if init_from and resuming:  # the checkpoint's weights replace them: read what it lacks
            keep_mtp_of_init(self.policy, init_from, "resume")
        elif init_from:
            self._load_initial_weights(init_from)

    def _build_policy(self, model: ModelConfig, parallel: ParallelConfig, seed: int,
                      distributed_optimizer: bool):
        """The trainable policy (megatron DDP over it, laid out for ``distributed_optimizer``);
        objectives with extra trainable modules (a reward model's head) override this."""
        from r1fast.policy import build_policy

        return build_policy(model, parallel, seed=seed,
                            distributed_optimizer=distributed_optimizer)

    def _load_initial_weights(self, init_from: str) -> None:
        """Weights from a Hugging Face or r1fast checkpoint folder; the optimizer re-copies its
        fp32 master weights from them."""
        load_model_state(self.policy, init_from, self.optimizer)

    # ------------------------------------------------------------------------- training
    def update(self, micro_batches: Sequence[Mapping[str, Any]], loss_fn) -> UpdateResult:
        """Forward-backward over ``micro_batches``, then one guarded optimizer step.

        megatron's ``optimizer.step()`` is unrolled (prepare_grads -> global grad norm -> clip
        -> step_with_ready_grads) so that the loss and the norm are checked before any weight
        changes: a non-finite one skips the step, or raises :class:`NonFiniteError` once more
        than ``optim.max_nonfinite_skips`` steps were skipped."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        t0, lr = time.perf_counter(), self.lr
        if not self.distributed_optimizer:  # (its zero_grad reads .grad of shard views)
            # megatron's plain optimizer leaves each param's .grad pointing at its main_grad
            # after a step: the next backward would add the old gradient in again
            self.optimizer.zero_grad()
        biases = [b.clone() for b in self._expert_biases]
        results = list(self.policy.forward_backward(micro_batches, loss_fn))
        if self.device.type == "cuda":  # the backward's queued kernels count as fwd-bwd time
            torch.cuda.synchronize(self.device)  # (the grad norm below waits for them anyway)
        t1 = time.perf_counter()
        found_inf = bool(self.optimizer.prepare_grads())  # main grads; True only via a scaler
        grad_norm = float(self.optimizer.get_grad_norm() or 0.0)  # global over every shard
        bad_loss = self._any_rank([not math.isfinite(float(r["loss"])) for r in results
                                   if "loss" in r])
        if found_inf or bad_loss or not math.isfinite(grad_norm):
            what = ("non-finite loss" if bad_loss else
                    f"non-finite gradient norm {grad_norm}" if not math.isfinite(grad_norm)
                    else "non-finite gradients (grad scaler)")
            with torch.no_grad():
                for bias, before in zip(self._expert_biases, biases):
                    bias.copy_(before)
            self._skip(what)
            return UpdateResult(results, grad_norm, t1 - t0, time.perf_counter() - t1,
                                skipped=True, lr=lr)
        for opt in _sub_optimizers(self.optimizer):
            params = opt.get_parameters()
            if params and opt.config.clip_grad > 0.0:
                clip_grad_by_total_norm_fp32(
                    params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                    use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        if not self.optimizer.step_with_ready_grads():
            raise FloatingPointError("megatron's optimizer reported a failed step after the "
                                     "finite-value checks passed")
        self.scheduler.step(1)
        if self.device.type == "cuda":  # the step's kernels in its own time, not the next's
            torch.cuda.synchronize(self.device)
        return UpdateResult(results, grad_norm, t1 - t0, time.perf_counter() - t1, lr=lr)

    def _any_rank(self, flags: Sequence[bool]) -> bool:
        """True on every rank when any flag on any rank is True (collective)."""
        t = torch.tensor([float(any(flags))], dtype=torch.float64, device=self.device)
        if self.info.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _skip(self, what: str) -> None:
        self.nonfinite_skips += 1
        if self.nonfinite_skips > self.max_nonfinite_skips:
            raise NonFiniteError(
                f"{what}: training stopped after {self.nonfinite_skips} non-finite step(s) "
                f"(optim.max_nonfinite_skips={self.max_nonfinite_skips}); the weights are those "
                f"of the last finite step. Check optim.lr, the model config and the rewards for "
                f"inf/nan, or allow skips with --optim.max_nonfinite_skips=N")
        log.warning("%s: optimizer step skipped, weights unchanged (%d of at most %d skips, "
                    "optim.max_nonfinite_skips)", what, self.nonfinite_skips,
                    self.max_nonfinite_skips)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------------- reductions
    @property
    def device(self) -> torch.device:
        return self.policy.device

    @property
    def is_logger(self) -> bool:
        """Rank 0 writes metrics, configs and model folders."""
        return self.info.rank == 0

    @property
    def holds_loss_metrics(self) -> bool:
        """This rank's loss metrics count: last pipeline stage, first TP rank (TP ranks hold
        copies)."""
        return bool(self.policy.gpt.post_process) and self.info.tp_rank == 0

    def dp_group(self):
        """The data-parallel group of policy replicas (megatron's), None with one replica."""
        if self.info.dp == 1:
            return None
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group()

    def dp_host_group(self):
        """The data-parallel group for objects: megatron's gloo twin of it under NCCL (an
        object collective over NCCL stages every pickled object on the GPU)."""
        from megatron.core import parallel_state as ps

        group = self.dp_group()
        if group is None or torch.distributed.get_backend(group) == "gloo":
            return group
        return ps.get_data_parallel_group_gloo()

    def dp_all_gather(self, obj) -> list:
        """``obj`` of every data-parallel replica, in rank order (collective)."""
        group = self.dp_host_group()
        if group is None:
            return [obj]
        out: list = [None] * self.info.dp
        torch.distributed.all_gather_object(out, obj, group=group)
        return out

    def dp_exchange(self, outgoing: list) -> list:
        """Objects between the data-parallel replicas: ``outgoing[r]`` goes to replica r
        (this replica's own stays here, unpickled); returns what each replica sent here, in
        rank order (collective: one scatter per replica, over the gloo group)."""
        from r1fast.policy.parallel import exchange_objects

        group = self.dp_host_group()
        return list(outgoing) if group is None else \
            exchange_objects(outgoing, group, self.info.dp_rank)

    def dp_sum(self, values: Sequence[float]) -> list[float]:
        """Sum each value over the data-parallel replicas (fp64)."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        group = self.dp_group()
        if group is not None:
            dist.all_reduce(t, group=group)
        return t.tolist()

    def last_stage_reduce(self, local: Mapping[str, float], keys: Sequence[str],
                          op: str = "mean") -> dict[str, float]:
        """``keys`` of a last-stage metrics dict, summed (``op="sum"``) or averaged over the DP
        replicas; every rank receives the result (collective)."""
        owner = self.holds_loss_metrics
        vals = torch.tensor([float(local.get(k, 0.0)) if owner else 0.0 for k in keys],
                            dtype=torch.float64, device=self.device)
        if self.info.world_size > 1:
            dist.all_reduce(vals)
        if op == "mean":
            vals = vals / self.info.dp
        return dict(zip(keys, vals.tolist()))

    def last_stage_extreme(self, value: Optional[float], op: str) -> float:
        """``"min"`` or ``"max"`` of a last-stage metric over every rank that has it."""
        neutral = float("inf") if op == "min" else float("-inf")
        t = torch.tensor([neutral if value is None else float(value)], dtype=torch.float64,
                         device=self.device)
        if self.info.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
        return float(t.item())

    # ------------------------------------------------------------------------- checkpoints
    def layout(self) -> dict[str, Any]:
        """The parallel layout, as recorded in a checkpoint's meta.json."""
        p, i = self.policy.parallel_cfg, self.info
        return {"world_size": i.world_size, "tp": i.tp, "pp": i.pp, "ep": i.ep, "etp": p.etp,
                "dp": i.dp, "pp_first_stage_layers": p.pp_first_stage_layers,
                "pp_last_stage_layers": p.pp_last_stage_layers}

    def fit_schedule(self, updates: int, warmup_steps: int, key: str) -> None:
        """After a resume the LR schedule is the checkpoint's (megatron restores its length). A
        run asking for another number of ``updates`` (set by the config ``key``) extends a
        constant schedule (exact: its LR does not depend on the length) and otherwise keeps the
        checkpoint's schedule with a WARNING: stretching a decay mid-run would make the LR
        jump (past the old end the LR stays at ``optim.min_lr``)."""
        want = max(updates, warmup_steps + 1)
        sched = self.scheduler
        have = int(sched.lr_decay_steps)
        if have == want:
            return
        if sched.lr_decay_style == "constant" and want > sched.lr_warmup_steps:
            sched.lr_decay_steps = sched.wd_incr_steps = want
            log.info("%s: the constant LR schedule is %s from %d to %d updates", key,
                     "extended" if want > have else "shortened", have, want)
            return
        log.warning("%s asks for an LR schedule of %d updates, but the checkpoint's schedule "
                    "(kept) has %d (lr_decay_style=%s): the LR continues on the checkpoint's "
                    "schedule%s; stretching a decay mid-run would make the LR jump", key, want,
                    have, sched.lr_decay_style,
                    ", and stays at optim.min_lr after its end" if want > have else "")

    def rank_state(self) -> dict[str, Any]:
        """What belongs to this process only: its RNG states."""
        return {"rng": rng_state()}

    def checkpoint_meta(self) -> dict[str, Any]:
        """The layout-free part of the engine's state (plain JSON values)."""
        return {"layout": self.layout(), "scheduler": dict(self.scheduler.state_dict()),
                "nonfinite_skips": self.nonfinite_skips}

    def extra_params(self) -> dict[str, torch.Tensor]:
        """Parameters outside the GPT chunk that train with it (none here; a reward model's
        head in :class:`r1fast.train.reward_model.RewardEngine`), checkpointed beside it."""
        return {}

    def shared_tensors(self) -> dict[str, Any]:
        """The tensors :meth:`write_shared` writes (for the finite-value check before it)."""
        inner = [getattr(o, "optimizer", None) for o in _sub_optimizers(self.optimizer)]
        return {"model": {**{k: v for k, v in self.policy.gpt.state_dict().items()
                             if isinstance(v, torch.Tensor)}, **self.extra_params()},
                "optimizer": [{str(i): st for i, st in enumerate(o.state.values())}
                              for o in inner if o is not None]}

    def write_shared(self, folder: Path) -> None:
        """Model and optimizer into ``folder/policy`` (megatron distributed checkpoint)."""
        from r1fast.policy.dist_ckpt import save_sharded

        save_sharded(self.policy, self.optimizer, Path(folder) / "policy", self.extra_params())

    def load_checkpoint(self, path: Path, rank_state: Optional[Mapping[str, Any]],
                        meta: Mapping[str, Any]) -> None:
        """Restore from a checkpoint folder (see :func:`r1fast.train.checkpoint.load_checkpoint`
        for ``rank_state`` and ``meta``) at this layout, which may differ from the writer's: the
        model and optimizer are resharded; the RNG states come back only at the same layout."""
        from r1fast.policy.dist_ckpt import load_sharded

        if rank_state is not None and "model" in rank_state:  # older format: same layout only
            self.load_state_dict(rank_state)
            return
        load_sharded(self.policy, self.optimizer, Path(path) / "policy", self.extra_params())
        load_scheduler_state(self.scheduler, meta["scheduler"])
        self.nonfinite_skips = int(meta.get("nonfinite_skips", 0))
        written = meta.get("layout")
        if rank_state is not None and written == self.layout():
            set_rng_state(rank_state["rng"])
        elif self.is_logger:
            log.warning("checkpoint %s was written at layout %s and is resumed at %s: model and "
                        "optimizer resharded; the per-rank RNG states are not restored (rollout "
                        "sampling depends only on run.seed and the step)", path,
                        _layout_text(written), _layout_text(self.layout()))

    def state_dict(self) -> dict[str, Any]:
        """This rank's model chunk, optimizer shard and RNG state in one dict (same layout
        only; checkpoints use :meth:`write_shared` + :meth:`rank_state`)."""
        return {"model": model_state(self.policy),
                "optimizer": optim_state_dict(self.optimizer, self.scheduler),
                "rng": rng_state(), "nonfinite_skips": self.nonfinite_skips}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_model_state(self.policy, state["model"], self.optimizer)
        load_optim_state_dict(self.optimizer, self.scheduler, state["optimizer"])
        set_rng_state(state["rng"])
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))

    def save_model(self, tokenizer, path: str | Path) -> Path:
        """The policy as a self-contained HF model folder (see :func:`policy_io.save_model`)."""
        from r1fast.train.policy_io import save_model

        return save_model(self.policy, tokenizer, path)


def _layout_text(layout: Optional[Mapping[str, Any]]) -> str:
    if not layout:
        return "(not recorded)"
    return (f"TP{layout['tp']} PP{layout['pp']} EP{layout['ep']} DP{layout['dp']} "
            f"({layout['world_size']} ranks)")
