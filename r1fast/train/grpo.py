"""The GRPO loop: sample groups, score them with rules, update the MoE policy.

One step (``GRPOTrainer.step``), on every data-parallel rank for its share of the prompts:

1. **rollout**: take ``prompts_per_step`` prompts (each DP rank its share), sample
   ``group_size`` completions per prompt from the policy, with the sampler's log-probs (and the
   routing decisions, for router replay);
2. **rewards**: rule-based rewards in sandboxed workers (a failing reward scores 0, counted);
   with DAPO's refill, 1-2 repeat on further prompts until the groups whose rewards vary fill
   the batch (r1fast.train.dynamic_sampling);
3. **advantages**: group-normalised (grpo / drgrpo / rloo), optional dynamic sampling (mask
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

from r1fast import ops
from r1fast.atomic import write_text_atomic
from r1fast.rollout.kv_cache import make_decoder
from r1fast.rollout.sampler import Rollout, SamplingConfig, generate
from r1fast.train.balance import balance_over_dp
from r1fast.train.batch import (UpdateBatch, all_ranks_int, build_update_batch,
                                groups_with_signal, model_parallel_agreed, rank_rows,
                                scores_for_model_parallel_group, split_even)
from r1fast.train.checkpoint import (check_resumed_config, load_checkpoint, resume_point,
                                     save_checkpoint)
from r1fast.train.config import TrainConfig, config_warnings, load_train_config
from r1fast.train.dynamic_sampling import RolloutBatch, row_seeds, sample_until_full
from r1fast.train.engine import TrainEngine
from r1fast.train.held_out import HeldOutEvaluator
from r1fast.train.loss_head import check_kernel_choice, unfused_policy_loss
from r1fast.train.metrics import (MetricsLogger, append_jsonl, combine_micro_metrics,
                                  gather_expert_load, load_imbalance,
                                  replica_token_means, truncate_metrics)
from r1fast.train.packing import PackedMicroBatch, pack_routing, packed_micro_batches
from r1fast.policy.dist_ckpt import load_sharded, save_sharded
from r1fast.policy.transfer import to_device_async
from r1fast.train.policy_io import copy_weights, load_model_state
from r1fast.train.reward_routing import source_means
from r1fast.train.run_folder import check_shared_folder, start_fresh
from r1fast.train.task import (TaskData, build_task, check_inputs, check_tokenizer_fits,
                               read_prompts, run_tokenizer)
from r1fast.typed_toml import ConfigError, dump_toml

log = logging.getLogger("r1fast.train")

#: per-update metrics of the loss, averaged over data-parallel replicas
UPDATE_METRICS = ("loss", "clip_frac", "kl_mean", "entropy_mean", "ratio_mean", "tis_mean")
#: metrics of the update reported per step (kl_mean and entropy_mean as kl and entropy)
REPORTED_UPDATE_METRICS = ("loss", "clip_frac", "kl_mean", "entropy_mean", "grad_norm",
                           "ratio_max", "ratio_min", "tis_mean", "updates_skipped",
                           "time_fwd_bwd_s", "time_optimizer_s")


#: config keys a resume may change without a word: the run's length, layout and logging
_FREE_ON_RESUME = ("run.steps", "run.resume", "run.overwrite", "run.progress",
                   "run.tensorboard", "run.save_every", "run.keep_last", "parallel.",
                   "data.eval_every", "data.eval_before_train")


class GRPOTrainer:
    """``GRPOTrainer(config).fit()`` runs a GRPO job; the CLI's ``r1fast train`` calls this."""

    def __init__(self, config: TrainConfig, *, task: TaskData | None = None,
                 reward: Callable | None = None):
        from r1fast.policy import build_policy

        self.cfg = config
        a = config.algo
        self.run_dir = Path(config.run.out_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        # what can fail without the model fails before it is built (seconds of construction)
        check_inputs(config, custom_reward=reward is not None or task is not None)
        check_kernel_choice(a)
        tokenizer = task.tokenizer if task is not None else run_tokenizer(config)
        check_tokenizer_fits(tokenizer, config.model.vocab_size, "model.vocab_size")
        prompts = read_prompts(config, tokenizer) if task is None else None
        check_shared_folder(self.run_dir, "run.out_dir")  # starts torch.distributed
        self._resume_from = resume_point(self.ckpt_dir, resume=config.run.resume,
                                         overwrite=config.run.overwrite,
                                         start_over="--run.resume=false", expect=("data", "GRPO"))
        if self._resume_from is None and not config.run.overwrite:
            self._check_fresh_start()  # only raises: without overwrite nothing is moved
        use_kl = a.objective.kl is not None and a.objective.kl_coef > 0
        if use_kl and self._resume_from is not None and (self._resume_from / "policy").is_dir() \
                and not (self._resume_from / "reference").is_dir():
            raise ConfigError(f"algo.kl_coef={a.objective.kl_coef}: checkpoint "
                              f"{self._resume_from} has no reference model (its run had no KL "
                              f"term); resume with algo.kl_coef = 0, or start a new run from "
                              f"the model (run.init_from)")
        self.engine = TrainEngine(config.model, config.parallel, config.optim,
                                  total_updates=config.run.steps * a.ppo_epochs * a.mini_batches,
                                  seed=config.run.seed, init_from=config.run.init_from,
                                  resuming=self._resume_from is not None)
        self.policy, self.info = self.engine.policy, self.engine.info
        self.reference = build_policy(config.model, config.parallel, seed=config.run.seed,
                                      trainable=False) if use_kl else None
        # without a reference there is no KL term, not even a reported one
        self.loss_cfg = a.objective if use_kl else dataclasses.replace(a.objective, kl=None)
        self.task = task or build_task(config, reward=reward, tokenizer=tokenizer,
                                      prompts=prompts)
        self.step_idx = 0
        self.held_out_eval = HeldOutEvaluator(trainer=self)
        self.expert_loads: dict[int, list[float]] = {}
        """Tokens per expert of each MoE layer in the last step (see expert_load.jsonl)."""
        self.sampling = SamplingConfig(
            temperature=config.rollout.temperature, top_p=config.rollout.top_p,
            top_k=config.rollout.top_k, max_new_tokens=config.rollout.max_new_tokens,
            stop_token_ids=tuple(self.task.tokenizer.stop_ids),
            vocab_limit=self.task.tokenizer.vocab_size, logprobs=config.rollout.logprobs)
        for warning in config_warnings(config) if self.is_logger else ():
            log.warning(warning)
        if config.run.resume:
            self._maybe_resume()
        if self.reference is not None and self.step_idx == 0:
            copy_weights(self.policy, self.reference)

    @property
    def is_logger(self) -> bool:
        return self.engine.is_logger

    # -------------------------------------------------------------------------- checkpoints
    def _maybe_resume(self) -> None:
        """Continue from the newest committed checkpoint of ``run.out_dir`` (the ``latest``
        pointer, or a scan when it is damaged). Without one, a fresh start must not overwrite
        an existing run (:meth:`_check_fresh_start`).

        The LR schedule's length is the checkpoint's (megatron restores ``lr_decay_steps``
        from it). A resume with a different ``run.steps`` extends a constant schedule (exact:
        its LR does not depend on the length) and otherwise keeps the checkpoint's schedule
        with a WARNING, because stretching a cosine/linear decay mid-run would make the LR jump
        (past the old end the LR stays at ``optim.min_lr``)."""
        path = self._resume_from  # found before the model was built
        if path is None:
            self._check_fresh_start()
            return
        state, meta = load_checkpoint(path)
        check_resumed_config(meta.get("config"), dump_toml(self.cfg), path, _FREE_ON_RESUME)
        self.engine.load_checkpoint(path, state, meta)
        if self.reference is not None:
            if state is not None and "reference" in state:  # older format
                load_model_state(self.reference, state["reference"])
            else:
                load_sharded(self.reference, None, path / "reference")
        self.task.load_state_dict(meta["data"])
        self.step_idx = int(meta["step"])
        log.info("resumed from %s at step %d", path, self.step_idx)
        if self.is_logger:
            truncate_metrics(self.run_dir / "expert_load.jsonl", self.step_idx)
            truncate_metrics(self.run_dir / "metrics.jsonl", self.step_idx)
        self.held_out_eval.cut_after(self.step_idx)
        a = self.cfg.algo
        self.engine.fit_schedule(self.cfg.run.steps * a.ppo_epochs * a.mini_batches,
                                 self.cfg.optim.warmup_steps, f"run.steps={self.cfg.run.steps}")

    def _check_fresh_start(self) -> None:
        """Step 0: a folder that holds checkpoints or metrics is an error unless
        ``run.overwrite`` (then the old files move to ``previous_<time>/``)."""
        start_fresh(self.run_dir, ("checkpoints", "metrics.jsonl", "expert_load.jsonl",
                                   "eval.jsonl", "tensorboard", "config.toml"),
                    overwrite=self.cfg.run.overwrite, resume=self.cfg.run.resume,
                    what="run", resume_off="run.resume=false",
                    overwrite_on="--run.overwrite=true", error=ConfigError)

    def save(self) -> Path:
        """A checkpoint of this step (collective): model, optimizer and reference in megatron's
        distributed format (resumable at any layout), RNG per rank, data position in meta."""
        def write_shared(folder: Path) -> None:
            self.engine.write_shared(folder)
            if self.reference is not None:
                save_sharded(self.reference, None, folder / "reference")

        shared = self.engine.shared_tensors()
        if self.reference is not None:
            shared["reference"] = list(self.reference.gpt.parameters())
        meta = {"data": self.task.state_dict(), "config": dump_toml(self.cfg),
                **self.engine.checkpoint_meta()}
        return save_checkpoint(self.ckpt_dir, self.step_idx, self.engine.rank_state(), meta,
                               keep_last=self.cfg.run.keep_last, write_shared=write_shared,
                               shared_tensors=shared)

    # -------------------------------------------------------------------------- one step
    def step(self) -> dict[str, float]:
        """One GRPO step: rollout -> rewards -> advantages -> log-probs -> update."""
        t0 = time.perf_counter()
        samples, rewards, rounds, t_rewards = self._sample_and_score()
        t_gen = time.perf_counter()
        batch, truncated = self._advantages(samples.rollout, rewards["total"])
        routing = self._replay_routing(samples.rollout, batch)
        batch, routing, balance = self._balance(batch, routing)
        old, ref = self._old_and_ref_logprobs(batch, routing)
        t_logp = time.perf_counter()
        upd = self._update(batch, old, ref, routing)
        t_upd = time.perf_counter()
        self._advance()
        timing = {"time_generation_s": t_gen - t0 - t_rewards, "time_rewards_s": t_rewards,
                  "time_logprobs_s": t_logp - t_gen,
                  "time_update_s": t_upd - t_logp, "time_step_s": t_upd - t0}
        metrics = self._step_metrics(samples.rollout, rewards, batch, old, truncated, upd, timing)
        metrics["sampling_rounds"] = rounds
        if balance is not None:  # the fullest DP rank's tokens over the mean rank's
            metrics.update(dp_token_imbalance_before=balance.before,
                           dp_token_imbalance_after=balance.after,
                           dp_balance_rows_sent=balance.rows_sent,  # by this rank
                           dp_balance_bytes_sent=balance.bytes_sent)
        return metrics

    def _sample_and_score(self) -> tuple[RolloutBatch, dict[str, list[float]], int, float]:
        """(samples, rewards, rounds of prompts: DAPO's refill in r1fast.train.dynamic_sampling,
        seconds of scoring) of this rank."""
        a, scoring = self.cfg.algo, [0.0]

        def sample_round(r: int):
            samples = self._rollout(self.task.next_prompts(
                self.cfg.data.prompts_per_step, self.info.dp, self.info.dp_rank, a.mini_batches), r)
            t = time.perf_counter()
            rewards = model_parallel_agreed(self.task.score(
                samples.texts, samples.examples, rules=scores_for_model_parallel_group()))
            scoring[0] += time.perf_counter() - t
            return samples, rewards
        if not (a.dynamic_sampling and a.max_sampling_rounds > 1):
            return (*sample_round(0), 1, scoring[0])
        batch, n = sample_until_full(
            sample_round, group_size=a.group_size, groups=self.cfg.data.prompts_per_step,
            max_rounds=a.max_sampling_rounds, dp_rank=self.info.dp_rank,
            all_gather=self.engine.dp_all_gather, exchange=self.engine.dp_exchange,
            step=self.step_idx + 1, warn=self.is_logger, mini_batches=a.mini_batches)
        return (*batch, n, scoring[0])

    def _rollout(self, examples: list[dict], round_: int = 0) -> RolloutBatch:
        G = self.cfg.algo.group_size
        tok = self.task.tokenizer
        ids = [tok.encode(ex["prompt"], add_bos=True) for ex in examples]  # once per prompt
        prompts = [list(p) for p in ids for _ in range(G)]
        rows = rank_rows(self.cfg.data.prompts_per_step, self.info.dp, self.info.dp_rank,
                         self.cfg.algo.mini_batches, G)  # in the global batch
        seeds = row_seeds(self.cfg.run.seed, self.step_idx, round_, rows)
        # KV-cached decoding on the policy's device; every rank makes the same model calls. R3:
        # the decoder records the experts of every token it runs (replayed in training)
        record = self.cfg.algo.router_replay and self.cfg.algo.router_replay_capture == "rollout"
        decoder = make_decoder(self.policy, **self.cfg.rollout.decoder_options())
        out = generate(decoder, prompts, self.sampling, sync=all_ranks_int,
                       eos_token_id=tok.eos_id, row_seeds=seeds, record_routing=record)
        return RolloutBatch(out, [tok.decode(c) for c in out.completion_ids],
                            [ex for ex in examples for _ in range(G)])

    def _replay_routing(self, rollout: Rollout, batch: UpdateBatch):
        """R3 router replay: ``{layer: [N, L, k]}`` experts replayed when the trainer recomputes
        log-probs and in the update (weights stay differentiable), or None without replay:
        those the decoder ran while sampling, or (``algo.router_replay_capture = "posthoc"``)
        those of a separate forward over the sampled sequences."""
        if not self.cfg.algo.router_replay:
            return None
        if self.cfg.algo.router_replay_capture == "rollout":
            return rollout.routing.padded(batch.tokens.shape[1])
        return self.policy.record_routing(batch.tokens)

    def _advantages(self, rollout: Rollout, rewards: Sequence[float]):
        """Group advantages, the rows kept (dynamic sampling, overlong filtering), and the
        padded update batch -> ``(batch, truncated [N] bool)``."""
        a = self.cfg.algo
        r = torch.tensor(rewards, dtype=torch.float32, device=self.engine.device)
        adv = ops.group_advantages(r, group_size=a.group_size, estimator=a.estimator,
                                   eps=a.adv_eps, impl="auto").cpu()
        keep = torch.ones(len(rewards), dtype=torch.bool)
        if a.dynamic_sampling:
            keep &= groups_with_signal(r.cpu(), a.group_size)
        truncated = torch.tensor(rollout.truncated)
        if a.overlong_filter:
            keep &= ~truncated
        if (a.dynamic_sampling or a.overlong_filter) and not bool(keep.any()):
            log.warning("step %d: algo.dynamic_sampling / overlong_filter kept none of this "
                        "rank's %d completions: they add no gradient", self.step_idx + 1,
                        len(rewards))
        local_len = max(len(p) + len(c) for p, c in zip(rollout.prompt_ids,
                                                          rollout.completion_ids)) - 1
        length = all_ranks_int(local_len, "max")  # PP/TP/DP need equal shapes
        batch = build_update_batch(rollout.prompt_ids, rollout.completion_ids, rollout.logprobs,
                                   adv, keep, self.task.tokenizer.pad_id, length)
        return batch, truncated

    def _balance(self, batch: UpdateBatch, routing):
        """Rows moved between the DP ranks so that each holds about the same number of tokens
        (packed updates, ``parallel.balance_dp_tokens``; r1fast.train.balance) ->
        ``(batch, routing, BalanceStats or None)``."""
        par = self.cfg.parallel
        if not (par.balance_dp_tokens and par.max_tokens_per_microbatch > 0 and self.info.dp > 1):
            return batch, routing, None
        return balance_over_dp(batch, routing, self.cfg.algo.mini_batches,
                               self.engine.dp_host_group(), self.info.dp_rank, self.info.dp)

    def _old_and_ref_logprobs(self, batch: UpdateBatch, routing):
        """Log-probs of the sampled tokens under the policy before the update (with the
        rollout's routing when replaying) and under the frozen reference (None without KL),
        [N, L] in the padded layout; computed on packed micro-batches when packing is on."""
        temperature = self.cfg.rollout.temperature
        packs = self._packs(batch, self.cfg.parallel.logprob_forward_tokens)
        if packs is None:
            inputs, kw = (batch.tokens, batch.targets), {}
        else:
            width = max(len(p.segments()) for p in packs) + 1  # every pack's cu_seqlens, stacked
            inputs = tuple(torch.cat([p.pack(x) for p in packs]) for x in (batch.tokens,
                                                                            batch.targets))
            kw = {"micro_batch_size": 1,
                  "cu_seqlens": torch.stack([p.cu_seqlens(width) for p in packs])}
            if routing is not None:
                routing = {k: torch.cat([pack_routing(p, v) for p in packs])
                           for k, v in routing.items()}

        def unpacked(x: torch.Tensor) -> torch.Tensor:
            if packs is None:
                return x.cpu()
            out, host = torch.zeros_like(batch.mask), x.cpu()  # one device->host copy
            for i, p in enumerate(packs):
                p.unpack(host[i:i + 1], out)
            return out

        with torch.no_grad():
            old = unpacked(self.policy.logprobs(*inputs, temperature, routing=routing, **kw))
            ref = None if self.reference is None else unpacked(
                self.reference.logprobs(*inputs, temperature, **kw))
        return old, ref

    def _packs(self, batch: UpdateBatch, budget: int | None = None
               ) -> list[PackedMicroBatch] | None:
        """The packed micro-batches of ``batch`` under ``budget`` tokens (default the update's
        max_tokens_per_microbatch), or None when packing is off. Their length is agreed by
        every rank (the pipeline sends fixed shapes) and divides by tp under sequence
        parallelism."""
        if self.cfg.parallel.max_tokens_per_microbatch <= 0:
            return None
        budget = budget or self.cfg.parallel.max_tokens_per_microbatch
        multiple = self.info.tp if self.policy.sequence_parallel else 1
        return packed_micro_batches(batch.lengths.tolist(), budget, multiple,
                                    agree=all_ranks_int)

    def _advance(self) -> None:
        """The step is done: count it and reset the reference when it is due."""
        self.step_idx += 1
        every = self.cfg.algo.ref_reset_every
        if self.reference is not None and every and self.step_idx % every == 0:
            copy_weights(self.policy, self.reference)

    # -------------------------------------------------------------------------- the update
    def _update(self, batch: UpdateBatch, old: torch.Tensor, ref: torch.Tensor | None,
                routing: dict[int, torch.Tensor] | None = None) -> dict[str, float]:
        """PPO epochs x mini-batches of megatron forward-backward + optimizer step."""
        a = self.cfg.algo
        stats: dict[str, list[float]] = {}
        grad_norms: list[float] = []
        lrs: list[float] = []  # what each update stepped with
        timing = {"time_fwd_bwd_s": 0.0, "time_optimizer_s": 0.0}
        skipped = 0
        for _ in range(a.ppo_epochs):
            for sl in split_even(batch.num_rows, a.mini_batches):
                mb = batch.rows(sl)
                normalizer, kept = self._global_normalizer(mb)
                if kept == 0:  # no gradient on any rank: a step would only move the moments,
                    skipped += 1  # the weight decay and the LR schedule
                    continue
                micro = self._micro_batches(mb, old[sl], None if ref is None else ref[sl],
                                            None if routing is None else
                                            {k: v[sl] for k, v in routing.items()})
                upd = self.engine.update(micro, self._loss_fn(normalizer))
                timing["time_fwd_bwd_s"] += upd.time_fwd_bwd_s
                timing["time_optimizer_s"] += upd.time_optimizer_s
                grad_norms.append(upd.grad_norm)
                lrs.append(upd.lr)
                for r in upd.metrics:
                    for k, v in r.items():
                        stats.setdefault(k, []).append(float(v))
        if skipped:
            log.warning("step %d: %d of %d optimizer steps skipped (weights, moments and LR "
                        "schedule unchanged): algo.dynamic_sampling / overlong_filter kept no "
                        "completion of their mini-batch on any rank", self.step_idx + 1,
                        skipped, a.ppo_epochs * a.mini_batches)
        local = combine_micro_metrics(stats)  # loss summed, extremes, token-weighted means
        out = replica_token_means(local, UPDATE_METRICS, sum(stats.get("num_tokens", ())),
                                  lambda v, k: self.engine.last_stage_reduce(v, k, op="sum"))
        out["loss"] /= max(len(grad_norms), 1)  # mean over the updates that ran
        out["updates_skipped"] = skipped
        out["lr"] = sum(lrs) / len(lrs) if lrs else self.engine.lr
        if not grad_norms:  # nothing ran: no ratio to report, no gradient
            return {**out, "grad_norm": 0.0, **timing}
        for k, op in (("ratio_min", "min"), ("ratio_max", "max")):
            out[k] = self.engine.last_stage_extreme(local.get(k), op)  # collective: every rank
        out["grad_norm"] = sum(grad_norms) / len(grad_norms)  # global already (megatron)
        return {**out, **timing}

    def _micro_batches(self, mb: UpdateBatch, old, ref, routing) -> list[dict[str, Any]]:
        """Split a mini-batch into ``parallel.micro_batch_size`` rows per micro-batch, or into
        packed micro-batches under the token budget."""
        packs = self._packs(mb)
        if packs is not None:
            return [self._packed_micro_batch(p, mb, old, ref, routing) for p in packs]
        mbs = self.cfg.parallel.micro_batch_size or mb.num_rows
        micro = []
        for part in split_even(mb.num_rows, max(mb.num_rows // mbs, 1)):
            micro.append({"tokens": mb.tokens[part], "lengths": mb.lengths[part],
                          "targets": mb.targets[part], "mask": mb.mask[part],
                          "adv": mb.advantages[part], "old": old[part], "rollout":
                          mb.rollout_logp[part], "ref": None if ref is None else ref[part]})
            if routing is not None:
                micro[-1]["routing"] = {k: v[part] for k, v in routing.items()}
        return micro

    @staticmethod
    def _packed_micro_batch(p: PackedMicroBatch, mb: UpdateBatch, old, ref, routing) -> dict:
        """One packed micro-batch: [1, T] token streams, per-row advantages (0 for the tail's
        pieces)."""
        out = {"tokens": p.pack(mb.tokens), "lengths": p.real_lengths(), "targets":
               p.pack(mb.targets), "mask": p.pack(mb.mask), "old": p.pack(old),
               "rollout": p.pack(mb.rollout_logp),
               "ref": None if ref is None else p.pack(ref), "cu_seqlens": p.cu_seqlens(),
               "adv": torch.cat([mb.advantages[p.rows],
                                 mb.advantages.new_zeros(p.num_tail_pieces)])}
        if routing is not None:
            out["routing"] = {k: pack_routing(p, v) for k, v in routing.items()}
        return out

    def _global_normalizer(self, mb: UpdateBatch) -> tuple[float, int]:
        """The aggregation's denominator over the whole (all DP ranks) mini-batch, and the
        number of its rows kept (one all-reduce)."""
        rows = float(mb.keep.sum())  # Dr.GRPO's L: the constant generation budget, as in TRL
        local = ops.loss_denominator(self.loss_cfg.agg, num_tokens=float(mb.mask.sum()),
                                     num_seqs=rows, max_len=self.cfg.rollout.max_new_tokens)
        total, kept = self.engine.dp_sum([local, rows])
        return max(total, 1.0), int(kept)

    def _loss_fn(self, normalizer: float):
        cfg, temperature = self.loss_cfg, self.cfg.rollout.temperature
        tis = cfg.tis_cap is not None
        fused = self.cfg.algo.use_fused_kernels
        head = dict(impl=self.cfg.algo.kernel_impl,
                    tiles="gemm" if self.cfg.algo.logprob_head == "gemm" else None,
                    grad_in_forward=self.cfg.algo.logprob_head == "grad-in-forward")

        def loss_fn(hidden, weight, mb):
            dev = hidden.device
            packed = "cu_seqlens" in mb  # [1, T] streams -> the ops' packed [T] layout
            # the micro-batch is on the host: non-blocking copies (a plain one waits for the
            # forward just queued to finish, r1fast.policy.transfer)
            t = {k: to_device_async(None if mb[k] is None else
                                    mb[k].reshape(-1) if packed else mb[k], dev)
                 for k in ("targets", "old", "mask", "rollout", "ref", "adv")}
            kw = dict(temperature=temperature, tp_group=self.policy.tp_group,
                      global_normalizer=normalizer, return_entropy=True,
                      rollout_logp=t["rollout"] if tis else None,
                      cu_seqlens=to_device_async(mb["cu_seqlens"], dev) if packed else None)
            if packed:
                hidden = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
            args = (hidden, weight, t["targets"], t["old"], t["adv"], t["mask"], t["ref"], cfg)
            if fused:
                # prompt and padding positions skip the LM head; found on the host (no wait)
                rows = to_device_async(mb["mask"].reshape(-1).nonzero().squeeze(1), dev)
                return ops.fused_linear_policy_loss(*args, active_rows=rows, **head, **kw)
            return unfused_policy_loss(*args, **kw)

        return loss_fn

    # -------------------------------------------------------------------------- metrics
    def _step_metrics(self, rollout: Rollout, rewards: dict[str, list[float]],
                      batch: UpdateBatch, old: torch.Tensor, truncated: torch.Tensor,
                      upd: dict[str, float], timing: dict[str, float]) -> dict[str, float]:
        """The step's row of metrics.jsonl: sums over DP ranks, then means per completion."""
        r = torch.tensor(rewards["total"], dtype=torch.float32)
        prompt_lens = [len(p) for p in rollout.prompt_ids]
        comp_lens = [len(c) for c in rollout.completion_ids]
        # completion targets, kept or not, of the batch's rows (balancing may have moved rows
        # between DP ranks: the rollout's order is not the batch's)
        slot = torch.arange(batch.mask.shape[1])[None, :]
        comp_mask = ((slot >= batch.prompt_lengths[:, None] - 1)
                     & (slot < batch.lengths[:, None])).to(batch.mask.dtype)
        mismatch = ((old - batch.rollout_logp).abs() * comp_mask).sum()
        acc_key = self.cfg.reward.accuracy_metric
        (r_sum, r2_sum, n, acc_sum, len_sum, tok_sum, mm_sum, trunc_sum, keep_sum,
         all_tok) = self.engine.dp_sum([
            float(r.sum()), float((r * r).sum()), float(r.numel()),
            float(sum(rewards.get(acc_key, [0.0]))), float(sum(comp_lens)),
            float(comp_mask.sum()), float(mismatch), float(truncated.sum()),
            float(batch.keep.sum()), float(sum(prompt_lens) + sum(comp_lens))])
        mean = r_sum / n
        metrics = {
            "reward_mean": mean, "reward_std": max(r2_sum / n - mean * mean, 0.0) ** 0.5,
            "response_length": len_sum / n,
            "truncated_frac": trunc_sum / n, "kept_frac": keep_sum / n,
            "logp_mismatch": mm_sum / max(tok_sum, 1.0), "lr": upd["lr"],
            **{k: v for k, v in timing.items() if k != "time_step_s"},
            "tokens_per_s": all_tok / max(timing["time_step_s"], 1e-9),
        }
        if acc_key in rewards:
            metrics["accuracy"] = acc_sum / n
        for k in REPORTED_UPDATE_METRICS:  # no reference (kl_coef = 0): no KL to report
            if k in upd and (k != "kl_mean" or self.reference is not None):
                metrics[k.replace("_mean", "") if k in ("kl_mean", "entropy_mean") else k] = upd[k]
        for part, vals in rewards.items():
            if part != "total":
                metrics[f"reward/{part}"] = self.engine.dp_sum([float(sum(vals))])[0] / n
        # mixed rule / reward-model data: each source's mean reward over its own rows
        metrics.update(source_means(metrics))
        if self.policy.model_cfg.is_moe:  # the per-expert counts go to expert_load.jsonl
            self.expert_loads = gather_expert_load(self.policy)
            metrics.update(load_imbalance(self.expert_loads))
        metrics.update({f"reward_failures/{k}": v for k, v in self.task.failure_metrics(
            self.engine.dp_sum).items()})
        metrics.update(self.task.reward_model_metrics(self.engine.dp_sum))
        return metrics

    # -------------------------------------------------------------------------- evaluation
    def evaluate(self, logger=None) -> dict[str, Any] | None:
        """pass@1 / cons@k of the policy on the held-out problems now, as this step's row of
        out_dir/eval.jsonl (collective; None without held-out problems): see
        :mod:`r1fast.train.held_out`."""
        return self.held_out_eval.evaluate(self.step_idx, logger)

    # -------------------------------------------------------------------------- the loop
    def fit(self) -> list[dict]:
        """Run until ``run.steps``; returns the metrics rows of the steps run here."""
        run = self.cfg.run
        if self.step_idx == 0:
            self._check_fresh_start()
        if self.is_logger:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / "config.toml", dump_toml(self.cfg))
            self.task.tokenizer.save(self.run_dir / "tokenizer")  # for `r1fast export`
        logger = MetricsLogger(self.run_dir, enabled=self.is_logger, tensorboard=run.tensorboard,
                               progress=run.progress, total_steps=run.steps,
                               initial_step=self.step_idx)
        rows, evals = [], self.held_out_eval
        try:
            # the step-0 baseline, or an evaluation a kill cut off after its step's checkpoint
            if evals.missing(self.step_idx):
                self.evaluate(logger)
            elif self.step_idx >= run.steps:
                log.warning("the checkpoint is at step %d and run.steps=%d: nothing to do "
                            "(raise --run.steps to continue)", self.step_idx, run.steps)
            while self.step_idx < run.steps:
                metrics = self.step()
                rows.append(logger.log(self.step_idx, metrics))
                if self.is_logger and self.expert_loads:
                    append_jsonl(self.run_dir / "expert_load.jsonl", {
                        "step": self.step_idx, "tokens_per_expert": {
                            str(layer): counts for layer, counts in self.expert_loads.items()}})
                if run.save_every and self.step_idx % run.save_every == 0:
                    self.save()
                if evals.due(self.step_idx) and self.step_idx < run.steps:
                    self.evaluate(logger)
            if not rows:
                return rows
            if not run.save_every or self.step_idx % run.save_every != 0:
                self.save()
            self.evaluate(logger)  # after the last checkpoint: a kill here evaluates at restart
        finally:
            logger.close()
            self.task.close()
        return rows


def train_main(recipe: str | None, overrides: Sequence[str]) -> int:
    """``r1fast train RECIPE [--a.b=v ...]``."""
    from r1fast.cli import log_to_stderr

    log_to_stderr("%(asctime)s %(name)s %(message)s")
    cfg = load_train_config(recipe, overrides)
    trainer = GRPOTrainer(cfg)
    rows = trainer.fit()
    if trainer.is_logger:
        last = (f"last reward {rows[-1]['reward_mean']:.3f}" if rows else
                "no step ran here (the checkpoint was at run.steps)")
        tb = "tensorboard/, " if cfg.run.tensorboard else ""
        print(f"done: {trainer.step_idx} steps, run folder {trainer.run_dir} "
              f"(metrics.jsonl, {tb}checkpoints/); {last}", file=sys.stderr)
    return 0
