"""Configuration of a GRPO run: one dataclass per component, composed in :class:`TrainConfig`.

A TOML recipe (``recipes/*.toml``) mirrors this nesting (``[model]``, ``[parallel]``,
``[algo]``, ``[rollout]``, ``[optim]``, ``[data]``, ``[reward]``, ``[run]``); any field can be
overridden from the command line as ``--algo.kl_coef=0.001`` (see :mod:`r1fast.typed_toml`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from r1fast import typed_toml as _config
from r1fast.ops.fused_linear_policy_grad import TOKEN_LEVEL_LOSSES
from r1fast.ops.policy_loss import PolicyLossConfig
from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.optim import OptimConfig
from r1fast.rollout.sampler import LOGPROB_MODES
from r1fast.typed_toml import FLATTEN


def _grpo_objective() -> PolicyLossConfig:
    """The recipe defaults of the GRPO objective: DAPO's clip-higher, a k3 KL penalty, and the
    R1 paper's seq-mean-token-mean aggregation."""
    return PolicyLossConfig(clip_high=0.28, kl="k3", kl_coef=1e-3, agg="seq-mean-token-mean")


@dataclass
class AlgoConfig:
    """The GRPO objective (docs/DESIGN.md §3) and the update schedule.

    The loss options are :class:`r1fast.ops.PolicyLossConfig`'s own fields, written directly
    in ``[algo]`` (``loss``, ``clip_low``, ``clip_high``, ``dual_clip``, ``kl``, ``kl_coef``,
    ``agg``, ``tis_cap``; e.g. ``--algo.kl_coef=0.001``) and held in :attr:`objective`."""

    group_size: int = 8
    """G: completions sampled per prompt."""
    estimator: Literal["grpo", "drgrpo", "rloo"] = "grpo"
    """Group advantage: grpo (mean/std), drgrpo (mean only), rloo (leave-one-out)."""
    adv_eps: float = 1e-6
    """eps in (r - mean) / (std + eps)."""
    objective: PolicyLossConfig = field(default_factory=_grpo_objective, metadata=FLATTEN)
    """The policy loss: surrogate, clipping, KL estimator and coefficient, aggregation, TIS.
    A KL term is used only with kl_coef > 0 (then a frozen reference policy is kept)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    mini_batches: int = 1
    """Optimizer steps per epoch: the rollout batch split into this many consecutive
    mini-batches, each DP rank holding its share of every one (the same rows per step at any
    DP size when ``data.prompts_per_step`` is a multiple of ``mini_batches`` x dp; warned
    otherwise)."""
    ref_reset_every: int = 0
    """Copy the policy into the reference every N steps (0: the reference stays frozen)."""
    dynamic_sampling: bool = False
    """Mask the groups whose rewards are all equal (they carry no gradient); with
    max_sampling_rounds > 1, replace them by sampling more prompts, as DAPO does."""
    max_sampling_rounds: int = 1
    """With dynamic_sampling: rounds of data.prompts_per_step prompts a step may sample until
    groups whose rewards vary fill its batch (DAPO's refill; verl's
    filter_groups.max_num_gen_batches); each round advances the data. 1: one round, the step
    trains on the groups with signal it has (r1fast.train.dynamic_sampling)."""
    overlong_filter: bool = False
    """Mask the loss of completions truncated at max_new_tokens."""
    router_replay: bool = False
    """Train on the routing decisions recorded during generation (R3)."""
    router_replay_capture: Literal["rollout", "posthoc"] = "rollout"
    """With router_replay: "rollout" replays the experts the decoder chose for every token
    while sampling (true R3); "posthoc" those of a separate forward over the finished
    sequences (the older capture: differs when the sampler's numerics differ)."""
    use_fused_kernels: bool = True
    """Compute log-probs and the loss with r1fast's fused ops (False: plain full logits)."""
    logprob_head: Literal["fused", "gemm", "grad-in-forward"] = "fused"
    """How the fused op arranges the LM head's GEMMs (docs/GPU.md; bench_grpo_loss measures
    them): "fused" Triton GEMM tiles with the softmax in their epilogue, the backward
    recomputes the logits (8THV FLOPs); "gemm" cuBLAS fp32 logit tiles reduced by Triton row
    kernels (the same FLOPs, more memory traffic); "grad-in-forward" cuBLAS tiles with the
    gradients formed in the forward (6THV FLOPs, for an fp32 [V/tp, H] accumulator and both
    gradients kept until the backward; token-level losses ppo and cispo only). The last two
    run on Triton only: a GPU, or kernel_impl="triton" under TRITON_INTERPRET=1."""
    kernel_impl: Literal["auto", "torch", "triton"] = "auto"
    """Implementation of the fused op (log-probs and loss): "auto" picks Triton on a GPU and
    torch on a CPU; "torch" or "triton" is used as asked, or the run stops before the model
    is built."""

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"algo.group_size must be >= 2, got {self.group_size}: the "
                             f"{self.estimator} advantage of a group of one completion is always 0,"
                             f" so nothing would be learned")
        if self.ppo_epochs < 1 or self.mini_batches < 1:
            raise ValueError(f"algo.ppo_epochs and algo.mini_batches must be >= 1, got "
                             f"{self.ppo_epochs} and {self.mini_batches}")
        if not self.adv_eps > 0:
            raise ValueError(f"algo.adv_eps must be > 0, got {self.adv_eps}")
        for key, value, default in (("logprob_head", self.logprob_head, "fused"),
                                    ("kernel_impl", self.kernel_impl, "auto")):
            if value != default and not self.use_fused_kernels:
                raise ValueError(f"algo.{key}={value!r} is a choice of the fused op, which "
                                 f"algo.use_fused_kernels=false turns off: use {key}="
                                 f"\"{default}\" or use_fused_kernels=true")
        if self.logprob_head == "grad-in-forward" and self.objective.loss not in TOKEN_LEVEL_LOSSES:
            raise ValueError(f"algo.logprob_head=\"grad-in-forward\" needs a token-level "
                             f"algo.loss {TOKEN_LEVEL_LOSSES}, got {self.objective.loss!r} (it "
                             "couples the tokens of a sequence)")
        if self.max_sampling_rounds < 1 or (self.max_sampling_rounds > 1
                                            and not self.dynamic_sampling):
            raise ValueError(f"algo.max_sampling_rounds must be >= 1, and > 1 only with "
                             f"algo.dynamic_sampling = true (it refills the groups that "
                             f"dynamic sampling masks), got {self.max_sampling_rounds} with "
                             f"dynamic_sampling = {str(self.dynamic_sampling).lower()}")
        if self.ref_reset_every < 0:
            raise ValueError(f"algo.ref_reset_every must be >= 0 (0: never), got "
                             f"{self.ref_reset_every}")


