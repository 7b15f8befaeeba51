"""The GRPO loop: sample groups, score them with rules, update the MoE policy.

One step (``GRPOTrainer.step``), on every data-parallel rank for its share of the prompts:

1. **rollout**: take ``prompts_per_step`` prompts (each DP rank its slice), sample
   ``group_size`` completions per prompt from the policy, with the sampler's log-probs (and the
   routing decisions, for router replay);
2. **rewards**: rule-based rewards in sandboxed workers (a failing reward scores 0, counted);
3. **advantages**: group-normalised (grpo / drgrpo / rloo), optional dynamic sampling (drop
   groups with identical rewards) and overlong filtering (mask truncated completions);
4. **old and reference log-probs**: recomputed by the trainer (not the sampler) with the
   current policy and the frozen reference, through the fused log-prob op;
5. **update**: ``ppo_epochs`` passes of ``mini_batches`` optimizer steps, each a megatron
   forward-backward whose last stage computes :func:`r1fast.ops.fused_linear_policy_loss`
   from hidden states (no logits), with the global normaliser of the mini-batch so the loss is
   exact under data parallelism; megatron's distributed optimizer clips and steps.

Metrics (reward, accuracy, lengths, clip fraction, KL, entropy, grad norm, tokens/s, and the
rollout-vs-trainer log-prob mismatch) go to ``metrics.jsonl`` and TensorBoard each step;
checkpoints (model, optimizer, RNG, data position) are atomic and resume bit-exactly.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from r1fast import ops
from r1fast.typed_toml import dump_toml
from r1fast.rollout.sampler import SamplingConfig, generate
from r1fast.train.batch import (UpdateBatch, all_ranks_int, build_update_batch,
                                groups_with_signal, split_even)
from r1fast.train.checkpoint import (latest_checkpoint, load_checkpoint, rng_state,
                                     save_checkpoint, set_rng_state)
from r1fast.train.config import TrainConfig, load_train_config
from r1fast.train.metrics import MetricsLogger
from r1fast.ops.policy_loss import config_kwargs
from r1fast.policy.optim import load_optim_state_dict, optim_state_dict
from r1fast.rollout.kv_cache import make_decoder
from r1fast.train.policy_io import copy_weights, load_model_state, model_state
from r1fast.train.task import TaskData, build_task

log = logging.getLogger("r1fast.train")

#: per-update metrics of the loss, averaged over data-parallel replicas
UPDATE_METRICS = ("loss", "clip_frac", "kl_mean", "entropy_mean", "ratio_mean")


class GRPOTrainer:
    """``GRPOTrainer(config).fit()`` runs a GRPO job; the CLI's ``r1fast train`` calls this."""

    def __init__(self, config: TrainConfig, *, task: TaskData | None = None,
                 reward: Callable | None = None):
        from r1fast.policy import build_optimizer, build_policy

        self.cfg = config
        torch.manual_seed(config.run.seed)
        self.policy = build_policy(config.model, config.parallel, seed=config.run.seed)
        self.info = self.policy.info
        a = config.algo
        n_updates = config.run.steps * a.ppo_epochs * a.mini_batches
        optim_cfg = dataclasses.replace(config.optim, total_steps=max(
            n_updates, config.optim.warmup_steps + 1))
        self.optimizer, self.scheduler = build_optimizer(self.policy, optim_cfg)
        self.reference = None
        if a.kl is not None and a.kl_coef > 0:
            self.reference = build_policy(config.model, config.parallel, seed=config.run.seed,
                                          trainable=False)
        self.task = task or build_task(config, reward=reward)
        if self.task.tokenizer.vocab_size > config.model.vocab_size:
            raise ValueError(f"the tokenizer has {self.task.tokenizer.vocab_size} tokens but "
                             f"model.vocab_size is {config.model.vocab_size}")
        self.run_dir = Path(config.run.out_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step_idx = 0
        self.loss_cfg = ops.PolicyLossConfig(
            loss=a.loss, clip_low=a.clip_low, clip_high=a.clip_high, dual_clip=a.dual_clip,
            kl=a.kl if self.reference is not None else None, kl_coef=a.kl_coef, agg=a.agg,
            tis_cap=a.tis_cap)
        self.sampling = SamplingConfig(
            temperature=config.rollout.temperature, top_p=config.rollout.top_p,
            top_k=config.rollout.top_k, max_new_tokens=config.rollout.max_new_tokens,
            vocab_limit=self.task.tokenizer.vocab_size)
        if config.run.init_from:
            load_model_state(self.policy, config.run.init_from, self.optimizer)
        if config.run.resume:
            self._maybe_resume()
        if self.reference is not None and self.step_idx == 0:
            copy_weights(self.policy, self.reference)

    # -------------------------------------------------------------------------- plumbing
    @property
    def is_logger(self) -> bool:
        return self.info.rank == 0

    def _dp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group()

    def _dp_sum(self, values: Sequence[float]) -> list[float]:
        t = torch.tensor(list(values), dtype=torch.float64, device=self.policy.device)
        if self.info.dp > 1:
            dist.all_reduce(t, group=self._dp_group())
        return t.tolist()

    def _maybe_resume(self) -> None:
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            return
        state, meta = load_checkpoint(path)
        load_model_state(self.policy, state["model"], self.optimizer)
        load_optim_state_dict(self.optimizer, self.scheduler, state["optimizer"])
        if self.reference is not None:
            load_model_state(self.reference, state["reference"])
        self.task.load_state_dict(meta["data"])
        set_rng_state(state["rng"])
        self.step_idx = int(meta["step"])
        log.info("resumed from %s at step %d", path, self.step_idx)

    def save(self) -> Path:
        state = {"model": model_state(self.policy),
                 "optimizer": optim_state_dict(self.optimizer, self.scheduler),
                 "rng": rng_state()}
        if self.reference is not None:
            state["reference"] = model_state(self.reference)
        meta = {"data": self.task.state_dict(), "config": dump_toml(self.cfg)}
        return save_checkpoint(self.ckpt_dir, self.step_idx, state, meta)

    # -------------------------------------------------------------------------- one step
    def _rollout(self, examples: list[dict]) -> dict[str, Any]:
        G = self.cfg.algo.group_size
        tok = self.task.tokenizer
        prompts = [tok.encode(ex["prompt"], add_bos=True) for ex in examples for _ in range(G)]
        # every completion has its own random stream, a function of (run seed, step, its index in
        # the global batch): the same samples at any TP/EP/PP/DP layout, identical across the
        # ranks of one model replica, and reproducible after a resume
        first = self.info.dp_rank * len(prompts)
        seeds = [hash((self.cfg.run.seed, self.step_idx, first + i)) & 0x7FFF_FFFF_FFFF_FFFF
                 for i in range(len(prompts))]
        # KV cache at pp == 1, else prefix recomputation; every rank makes the same model calls
        out = generate(make_decoder(self.policy), prompts, self.sampling, sync=all_ranks_int,
                       eos_token_id=tok.eos_id, row_seeds=seeds)
        texts = [tok.decode(c) for c in out.completion_ids]
        return {"rollout": out, "texts": texts,
                "examples": [ex for ex in examples for _ in range(G)]}

    def _update(self, batch: UpdateBatch, old: torch.Tensor, ref: torch.Tensor | None,
                routing: dict[int, torch.Tensor] | None = None) -> dict[str, float]:
        """PPO epochs x mini-batches of megatron forward-backward + optimizer step."""
        a = self.cfg.algo
        mbs = self.cfg.parallel.micro_batch_size or batch.num_rows // a.mini_batches
        stats: dict[str, list[float]] = {}
        timing = {"fwd_bwd": 0.0, "optimizer": 0.0}
        for _ in range(a.ppo_epochs):
            for sl in split_even(batch.num_rows, a.mini_batches):
                mb = batch.rows(sl)
                norm = self._global_normalizer(mb)
                micro = []
                for part in split_even(mb.num_rows, max(mb.num_rows // mbs, 1)):
                    micro.append({"tokens": mb.tokens[part], "targets": mb.targets[part],
                                  "mask": mb.mask[part], "adv": mb.advantages[part],
                                  "old": old[sl][part], "rollout": mb.rollout_logp[part],
                                  "ref": None if ref is None else ref[sl][part]})
                    if routing is not None:
                        micro[-1]["routing"] = {k: v[sl][part] for k, v in routing.items()}
                t0 = time.perf_counter()
                results = self.policy.forward_backward(micro, self._loss_fn(norm))
                t1 = time.perf_counter()
                ok, grad_norm, _ = self.optimizer.step()
                self.scheduler.step(1)
                timing["fwd_bwd"] += t1 - t0
                timing["optimizer"] += time.perf_counter() - t1
                if not ok:
                    raise FloatingPointError("optimizer step skipped: non-finite gradients")
                for r in results:
                    for k, v in r.items():
                        stats.setdefault(k, []).append(float(v))
                stats.setdefault("grad_norm", []).append(float(grad_norm or 0.0))
        grad_norm = stats.pop("grad_norm")
        # loss terms are shares of the global loss: sum them; other metrics are averages
        local = {k: (sum(v) if k == "loss" else sum(v) / len(v)) for k, v in stats.items()}
        out = self._reduce_last_stage(local, UPDATE_METRICS)
        for k, op in (("ratio_min", dist.ReduceOp.MIN), ("ratio_max", dist.ReduceOp.MAX)):
            out[k] = self._extreme_last_stage(local.get(k), op)  # collective: every rank calls
        out["loss"] = out["loss"] * self.info.dp / (a.ppo_epochs * a.mini_batches)
        out["grad_norm"] = sum(grad_norm) / len(grad_norm)  # global already (megatron)
        out["time_fwd_bwd_s"], out["time_optimizer_s"] = timing["fwd_bwd"], timing["optimizer"]
        return out

    def _reduce_last_stage(self, local: dict[str, float], keys: Sequence[str]) -> dict[str, float]:
        """Average ``keys`` over data-parallel replicas. Only the last pipeline stage computes
        the loss metrics; TP ranks hold copies; every rank receives the result."""
        owner = self.policy.gpt.post_process and self.info.tp_rank == 0
        vals = torch.tensor([float(local.get(k, 0.0)) if owner else 0.0 for k in keys],
                            dtype=torch.float64, device=self.policy.device)
        if self.info.world_size > 1:
            dist.all_reduce(vals)
        return dict(zip(keys, (vals / self.info.dp).tolist()))

    def _extreme_last_stage(self, value: float | None, op) -> float:
        """Min or max of a last-stage metric over every rank that has it."""
        neutral = float("inf") if op == dist.ReduceOp.MIN else float("-inf")
        t = torch.tensor([neutral if value is None else float(value)], dtype=torch.float64,
                         device=self.policy.device)
        if self.info.world_size > 1:
            dist.all_reduce(t, op=op)
        return float(t.item())

    def _global_normalizer(self, mb: UpdateBatch) -> float:
        agg = self.cfg.algo.agg
        kept_seqs = float(mb.keep.sum())
        if agg == "token-mean":
            local = float(mb.mask.sum())
        elif agg == "seq-mean-token-sum-norm":
            local = kept_seqs * mb.tokens.shape[1]
        else:
            local = kept_seqs
        return max(self._dp_sum([local])[0], 1.0)

    def _loss_fn(self, normalizer: float):
        cfg, temperature = self.loss_cfg, self.cfg.rollout.temperature
        tis = self.cfg.algo.tis_cap is not None
        fused = self.cfg.algo.use_fused_kernels

        def loss_fn(hidden, weight, mb):
            dev = hidden.device
            kw = dict(temperature=temperature, tp_group=self.policy.tp_group,
                      global_normalizer=normalizer, return_entropy=True,
                      rollout_logp=mb["rollout"].to(dev) if tis else None)
            ref = None if mb["ref"] is None else mb["ref"].to(dev)
            if fused:
                return ops.fused_linear_policy_loss(
                    hidden, weight, mb["targets"].to(dev), mb["old"].to(dev), mb["adv"].to(dev),
                    mb["mask"].to(dev), ref, cfg, **kw)
            return _unfused_policy_loss(hidden, weight, mb, ref, cfg, **kw)

        return loss_fn

    def step(self) -> dict[str, float]:
        """One GRPO step; returns the metrics logged for it."""
        a = self.cfg.algo
        t0 = time.perf_counter()
        examples = self.task.next_prompts(self.cfg.data.prompts_per_step, self.info.dp,
                                          self.info.dp_rank)
        ro = self._rollout(examples)
        t_gen = time.perf_counter()
        rewards = self.task.score(ro["texts"], ro["examples"])
        r = torch.tensor(rewards["total"], dtype=torch.float32)
        adv = ops.group_advantages(r, group_size=a.group_size, estimator=a.estimator,
                                   eps=a.adv_eps, impl="torch")
        keep = torch.ones_like(r, dtype=torch.bool)
        if a.dynamic_sampling:
            keep &= groups_with_signal(r, a.group_size)
        truncated = torch.tensor(ro["rollout"].truncated)
        if a.overlong_filter:
            keep &= ~truncated
        rollout = ro["rollout"]
        # one padded length for every DP rank: the pipeline and the collectives need equal shapes
        local_len = max(len(p) + len(c) for p, c in zip(rollout.prompt_ids,
                                                          rollout.completion_ids)) - 1
        length = all_ranks_int(local_len, "max")  # PP/TP/DP need equal shapes
        batch = build_update_batch(rollout.prompt_ids, rollout.completion_ids, rollout.logprobs,
                                   adv, keep, self.task.tokenizer.pad_id, length)
        # R3 router replay: the experts the rollout's forward chose for every token, replayed
        # when the trainer recomputes log-probs and in the update (weights stay differentiable)
        routing = self.policy.record_routing(batch.tokens) if a.router_replay else None
        with torch.no_grad():
            old = self.policy.logprobs(batch.tokens, batch.targets,
                                       self.cfg.rollout.temperature, routing=routing).cpu()
            ref = None if self.reference is None else self.reference.logprobs(
                batch.tokens, batch.targets, self.cfg.rollout.temperature).cpu()
        t_logp = time.perf_counter()
        upd = self._update(batch, old, ref, routing)
        t_upd = time.perf_counter()
        self.step_idx += 1
        if self.reference is not None and a.ref_reset_every and self.step_idx % a.ref_reset_every == 0:
            copy_weights(self.policy, self.reference)
        comp_mask = torch.zeros_like(batch.mask)
        for i, (p, c) in enumerate(zip(rollout.prompt_ids, rollout.completion_ids)):
            comp_mask[i, len(p) - 1: len(p) - 1 + len(c)] = 1
        mismatch = ((old - batch.rollout_logp).abs() * comp_mask).sum()
        n_tok = float(comp_mask.sum())
        lens = [len(c) for c in rollout.completion_ids]
        sums = self._dp_sum([
            float(r.sum()), float((r * r).sum()), float(r.numel()),
            float(sum(rewards.get(self.cfg.reward.accuracy_metric, [0.0]))),
            float(sum(lens)), n_tok,
            float(mismatch), float(truncated.sum()), float(keep.sum()),
            float(sum(p_len + c for p_len, c in zip(map(len, rollout.prompt_ids), lens)))])
        (r_sum, r2_sum, n, acc_sum, len_sum, tok_sum, mm_sum, trunc_sum, keep_sum, all_tok) = sums
        mean = r_sum / n
        metrics = {
            "reward_mean": mean, "reward_std": max(r2_sum / n - mean * mean, 0.0) ** 0.5,
            "response_length": len_sum / n,
            "truncated_frac": trunc_sum / n, "kept_frac": keep_sum / n,
            "logp_mismatch": mm_sum / max(tok_sum, 1.0),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "time_generation_s": t_gen - t0, "time_logprobs_s": t_logp - t_gen,
            "time_update_s": t_upd - t_logp,
            "tokens_per_s": all_tok / max(t_upd - t0, 1e-9),
        }
        if self.cfg.reward.accuracy_metric in rewards:
            metrics["accuracy"] = acc_sum / n
        for k in ("loss", "clip_frac", "kl_mean", "entropy_mean", "grad_norm", "ratio_max",
                  "ratio_min", "time_fwd_bwd_s", "time_optimizer_s"):
            if k in upd:
                metrics[k.replace("_mean", "") if k in ("kl_mean", "entropy_mean") else k] = upd[k]
        for part, vals in rewards.items():
            if part != "total":
                metrics[f"reward/{part}"] = self._dp_sum([float(sum(vals))])[0] / n
        metrics.update({f"reward_failures/{k}": v for k, v in self.task.failure_metrics().items()})
        return metrics

    # -------------------------------------------------------------------------- the loop
    def fit(self) -> list[dict]:
        """Run until ``run.steps``; returns the metrics rows of the steps run here."""
        run = self.cfg.run
        if self.is_logger:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(dump_toml(self.cfg))
        logger = MetricsLogger(self.run_dir, enabled=self.is_logger, tensorboard=run.tensorboard,
                               progress=run.progress, total_steps=run.steps,
                               initial_step=self.step_idx)
        rows = []
        try:
            while self.step_idx < run.steps:
                metrics = self.step()
                rows.append(logger.log(self.step_idx, metrics))
                if run.save_every and self.step_idx % run.save_every == 0:
                    self.save()
            if not run.save_every or self.step_idx % run.save_every != 0:
                self.save()
        finally:
            logger.close()
            self.task.close()
        return rows


def _unfused_policy_loss(hidden, weight, mb, ref, cfg, *, temperature, global_normalizer,
                         rollout_logp, return_entropy, **_):
    """The same loss through full logits (the baseline ``use_fused_kernels=false`` measures)."""
    from megatron.core.tensor_parallel import (copy_to_tensor_model_parallel_region,
                                               gather_from_tensor_model_parallel_region)

    dev = hidden.device
    # the policy's head contract: every TP rank returns the FULL input gradient (the copy's
    # backward all-reduces the vocab shards' partial gradients), as linear_logprob does
    hidden = copy_to_tensor_model_parallel_region(hidden.float())
    logits = gather_from_tensor_model_parallel_region(hidden @ weight.float().t())
    logits = logits / temperature  # [b, L, V]
    logp_all = torch.log_softmax(logits, -1)
    targets = mb["targets"].to(dev)
    logp = logp_all.gather(-1, targets[..., None])[..., 0]
    loss, metrics = ops.policy_loss(
        logp, mb["old"].to(dev), mb["adv"].to(dev), mb["mask"].to(dev), ref_logp=ref,
        global_normalizer=global_normalizer, rollout_logp=rollout_logp,
        max_len=targets.shape[1], impl="torch", **config_kwargs(cfg))
    if return_entropy:
        m = mb["mask"].to(dev)
        ent = -(logp_all.exp() * logp_all).sum(-1)
        metrics["entropy_mean"] = (ent.detach() * m).sum() / m.sum().clamp_min(1)
    return loss, metrics


def train_main(recipe: str | None, overrides: Sequence[str]) -> int:
    """``r1fast train RECIPE [--a.b=v ...]``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_train_config(recipe, overrides)
    trainer = GRPOTrainer(cfg)
    rows = trainer.fit()
    if trainer.is_logger:
        last = rows[-1] if rows else {}
        print(f"done: {trainer.step_idx} steps, run folder {trainer.run_dir} "
              f"(metrics.jsonl, tensorboard/, checkpoints/); last reward "
              f"{last.get('reward_mean', float('nan')):.3f}", file=sys.stderr)
    return 0