@dataclass
class RolloutConfig:
    """Sampling of completions."""

    temperature: float = 1.0
    """Sampling temperature, also used by the trainer's log-probs so ratios compare like with like."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = 0
    """Top-k sampling; 0 disables."""
    max_new_tokens: int = 48
    """Completion length limit."""
    logprobs: Literal["full", "sampled"] = "full"
    """The rollout log-prob recorded per token (``rollout_logp``: TIS's ``mu`` and the
    ``logp_mismatch`` metric): "full" (the temperature-scaled softmax over the vocabulary, the
    trainer's own quantity; top-p/top-k truncation is then a bias nothing corrects, a WARNING)
    or "sampled" (the truncated distribution the tokens were drawn from, vLLM's "processed"
    log-probs; with ``algo.tis_cap`` each token is weighted by ``pi / mu`` of the policy that
    really sampled it)."""
    decoder: Literal["kv_cache", "recompute"] = "kv_cache"
    """"kv_cache": ragged prefill, then one token per step from the KV cache (an error names why
    when the policy cannot use it); "recompute": re-run the whole prefix for every token (full
    logits, 10-100x slower; a WARNING at every rollout), for debugging."""
    prefill_tokens: int = 0
    """Tokens (rows x prompt positions) one prefill forward of the KV-cache decoder may hold;
    0: every prompt of the DP rank in one forward. A larger batch is prefilled in slices of
    positions (the same numbers to float rounding), which bounds the prefill's transient
    memory to that of this many tokens."""
    experts: Literal["auto", "grouped", "sequential"] = "auto"
    """How the KV-cache decoder computes the routed experts: "grouped" (two Triton launches
    per MoE layer, the row counts kept on the GPU: no per-expert launches, no wait per layer;
    an error where Triton cannot run), "sequential" (megatron's per-expert loop, as training),
    "auto" (grouped on a GPU). Sampling only: the trainer's forwards and backwards follow
    ``parallel.experts``."""

    def __post_init__(self):
        if not self.temperature > 0:  # the trainer's log-probs divide the logits by it
            raise ValueError(f"rollout.temperature must be > 0 (training divides the logits by "
                             f"it), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"rollout.top_k must be >= 0 (0: off), got {self.top_k}")
        if self.logprobs not in LOGPROB_MODES:
            raise ValueError(f"rollout.logprobs must be one of {LOGPROB_MODES}, got "
                             f"{self.logprobs!r}")
        if not isinstance(self.prefill_tokens, int) or self.prefill_tokens < 0:
            raise ValueError(f"rollout.prefill_tokens must be an int >= 0 (0: one forward), "
                             f"got {self.prefill_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def decoder_options(self) -> dict:
        """:func:`~r1fast.rollout.kv_cache.make_decoder`'s keywords for these settings: the
        rollout's decoder and the held-out evaluation's are the same one."""
        return dict(recompute=self.decoder == "recompute", prefill_tokens=self.prefill_tokens,
                    experts=self.experts)


@dataclass
class DataConfig:
    """The prompt source: a dataset file (``path``) or a synthetic task (``task``)."""

    path: Optional[str] = None
    """Training data: a .jsonl / .json / .parquet file or a folder of them (see
    r1fast.data.files); None: the synthetic ``task``."""
    test_path: Optional[str] = None
    """Held-out data in the same layout, or None: evaluated at the end of training (pass@1 over
    ``eval_k`` samples at T=0.6/top-p 0.95, cons@k; also see ``eval_every`` and
    ``eval_before_train``), written to out_dir/eval.jsonl (r1fast.train.held_out)."""
    eval_k: int = 4
    """Samples per held-out problem."""
    eval_max_problems: int = 64
    """Held-out problems evaluated (the first ones of test_path)."""
    eval_every: int = 0
    """Also evaluate the held-out problems every N steps (0: only at the end)."""
    eval_before_train: bool = False
    """Also evaluate them before the first step: the baseline each later row of eval.jsonl
    reports its change against (paired over problems, with a standard error)."""
    preset: Optional[Literal["gsm8k", "math", "dapo", "deepscaler", "countdown", "verl"]] = None
    """Column layout of the files; None: ``prompt_key`` / ``answer_key``."""
    prompt_key: Optional[str] = None
    """Column of the prompt (text or chat messages) when no preset is given (default prompt)."""
    answer_key: Optional[str] = None
    """Column of the ground-truth answer when no preset is given (default answer)."""
    chat_template: bool = True
    """Render prompts with the tokenizer's chat template (when the tokenizer has one)."""
    system_prompt: Optional[str] = None
    """A system message put before each prompt (chat template only)."""
    max_prompt_tokens: int = 0
    """Drop prompts longer than this many tokens, counted in a warning (0: keep all, and a
    prompt that does not fit the context beside rollout.max_new_tokens is an error)."""
    task: Literal["countdown", "arithmetic"] = "arithmetic"
    """Synthetic reasoning task (see r1fast.data), used when ``path`` is None."""
    prompts_per_step: int = 4
    """Distinct prompts per step (each sampled group_size times)."""
    seed: int = 0
    """Seed of the task generator and of the prompt order."""
    num_train: int = 2000
    """Training problems generated (synthetic task)."""
    num_test: int = 0
    """Held-out problems of the synthetic task evaluated at the end of training like
    ``test_path`` (its test split, disjoint from training by problem key); 0: none."""
    task_options: dict[str, Any] = field(default_factory=dict)
    """Task generator fields, e.g. {min_digits = 1, max_digits = 2, ops = ["+"]}."""
    template: Optional[str] = None
    """Prompt template with a {question} placeholder, or "r1-zero" for r1fast's R1-Zero
    instruction; None: the synthetic task's own prompt, or the question alone for files."""

    def __post_init__(self):
        # checked here, at load time: prompts_per_step=0 used to pass until the dataset was
        # built after the model (seconds later) and was then reported as 'batch_size'
        for key, low in (("prompts_per_step", 1), ("num_train", 1), ("num_test", 0),
                         ("eval_k", 1), ("eval_max_problems", 1), ("max_prompt_tokens", 0),
                         ("eval_every", 0)):
            value = getattr(self, key)
            if value < low:
                allowed = {"max_prompt_tokens": " (0: keep all)",
                           "eval_every": " (0: only at the end)"}.get(key, "")
                raise ValueError(f"data.{key} must be >= {low}{allowed}, got {value}")
        if self.num_test and (self.path is not None or self.test_path is not None):
            given = "data.path" if self.path is not None else "data.test_path"
            raise ValueError(f"data.num_test={self.num_test} counts held-out problems of the "
                             f"synthetic data.task, but {given} is set (its held-out rows are "
                             f"data.test_path, capped by data.eval_max_problems)")
        if self.task_options:  # a typo here used to surface as a raw TypeError at build time
            if self.path is not None:
                raise ValueError(f"data.task_options={self.task_options} configures the "
                                 f"synthetic data.task, but data.path={self.path} is set: "
                                 f"drop one")
            from r1fast.data.tasks import task_config
            task_config(self.task, self.task_options, "data.task_options")


@dataclass
class RewardConfig:
    """Rule-based rewards, weighted and summed; optionally a trained reward model for the rows
    that route to it (R1's stage 4: rule rewards for reasoning, a reward model for general
    prompts; see r1fast.train.task)."""

    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    """Reward name -> weight (names from r1fast.rewards), for every row that does not route to
    the reward model; ``reward_model`` may be one of them (then ``reward_model`` must be set).
    A table replaces this default whole: ``{accuracy = 1.0}`` scores accuracy alone."""
    timeout_s: float = 5.0
    """Wall-clock limit per reward call in a worker (the worker is killed): the outer bound."""
    cpu_time_s: Optional[float] = None
    """CPU-time limit per reward call, in seconds of CPU: what decides a "timeout" verdict, the
    same on a busy and an idle machine, in workers and in-process. None: half of
    ``timeout_s`` (a CPU limit equal to the wall-clock one would never be reached first)."""
    workers: int = 1
    """Worker processes evaluating rewards (0: in-process: the CPU-time limit applies, there is
    no wall-clock kill)."""
    accuracy_metric: str = "accuracy"
    """Which reward part is reported as 'accuracy'."""
    language: Optional[str] = None
    """R1 stage 2: target language (a code of r1fast.rewards.language.LANGUAGE_SCRIPTS, e.g.
    "en") of the ``language`` part, the share of target-language words in the chain of
    thought; it joins ``weights`` at 1.0 (R1 sums it with accuracy) unless ``weights.language``
    sets its weight. None: a ``weights.language`` part targets English."""
    reward_model: Optional[str] = None
    """A reward-model folder (the ``model/`` folder ``r1fast stage reward-model`` writes),
    loaded once at the run's parallel layout and scored in this process, in batches. Rows whose
    ``reward`` field is ``"reward_model"`` (or ``"model"``) are scored by it alone, as
    ``reward_model_weight * score`` of ``prompt + completion``, the prompt rendered as the
    reward model was trained to read it (its tokenizer and chat template)."""
    reward_model_weight: float = 1.0
    """Weight of the reward model's score on the rows routed to it."""
    reward_model_normalize: bool = False
    """Standardise the reward model's scores with the mean and standard deviation its training
    recorded (OpenRLHF's normalize_reward): raw Bradley-Terry scores have an arbitrary offset
    and a spread that grows with training, which matters where they are added to 0/1 rule
    rewards in one row or where the advantage is not divided by the group's spread (drgrpo,
    rloo); a run like that without it is warned."""
    reward_model_batch_size: int = 16
    """Texts per reward-model forward."""

    def __post_init__(self):
        if self.language is not None:
            from r1fast.rewards.language import LANGUAGE_SCRIPTS
            if self.language not in LANGUAGE_SCRIPTS:
                raise ValueError(f"reward.language must be one of {sorted(LANGUAGE_SCRIPTS)}, "
                                 f"got {self.language!r}")
            self.weights = {**self.weights, "language": self.weights.get("language", 1.0)}
        if not self.timeout_s > 0:
            raise ValueError(f"reward.timeout_s must be > 0 seconds, got {self.timeout_s}")
        if self.cpu_time_s is not None and not self.cpu_time_s > 0:
            raise ValueError(f"reward.cpu_time_s must be > 0 seconds (or unset), got "
                             f"{self.cpu_time_s}")
        if self.reward_model_batch_size < 1:
            raise ValueError(f"reward.reward_model_batch_size must be >= 1, got "
                             f"{self.reward_model_batch_size}")
        if not math.isfinite(self.reward_model_weight):
            raise ValueError(f"reward.reward_model_weight must be finite, got "
                             f"{self.reward_model_weight}")
        if self.workers < 0:
            raise ValueError(f"reward.workers must be >= 0 (0: in-process), got {self.workers}")


@dataclass
class RunConfig:
    """Where and how long."""

    out_dir: str = "runs/grpo"
    """Run folder: metrics.jsonl, tensorboard/, checkpoints/, config.toml."""
    steps: int = 10
    """GRPO steps (rollout + update) in total, including resumed ones."""
    seed: int = 0
    """Seed of model init and sampling."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_last: int = 0
    """Keep the newest N checkpoints: older ones are deleted after each save, each deletion
    logged; 0 keeps every checkpoint (as Megatron-LM and verl do)."""
    resume: bool = True
    """Continue from out_dir/checkpoints/latest when present."""
    init_from: Optional[str] = None
    """Start from weights: a Hugging Face folder (safetensors) or an r1fast checkpoint folder."""
    tensorboard: bool = True
    """Also write TensorBoard scalars."""
    progress: bool = True
    """Show a progress bar."""
    overwrite: bool = False
    """Allow starting from step 0 in an out_dir that already holds checkpoints or metrics (no
    usable checkpoint, or resume=false). Nothing is deleted: the old checkpoints/, metrics.jsonl
    and tensorboard/ move to out_dir/previous_<time>/. Without it such a start is an error."""

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"run.steps must be >= 1, got {self.steps}")
        if self.seed < 0:  # the sampling streams hash it: -1 and -2 would share them
            raise ValueError(f"run.seed must be >= 0, got {self.seed}")
        if self.save_every < 0:
            raise ValueError(f"run.save_every must be >= 0 (0: only at the end), got "
                             f"{self.save_every}")
        if self.keep_last < 0:
            raise ValueError(f"run.keep_last must be >= 0 (0: keep every checkpoint), got "
                             f"{self.keep_last}")
        if not str(self.out_dir).strip():
            raise ValueError("run.out_dir must be a folder path, got an empty string")


DEFAULT_LR = _config.DefaultFloat(1e-4)
"""The trainer's learning rate when nothing sets ``optim.lr``: sized for the small models r1fast
trains from scratch (the tiny presets). Marked as nobody's choice (a recipe's or override's 1e-4
is a plain float), so :func:`config_warnings` names it only when a run starts from a large
pretrained checkpoint without choosing."""
LARGE_MODEL_PARAMS = 10**8
"""From this many parameters a checkpoint counts as a pretrained LLM for the default-lr warning."""


@dataclass
class TrainConfig:
    """A whole GRPO run."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig.preset("tiny-moe"))
    """Policy architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP/PP/EP layout (DP is what remains of the world size)."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """Objective and update schedule."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=DEFAULT_LR))
    """Optimizer and LR schedule (megatron-core's); total_steps is set from the run length
    (another value is an error)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Rewards."""
    run: RunConfig = field(default_factory=RunConfig)
    """Output, length, checkpoints."""

    def __post_init__(self):
        self.model.validate()
        if (self.rollout.decoder == "recompute" and self.algo.router_replay
                and self.algo.router_replay_capture == "rollout"):
            raise ValueError("rollout.decoder='recompute' cannot record the experts while "
                             "decoding, which algo.router_replay_capture='rollout' asks for: set "
                             "algo.router_replay_capture='posthoc' (or use the kv_cache decoder)")


def config_warnings(cfg: TrainConfig) -> list[str]:
    """What the trainer warns about at its start: its sampling (:func:`_sampling_warnings`), and
    the default learning rate of a run that starts from a pretrained checkpoint of at least
    :data:`LARGE_MODEL_PARAMS` parameters (the tiny models r1fast pretrains itself want it)."""
    from r1fast.plan.memory import total_params

    from r1fast.train.packing import sequence_loss_on_packed_rows

    out = _sampling_warnings(cfg) + _unused_option_warnings(cfg)
    if packed_rows := sequence_loss_on_packed_rows(cfg.model, cfg.parallel):
        out.append(packed_rows)
    init = cfg.run.init_from
    if isinstance(cfg.optim.lr, _config.DefaultFloat) and init and is_model_folder(init):
        params = total_params(cfg.model)
        if params >= LARGE_MODEL_PARAMS:
            out.append(f"optim.lr={DEFAULT_LR:g} is the trainer's default, sized for the small "
                       f"models r1fast trains from scratch; RL from a pretrained checkpoint "
                       f"({init}, {params / 1e9:.2f} B parameters) usually runs near 1e-6 "
                       f"(verl's actor default): set optim.lr")
    return out


def _unused_option_warnings(cfg: TrainConfig) -> list[str]:
    """Options set to something other than their default that this run never reads, because
    the option they depend on is off (each used to be accepted without a word)."""
    def changed(section: str, name: str) -> bool:
        obj = getattr(cfg, section)
        f = next(f for f in dataclasses.fields(obj) if f.name == name)
        return getattr(obj, name) != _config._field_default(f)

    p, a, d, r = cfg.parallel, cfg.algo, cfg.data, cfg.reward
    packed = p.max_tokens_per_microbatch > 0
    no_held_out = d.test_path is None and not (d.path is None and d.num_test)
    kl = a.objective.kl is not None and a.objective.kl_coef > 0
    unread = [  # (section, option, unread when, why)
        ("parallel", "micro_batch_size", packed, "parallel.max_tokens_per_microbatch packs"),
        ("parallel", "max_tokens_per_logprob_forward", not packed,
         "it sizes packed forwards, and parallel.max_tokens_per_microbatch is 0"),
        ("data", "task", d.path is not None, f"data.path={d.path} is the data"),
        ("data", "num_train", d.path is not None, f"data.path={d.path} is the data"),
        ("algo", "router_replay_capture", not a.router_replay, "algo.router_replay is off"),
        ("algo", "ref_reset_every", not kl, "there is no reference (algo.kl_coef 0 or no kl)"),
        ("reward", "reward_model_weight", r.reward_model is None, "no reward.reward_model"),
        ("reward", "reward_model_normalize", r.reward_model is None, "no reward.reward_model"),
        ("model", "aux_loss_type", not cfg.model.aux_loss_coef, "model.aux_loss_coef is 0"),
        ("data", "system_prompt", d.path is None and d.template is None,
         f"the synthetic data.task={d.task!r} prompts as written, outside any chat template "
         f"(set data.template, e.g. 'r1-zero', to render its questions in the chat template)"),
        *(("data", key, no_held_out, "there are no held-out problems (data.test_path, or "
           "data.num_test with the synthetic task)")
          for key in ("eval_k", "eval_max_problems", "eval_every", "eval_before_train"))]
    out = [f"{section}.{name}={getattr(getattr(cfg, section), name)!r} is not used: {why}"
           for section, name, unread_, why in unread if unread_ and changed(section, name)]
    if r.cpu_time_s is not None and r.cpu_time_s >= r.timeout_s:
        out.append(f"reward.cpu_time_s={r.cpu_time_s:g} >= reward.timeout_s={r.timeout_s:g}: "
                   f"the wall-clock limit always ends a call first (CPU time never runs ahead "
                   f"of it)")
    return out


def _sampling_warnings(cfg: TrainConfig) -> list[str]:
    """A truncated sampler whose bias nothing corrects, or sampled log-probs that nothing reads
    but a metric."""
    r, tis = cfg.rollout, cfg.algo.objective.tis_cap
    truncation = ([f"rollout.top_p={r.top_p}"] if r.top_p < 1 else []) + (
        [f"rollout.top_k={r.top_k}"] if r.top_k > 0 else [])
    if truncation and (r.logprobs == "full" or tis is None):
        return [f"{' and '.join(truncation)}: completions are drawn from a truncated "
                f"distribution, but the loss is of the full policy, and nothing corrects the "
                f"difference (a biased gradient); "
                f"set rollout.logprobs='sampled' with algo.tis_cap (e.g. 2.0) to weigh each "
                f"token by pi/mu, or sample untruncated (top_p=1, top_k=0)"]
    if r.logprobs == "sampled" and tis is None:
        return ["rollout.logprobs='sampled' without algo.tis_cap: the sampled log-probs feed "
                "only the logp_mismatch metric (which then includes the truncation); set "
                "algo.tis_cap to correct the loss with them"]
    return []


def load_train_config(recipe: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Recipe TOML + dotted overrides -> a validated :class:`TrainConfig`.

    The checkpoint defines the model: with ``run.init_from`` naming a model folder
    (``config.json`` / ``r1fast_config.json``) and no ``[model]`` table, the architecture is the
    folder's; ``[model]`` may add training choices (:data:`TRAINING_CHOICES`, e.g. the aux-loss
    coefficient), and an architecture field it sets differently is an error listing the fields.
    """
    try:
        data = _config.read(recipe, overrides)
        cfg = _config.from_dict(TrainConfig, data)
        init = cfg.run.init_from
        if init and is_model_folder(init):
            cfg = _model_from_checkpoint(cfg, init, data.get("model", {}))
        return cfg
    except ValueError as e:
        if isinstance(e, _config.ConfigError):
            raise
        raise _config.ConfigError(str(e)) from e


def is_model_folder(path: str) -> bool:
    """Whether ``path`` holds a model's config (Hugging Face or r1fast)."""
    return any((Path(path) / f).is_file() for f in ("config.json", "r1fast_config.json"))


#: ModelConfig fields that are training choices, not architecture: [model] may set them on top
#: of a checkpoint's architecture
TRAINING_CHOICES = frozenset({"aux_loss_coef", "aux_loss_type", "z_loss_coef",
                              "router_bias_update_rate", "params_dtype", "init_std"})


def _model_from_checkpoint(cfg: TrainConfig, init: str, given: dict) -> TrainConfig:
    """The checkpoint's architecture, plus the training choices [model] sets; an architecture
    field [model] sets differently is an error (all fields count as set with a preset)."""
    from r1fast.policy.hf_checkpoint import load_model_config

    theirs = load_model_config(init)
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    keys = set(names) if "preset" in given else set(given) & set(names)
    diff = [f"{k}: [model] {getattr(cfg.model, k)!r} vs checkpoint {getattr(theirs, k)!r}"
            for k in sorted(keys - TRAINING_CHOICES) if getattr(cfg.model, k) != getattr(theirs, k)]
    if diff:
        raise _config.ConfigError(f"[model] disagrees with run.init_from={init} (leave those "
                                  f"fields out to take the checkpoint's): " + "; ".join(diff))
    chosen = {k: getattr(cfg.model, k) for k in keys & TRAINING_CHOICES}
    model = dataclasses.replace(theirs, **chosen)
    return dataclasses.replace(cfg, model=model)


def with_changes(cfg: TrainConfig, **sections) -> TrainConfig:
    """Copy of ``cfg`` with some sections' fields replaced: ``with_changes(cfg, run={"steps": 3})``."""
    out = cfg
    for name, changes in sections.items():
        out = dataclasses.replace(out, **{name: dataclasses.replace(getattr(out, name), **changes)})
    return out
