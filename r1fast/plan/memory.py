"""Per-GPU memory model of a GRPO run: what ``r1fast plan`` prints, as numbers.

Why a planner: a 30B or 671B MoE recipe either fits the GPUs it is launched on or dies with an
out-of-memory error after minutes of start-up. Every term below is a closed formula of the
recipe (model shape, TP/PP/EP layout, batch sizes, dtypes), so the answer is instant.

Parameters follow megatron-core's layout exactly (the local GPT layer spec r1fast builds; the
Transformer Engine spec fuses the norms into the next linear, which has the same count):

- per layer: ``input_layernorm [H]``, ``linear_qkv [(nq + 2 nkv) d / tp, H]`` (+ its bias with
  add_qkv_bias), ``q_layernorm``/``k_layernorm [d]`` each, ``linear_proj [H, nq d / tp]``,
  ``pre_mlp_layernorm [H]``; a dense layer's ``linear_fc1 [2 F / tp, H]`` and
  ``linear_fc2 [H, F / tp]`` (SwiGLU); an MoE layer's ``router [E, H]`` (replicated over TP),
  ``E / ep`` whole experts of ``[2 Fm, H] + [H, Fm]`` (expert TP = 1) and a shared expert split
  like a dense MLP (+ its ``[1, H]`` gate);
- the embedding ``[V / tp, H]`` on the first pipeline stage, the final norm and the output
  layer ``[V / tp, H]`` on the last (a tied output layer is still a second copy when pp > 1).

Memory per rank, for each pipeline stage (the report shows the worst one). Assumptions,
matching r1fast's policy (r1fast.policy.optim):

- parameters in ``model.params_dtype``; megatron DDP keeps fp32 ``main_grad`` buffers for
  every local parameter (``grad_reduce_in_fp32=True``), unsharded;
- Adam keeps fp32 ``m`` and ``v``, plus fp32 master weights when the parameters are 16-bit;
  with the distributed optimizer that state is split over the data-parallel ranks for dense
  parameters (DP = world / (tp pp)) and, when ep > 1, over the expert-data-parallel ranks for
  expert parameters (EDP = world / (ep pp)); megatron files experts under dense at ep = 1;
- a frozen reference policy (parameters only) when the KL term is on;
- activations (r1fast.plan.activations): the peak saved tensors of one micro-batch of
  ``micro_batch_size`` sequences of ``prompt_len + max_new_tokens`` tokens (with
  ``parallel.max_tokens_per_microbatch``: ONE packed sequence of that many tokens, or of one
  full-length row when that is longer, as r1fast.train.packing builds it), for three recompute
  settings (none; selective = megatron's ``recompute_modules`` core_attn, as
  ParallelConfig.recompute sets it; full = uniform, one layer per checkpoint), counted tensor
  by tensor for the Transformer Engine layers (flash attention) or megatron's local layers
  (GQA or MLA), with balanced expert load; 1F1B keeps ``min(pp - stage, n_micro)``
  micro-batches in flight on a stage (full recompute: their layer inputs, one re-run layer);
- the log-prob head on the last stage: full fp32 logits ``[T, V / tp]`` with their softmax and
  gradient copies (a vocab-parallel cross-entropy; r1fast's own unfused baseline,
  ``algo.use_fused_kernels = false``, even gathers ``[T, V]``), or the fused kernel's bounded
  workspace (r1fast.ops.linear_logprob);
- rollout: a KV cache for this DP rank's share of ``prompts_per_step * group_size`` sequences
  while the weights and optimizer state stay resident (colocated training and sampling), and
  the transient of one prefill forward over those prompts, or over a slice of
  ``rollout.prefill_tokens`` tokens (r1fast.plan.prefill), or, at other moments, a decode
  step's (one query per row over the longest cache) or the sampler's temporaries (one chunk
  of rows of fp64 CDFs: r1fast.rollout.sampler) beside the last stage's ``[B, V]`` logits;
- a fixed runtime reserve (CUDA context, NCCL buffers, allocator fragmentation).

- a checkpoint save (between steps): the GPU all-gather of one optimizer buffer (see
  ``StagePlan.save_bytes``).

Not modelled: the optimizer step's transient (torch's AdamW, without TE or apex, makes an fp32
``sqrt(v)`` per parameter of its shard: below the checkpoint save's gather, which holds a whole
buffer, with the distributed optimizer), forward-only passes (old and reference log-probs: no
saved activations, their transient is below the training one), expert load imbalance (the
busiest expert's rank holds more routed tokens), MTP layers (not built), CPU offload, NCCL
communicators beyond the reserve, and megatron's buffer padding (< 1%). r1fast.plan.measure
measures a built policy for comparison; tests/plan/test_plan.py and
tests/policy/test_recompute.py hold the formulas to megatron that way.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from r1fast.plan.activations import (_BYTES, held_activation_bytes,  # noqa: F401 (re-exports)
                                     layer_activation_bytes, stage_activation_bytes)
from r1fast.plan.measure import (measure_peak_saved_bytes, measure_saved_bytes,  # noqa: F401
                                 measure_state_bytes)
from r1fast.plan.mla_memory import mla_params as _mla_params
from r1fast.plan.prefill import prefill_bytes
from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.config_checks import runs_grouped
from r1fast.rollout.kv_cache import prefill_width
from r1fast.rollout.sampler import SAMPLE_BYTES_PER_LOGIT, sample_rows_per_chunk

GiB = 1024 ** 3
RECOMPUTE_MODES = ("none", "selective", "full")
DECODERS = ("kv-cache", "recompute")
SPECS = ("te", "local")


@dataclass
class PlanOptions:
    """What the recipe does not say and the planner has to assume (``r1fast plan`` flags)."""

    gpu_mem_gib: float = 80.0
    """Memory of one GPU in GiB (80 for an H100 80GB, 141 for an H200)."""
    world_size: Optional[int] = None
    """GPUs in the job; None: ``parallel.world_size`` of the recipe, else the smallest valid
    world, lcm(tp, ep) * pp."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute assumed for the total (all three are reported)."""
    prompt_len: Optional[int] = None
    """Prompt tokens per sequence; None: ``data.max_prompt_tokens`` (the longest prompt the
    trainer keeps), else 512, at most max_position_embeddings - max_new_tokens."""
    spec: Literal["te", "local"] = "te"
    """Layer implementation the activations are counted for: "te" (Transformer Engine on GPU:
    flash attention, fused RMSNorm) or "local" (megatron's local layers, as on CPU)."""
    decoder: Literal["kv-cache", "recompute"] = "kv-cache"
    """Rollout memory: the KV-cached decoder, or the prefix-recomputing decoder (an explicit
    opt-in, ``rollout.decoder = "recompute"``) that materialises full fp32 logits [B, L, V]."""
    reserve_gib: float = 2.0
    """CUDA context, NCCL buffers and allocator fragmentation, added to every peak."""

    def validate(self) -> "PlanOptions":
        if not (isinstance(self.gpu_mem_gib, (int, float)) and self.gpu_mem_gib > 0):
            raise ValueError(f"gpu_mem_gib must be a number > 0, got {self.gpu_mem_gib!r}")
        if self.world_size is not None and (not isinstance(self.world_size, int)
                                            or self.world_size < 1):
            raise ValueError(f"world_size must be an int >= 1, got {self.world_size!r}")
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {self.recompute!r}")
        if self.spec not in SPECS:
            raise ValueError(f"spec must be one of {SPECS}, got {self.spec!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        if self.prompt_len is not None and (not isinstance(self.prompt_len, int)
                                            or self.prompt_len < 1):
            raise ValueError(f"prompt_len must be an int >= 1, got {self.prompt_len!r}")
        if not self.reserve_gib >= 0:
            raise ValueError(f"reserve_gib must be >= 0, got {self.reserve_gib!r}")
        return self


@dataclass
class StagePlan:
    """One pipeline stage's rank (every TP/EP rank of a stage holds the same amount)."""

    stage: int
    """Pipeline stage index."""
    layers: tuple[int, int]
    """[first, last) global layer indices held."""
    dense_params: int
    """Local parameters that are replicated over data parallelism (attention, norms, dense MLP,
    router, shared expert, embedding/output shards)."""
    expert_params: int
    """Local routed-expert parameters (replicated over expert data parallelism only)."""
    param_bytes: int
    """Local parameters in the model dtype."""
    grad_bytes: int
    """fp32 main_grad buffers of the local parameters."""
    master_bytes: int
    """fp32 master weights (16-bit models), this rank's optimizer shard."""
    adam_bytes: int
    """Adam m and v (fp32), this rank's optimizer shard."""
    reference_bytes: int
    """Frozen reference policy (KL), model dtype; 0 without KL."""
    activation_bytes: dict[str, int]
    """Peak saved activations of ONE micro-batch on this stage, per recompute mode."""
    in_flight: int
    """Micro-batches whose activations 1F1B holds at once on this stage."""
    activations_total: int
    """Activations held at the peak with the chosen recompute mode."""
    logprob_fused_bytes: int
    """Log-prob head, fused op in the recipe's ``algo.logprob_head`` arrangement: its
    workspace + fp32 dW accumulator + per-token stats, and with grad-in-forward the gradients
    kept until the backward (last stage only)."""
    logprob_unfused_bytes: int
    """Log-prob head through full logits [T, V/tp]: fp32 logits, softmax saved for backward,
    fp32 gradient, plus the 16-bit matmul output (last stage only)."""
    logprob_bytes: int
    """The one the recipe uses (algo.use_fused_kernels)."""
    kv_cache_bytes: int
    """Rollout KV cache of this stage's layers for this DP rank's sequences."""
    rollout_logits_bytes: int
    """Sampling logits held during rollout (decoder-dependent; KV-cache decoder: the last
    stage only)."""
    sampling_bytes: int
    """The sampler's temporaries for one chunk of those logits' rows (fp64 CDF and more:
    ``r1fast.rollout.sampler.SAMPLE_BYTES_PER_LOGIT`` per logit)."""
    prefill_bytes: int
    """Transient of one prefill forward of the KV-cache decoder (r1fast.plan.prefill): this
    DP rank's prompts, in slices of ``rollout.prefill_tokens`` tokens when set."""
    prefill_tokens: int
    """Query tokens of that forward (rows x positions per slice)."""
    decode_bytes: int
    """Transient of one decode step (r1fast.plan.prefill with one query per row over the
    longest cache; MLA's decoder attends over an fp32 copy of a layer's latent cache)."""
    train_peak: int
    """Resident state + activations + log-prob head + reserve."""
    rollout_peak: int
    """Resident state + KV cache + sampling logits + the largest of the prefill transient, a
    decode step's and the sampler's temporaries + reserve."""
    save_bytes: int = 0
    """Transient of a checkpoint save: on a GPU megatron all-gathers the distributed
    optimizer's state over data parallelism one buffer and key at a time (r1fast.policy.
    dist_ckpt's fully reshardable format), the whole buffer of this rank's parameters in fp32
    beside a copy of its own shard."""
    save_peak: int = 0
    """Resident state + the save transient + reserve."""

    @property
    def resident_bytes(self) -> int:
        return (self.param_bytes + self.grad_bytes + self.master_bytes + self.adam_bytes
                + self.reference_bytes)

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.rollout_peak, self.save_peak)


@dataclass
class MemoryPlan:
    """``plan_memory``'s answer: the layout, per-stage numbers, the worst stage, the verdict."""

    world_size: int
    tp: int
    pp: int
    ep: int
    dp: int
    """Data-parallel size of dense parameters: world / (tp pp)."""
    expert_dp: int
    """Data-parallel size of expert parameters: world / (ep pp)."""
    sequence_parallel: bool
    total_params: int
    """Parameters of the whole model (each counted once)."""
    active_params: int
    """Parameters one token passes through (top-k experts + shared + dense)."""
    params_dtype: str
    seq_len: int
    """prompt_len + max_new_tokens."""
    prompt_len: int
    micro_batch_seqs: int
    """Sequences per micro-batch."""
    micro_batches: int
    """Micro-batches per optimizer step on a DP rank."""
    micro_batch_tokens: int
    """Tokens of one micro-batch (packed: the one packed sequence's length)."""
    packed: bool
    """Micro-batches are packed under ``parallel.max_tokens_per_microbatch``."""
    rollout_seqs: int
    """Sequences this DP rank samples per step."""
    stages: list[StagePlan]
    worst: StagePlan
    """The stage with the highest peak."""
    gpu_mem_bytes: int
    fits: bool
    options: PlanOptions
    notes: list[str] = field(default_factory=list)
    """Warnings worth reading (e.g. what dominates when it does not fit)."""


# ------------------------------------------------------------------------------ parameters

def _attention_params(m: ModelConfig, tp: int) -> int:
    if m.is_mla:
        return _mla_params(m, tp)
    H, d, nq, nkv = m.hidden_size, m.kv_channels, m.num_attention_heads, m.kv_heads
    qkv_rows = (nq + 2 * nkv) * d // tp
    n = H + qkv_rows * H + H * (nq * d // tp)  # input norm, linear_qkv, linear_proj
    if m.add_qkv_bias:
        n += qkv_rows
    if m.qk_layernorm:
        n += 2 * d
    return n


def layer_params(m: ModelConfig, layer: int, tp: int = 1, ep: int = 1) -> tuple[int, int]:
    """(dense, expert) parameters of global layer ``layer`` on one rank."""
    H = m.hidden_size
    dense = _attention_params(m, tp) + H  # + pre_mlp_layernorm
    if not m.is_moe or layer in m.dense_layers:
        return dense + 3 * H * (m.ffn_hidden_size // tp), 0
    dense += m.num_experts * H  # router, replicated over TP
    if m.shared_expert_size is not None:
        dense += 3 * H * (m.shared_expert_size // tp) + (H if m.shared_expert_gate else 0)
    return dense, (m.num_experts // ep) * 3 * H * m.moe_ffn_hidden_size


def stage_layers(m: ModelConfig, pp: int, stage: int,
                 split: Optional[list[int]] = None) -> tuple[int, int]:
    """[lo, hi) global layers of ``stage``; ``split``: layers per stage (ParallelConfig
    .stage_layers, uneven pipelines), None: an even split."""
    split = split or [m.num_layers // pp] * pp
    lo = sum(split[:stage])
    return lo, lo + split[stage]


def stage_params(m: ModelConfig, tp: int, pp: int, ep: int, stage: int,
                 split: Optional[list[int]] = None) -> tuple[int, int]:
    """(dense, expert) parameters on one rank of pipeline stage ``stage``."""
    lo, hi = stage_layers(m, pp, stage, split)
    dense = expert = 0
    for i in range(lo, hi):
        d, e = layer_params(m, i, tp, ep)
        dense += d
        expert += e
    vocab_shard = m.vocab_size // tp * m.hidden_size
    if stage == 0:
        dense += vocab_shard  # embedding
    if stage == pp - 1:
        dense += m.hidden_size  # final norm
        if not (m.tie_embeddings and pp == 1):
            dense += vocab_shard  # output layer (a tied one is a copy on the last stage)
    return dense, expert


def total_params(m: ModelConfig) -> int:
    """The whole model's parameters, each counted once."""
    dense, expert = stage_params(m, 1, 1, 1, 0)
    return dense + expert


def active_params(m: ModelConfig) -> int:
    """Parameters a token passes through: the routed experts count k of E."""
    n = total_params(m)
    if m.is_moe:
        moe_layers = m.num_layers - len(set(m.dense_layers))
        n -= moe_layers * (m.num_experts - m.moe_router_topk) * 3 * m.hidden_size \
            * m.moe_ffn_hidden_size
    return n


# ------------------------------------------------------------------------------ heads, rollout

def logprob_head_bytes(m: ModelConfig, tp: int, tokens: int,
                       head: str = "fused") -> tuple[int, int]:
    """(fused, unfused) transient bytes of the log-prob head for ``tokens`` tokens; the fused
    op in the arrangement ``head`` (``algo.logprob_head``)."""
    from r1fast.ops.fused_linear_policy_grad import chunk_rows, group_rows
    from r1fast.ops.linear_logprob import triton_chunks

    act = _BYTES[m.params_dtype]
    v_local, h = m.vocab_size // tp, m.hidden_size
    rounded = act if act < 4 else 0  # a 16-bit copy of an fp32 buffer
    if head == "grad-in-forward":
        # in the loop: a chunk's fp32 logits [ct, V/tp], a group's dz in the input dtype, fp32
        # dx, the fp32 dW accumulator and (past the first group) the GEMM result added to it;
        # at the end: dx and dW with their rounded copies, kept until the backward
        ct, gr = chunk_rows(tokens, v_local), group_rows(tokens, v_local)
        acc, dx = v_local * h * 4, tokens * h * 4
        loop = ct * v_local * 4 + gr * v_local * act + dx + acc * (2 if tokens > gr else 1)
        fused = max(loop, dx + acc + (v_local + tokens) * h * rounded)
        fused += 4 * ct * 4 + 3 * tokens * 4  # a chunk's (m, s, S, z_y); logp, entropy, lse
    else:
        ct, cv = triton_chunks(tokens, None, None, head)  # the op's own chunks, clipped below
        ct, cv = min(tokens, ct), min(v_local, cv)
        # dz workspace [ct, cv] in the input dtype (+ the fp32 logit tile it is made from)
        fused = ct * cv * (act + (4 if head == "gemm" else 0))
        if tokens > ct and act < 4:
            fused += v_local * h * 4  # fp32 dW accumulator across token chunks
        fused += 7 * tokens * 4  # (m, s, S, z_y) partials + logp, entropy, lse
        # the gradients its backward returns: fp32 dx [T, H] and dW [V/tp, H] in the weight's
        # dtype (megatron adds dW to main_grad after)
        fused += tokens * h * 4 + v_local * h * act
    per_logit = 4 + 4 + 4 + rounded  # logits, softmax, grad (+ 16-bit matmul out)
    # + the matmul backward's dx [T, H] and dW [V/tp, H] in the activations' dtype
    return int(fused), int(tokens * v_local * per_logit + (tokens + v_local) * h * act)


def kv_cache_bytes(m: ModelConfig, tp: int, layers: int, seqs: int, seq_len: int) -> int:
    """K and V of ``layers`` layers for ``seqs`` sequences of ``seq_len`` tokens on one rank.
    MLA: r1fast's decoder caches the compressed latent, ``kv_lora + qk_rope`` numbers per token
    and layer, whole on every TP rank (r1fast.rollout.mla_latent), instead of per-head keys and
    values."""
    if m.is_mla:
        per_token = m.kv_lora_rank + m.qk_rope_head_dim
        return layers * per_token * seqs * seq_len * _BYTES[m.params_dtype]
    return 2 * layers * (m.kv_heads // tp) * m.kv_channels * seqs * seq_len * _BYTES[m.params_dtype]


# ------------------------------------------------------------------------------ the plan

def resolve_world_size(par: ParallelConfig, world_size: Optional[int]) -> int:
    if world_size is not None:
        return world_size
    if par.world_size is not None:
        return par.world_size
    return math.lcm(par.tp, par.ep * par.etp) * par.pp


@dataclass(frozen=True)
class _Batch:
    """One DP rank's share of a step: what activations, the KV cache and logits scale with."""

    prompt_len: int
    seq_len: int
    """prompt_len + max_new_tokens."""
    rows: int
    """Sequences this DP rank samples per step."""
    n_micro: int
    """Micro-batches per mini-batch."""
    mbs: int
    """Sequences per micro-batch."""
    packed_tokens: int = 0
    """With ``parallel.max_tokens_per_microbatch``: the length of the one packed sequence a
    micro-batch is (0: padded micro-batches of ``mbs`` sequences)."""

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch."""
        return self.packed_tokens or self.mbs * self.seq_len

    @property
    def attn_len(self) -> int:
        """Length of the sequences attention sees: a packed micro-batch is one sequence (its
        [T, T] block-diagonal mask on the local spec)."""
        return self.packed_tokens or self.seq_len


def _batch(cfg, par: ParallelConfig, opts: PlanOptions) -> _Batch:
    """Split this DP rank's sequences as the trainer does; raises ValueError when the prompts of
    a step do not divide over the data-parallel ranks, or an explicit prompt length leaves no
    room for max_new_tokens within the model's positions."""
    m, algo, data = cfg.model, cfg.algo, cfg.data
    dp = par.dp
    if data.prompts_per_step % dp != 0:
        raise ValueError(f"data.prompts_per_step ({data.prompts_per_step}) must be divisible by "
                         f"the data parallel size {dp} (world {par.world_size} / "
                         f"(tp {par.tp} * pp {par.pp}))")
    new = cfg.rollout.max_new_tokens
    longest = data.max_prompt_tokens or 512
    if opts.prompt_len is not None and opts.prompt_len > m.max_position_embeddings - new:
        # the default is clipped to the model's positions; an explicit length past them would
        # plan sequences the run cannot make
        raise ValueError(f"prompt_len must be at most model.max_position_embeddings "
                         f"{m.max_position_embeddings} - rollout.max_new_tokens {new} = "
                         f"{m.max_position_embeddings - new}, got {opts.prompt_len}")
    prompt = opts.prompt_len or max(1, min(longest, m.max_position_embeddings - new))
    rows = data.prompts_per_step * algo.group_size // dp  # this DP rank's sequences
    rows_per_step = max(1, rows // algo.mini_batches)
    # as the trainer splits a mini-batch: max(rows // micro_batch_size, 1) near-even parts
    n_micro = max(1, rows_per_step // (par.micro_batch_size or rows_per_step))
    mbs = -(-rows_per_step // n_micro)
    budget = par.max_tokens_per_microbatch
    if budget:
        # the trainer packs rows first-fit under the budget (r1fast.train.packing); a row longer
        # than the budget is a micro-batch of its own. Worst case: every row at full length.
        seq = prompt + new
        per_bin = max(1, budget // seq)
        return _Batch(prompt_len=prompt, seq_len=seq, rows=rows,
                      n_micro=-(-rows_per_step // per_bin), mbs=min(per_bin, rows_per_step),
                      packed_tokens=max(budget, seq))
    return _Batch(prompt_len=prompt, seq_len=prompt + new, rows=rows, n_micro=n_micro, mbs=mbs)


def _stage_plan(cfg, par: ParallelConfig, stage: int, batch: _Batch,
                opts: PlanOptions) -> StagePlan:
    """Every term of one rank of pipeline stage ``stage`` (see the module docstring)."""
    m: ModelConfig = cfg.model
    tp, pp, ep, dp = par.tp, par.pp, par.ep, par.dp
    p_bytes = _BYTES[m.params_dtype]
    master = 4 if p_bytes < 4 else 0  # fp32 master copy only for 16-bit parameters
    # megatron treats experts as expert-parallel (own buffers, sharded over expert-DP) only when
    # ep > 1; at ep = 1 they sit in the dense buffers and shard over DP like everything else
    dist_opt = cfg.optim.use_distributed_optimizer
    shard_dense = dp if dist_opt else 1
    shard_expert = (par.expert_dp if ep > 1 else dp) if dist_opt else 1
    reserve = int(opts.reserve_gib * GiB)

    split = par.stage_layers(m.num_layers)
    dense, expert = stage_params(m, tp, pp, ep, stage, split)
    n = dense + expert
    # packed micro-batches on the local spec: per-sequence attention (r1fast.policy.
    # packed_attention), no [T, T] terms; MLA's keeps [L, L] per sequence of at most seq_len
    spec = "local-segments" if opts.spec == "local" and batch.packed_tokens else opts.spec
    seg = batch.seq_len if spec == "local-segments" else 0
    acts = {mode: stage_activation_bytes(m, par, stage, batch.tokens, batch.attn_len, mode,
                                         spec, seg) for mode in RECOMPUTE_MODES}
    in_flight = min(pp - stage, batch.n_micro)
    act_total = held_activation_bytes(m, par, stage, batch.tokens, batch.attn_len,
                                      opts.recompute, spec, in_flight, seg)
    if stage == pp - 1:
        lp_fused, lp_unfused = logprob_head_bytes(m, tp, batch.tokens, cfg.algo.logprob_head)
    else:
        lp_fused = lp_unfused = 0
    lp = lp_fused if cfg.algo.use_fused_kernels else lp_unfused
    lo, hi = stage_layers(m, pp, stage, split)
    kv = kv_cache_bytes(m, tp, hi - lo, batch.rows, batch.seq_len)
    # sampling logits [B, V] fp32 (gathered) + the local shard, one step of a KV decoder, on
    # the last stage (the others receive its tokens); the prefix-recomputing decoder
    # broadcasts them to every stage for every position [B, L, V]
    positions = 1 if opts.decoder == "kv-cache" else batch.seq_len
    samples_here = stage == pp - 1 or opts.decoder != "kv-cache"
    roll_logits = batch.rows * positions * (m.vocab_size + m.vocab_size // tp) * 4
    roll_logits = roll_logits if samples_here else 0
    # the sampler's temporaries (r1fast.rollout.sampler), one chunk of rows at a time
    sampling = (SAMPLE_BYTES_PER_LOGIT * min(batch.rows, sample_rows_per_chunk(m.vocab_size))
                * m.vocab_size) if samples_here else 0
    prefill = prefill_tokens = decode = 0
    if opts.decoder == "recompute":
        kv = 0
    else:
        sp = tp if par.use_sequence_parallel(m) else 1
        width = prefill_width(batch.rows, batch.prompt_len, cfg.rollout.prefill_tokens, sp)
        prefill_tokens = batch.rows * width
        # the decoder's experts (r1fast.policy.local_experts.grouped_experts)
        grouped = runs_grouped(cfg.rollout.experts, on_gpu=opts.spec != "local")
        args = (m, tp, sp, _BYTES[m.params_dtype], (lo, hi), batch.rows)
        spec = "local" if opts.spec == "local" else "te"
        prefill = prefill_bytes(*args, width, batch.prompt_len, spec, grouped_experts=grouped)
        # a decode step: one query per row over the longest cache (MLA: an fp32 copy of it)
        decode = prefill_bytes(*args, 1, batch.seq_len, spec, grouped_experts=grouped)
    shard = math.ceil(dense / shard_dense) + math.ceil(expert / shard_expert)
    st = StagePlan(
        stage=stage, layers=(lo, hi), dense_params=dense, expert_params=expert,
        param_bytes=n * p_bytes, grad_bytes=n * 4, master_bytes=shard * master,
        adam_bytes=shard * 8, reference_bytes=n * p_bytes if _uses_reference(cfg) else 0,
        activation_bytes=acts, in_flight=in_flight, activations_total=act_total,
        logprob_fused_bytes=lp_fused, logprob_unfused_bytes=lp_unfused, logprob_bytes=lp,
        kv_cache_bytes=kv, rollout_logits_bytes=roll_logits, sampling_bytes=sampling,
        prefill_bytes=prefill, prefill_tokens=prefill_tokens, decode_bytes=decode, train_peak=0,
        rollout_peak=0)
    st.train_peak = st.resident_bytes + act_total + lp + reserve
    if dist_opt:  # one sub-optimizer's buffer gathered whole (experts: their own at ep > 1)
        parts = [(dense, shard_dense), (expert, shard_expert)] if ep > 1 else [(n, dp)]
        st.save_bytes = max(4 * (k + math.ceil(k / d)) for k, d in parts)
        st.save_peak = st.resident_bytes + st.save_bytes + reserve
    # a prefill's or a decode step's transient is gone before its logits are sampled
    st.rollout_peak = (st.resident_bytes + kv + roll_logits + max(prefill, decode, sampling)
                       + reserve)
    return st


def _notes(m: ModelConfig, tp: int, batch: _Batch, worst: StagePlan, fits: bool,
           opts: PlanOptions, prefill_setting: int = 0) -> list[str]:
    """Warnings worth reading: an over-long sequence, what dominates a plan that does not fit,
    what today's code does not do yet."""
    notes: list[str] = []
    if batch.seq_len > m.max_position_embeddings:
        notes.append(f"prompt_len + max_new_tokens = {batch.seq_len} exceeds "
                     f"max_position_embeddings ({m.max_position_embeddings})")
    if not fits:
        parts = {"optimizer state": worst.master_bytes + worst.adam_bytes,
                 "fp32 gradients": worst.grad_bytes, "parameters": worst.param_bytes,
                 "reference policy": worst.reference_bytes,
                 "activations": worst.activations_total, "log-prob head": worst.logprob_bytes,
                 "rollout KV cache": worst.kv_cache_bytes,
                 "rollout logits": worst.rollout_logits_bytes,
                 "rollout sampling": worst.sampling_bytes,
                 "rollout decode step": worst.decode_bytes,
                 "rollout prefill": worst.prefill_bytes,
                 "checkpoint save transient": worst.save_bytes}
        top = max(parts, key=parts.get)
        notes.append(f"does not fit: stage {worst.stage} needs {worst.peak / GiB:.1f} GiB of "
                     f"{opts.gpu_mem_gib:g}; the largest term is {top} "
                     f"({parts[top] / GiB:.1f} GiB)")
    if batch.packed_tokens:
        notes.append("log-probs: not counted are the transients of the no-grad log-prob "
                     "forwards (parallel.max_tokens_per_logprob_forward tokens, one layer at a "
                     "time; nothing is kept for a backward)")
    if opts.decoder == "kv-cache" and not prefill_setting and worst.prefill_bytes > GiB:
        notes.append(f"rollout: the prefill runs every prompt of the DP rank in one forward "
                     f"({worst.prefill_tokens} tokens, {worst.prefill_bytes / GiB:.1f} GiB "
                     f"transient); rollout.prefill_tokens slices it")
    return notes


def plan_memory(cfg, world_size: Optional[int] = None, gpu_mem_gib: float = 80.0,
                **options) -> MemoryPlan:
    """Per-GPU memory plan of a :class:`r1fast.train.config.TrainConfig` on ``world_size``
    GPUs of ``gpu_mem_gib`` GiB. ``options`` are the other :class:`PlanOptions` fields.
    Raises ValueError for a layout that cannot hold the model (ParallelConfig.validate)."""
    opts = PlanOptions(gpu_mem_gib=gpu_mem_gib, world_size=world_size, **options).validate()
    m: ModelConfig = cfg.model
    m.validate()
    ws = resolve_world_size(cfg.parallel, opts.world_size)
    par = dataclasses.replace(cfg.parallel, world_size=ws).validate(m)
    from r1fast.train.task import check_micro_batch_size

    check_micro_batch_size(cfg, par.dp)  # a layout the trainer refuses is not planned
    batch = _batch(cfg, par, opts)
    stages = [_stage_plan(cfg, par, s, batch, opts) for s in range(par.pp)]
    worst = max(stages, key=lambda st: st.peak)
    gpu_bytes = int(opts.gpu_mem_gib * GiB)
    fits = worst.peak <= gpu_bytes
    return MemoryPlan(
        world_size=ws, tp=par.tp, pp=par.pp, ep=par.ep, dp=par.dp, expert_dp=par.expert_dp,
        sequence_parallel=par.use_sequence_parallel(m), total_params=total_params(m),
        active_params=active_params(m), params_dtype=m.params_dtype, seq_len=batch.seq_len,
        prompt_len=batch.prompt_len, micro_batch_seqs=batch.mbs, micro_batches=batch.n_micro,
        micro_batch_tokens=batch.tokens, packed=bool(batch.packed_tokens),
        rollout_seqs=batch.rows, stages=stages, worst=worst, gpu_mem_bytes=gpu_bytes, fits=fits,
        options=opts, notes=_notes(m, par.tp, batch, worst, fits, opts,
                                   cfg.rollout.prefill_tokens))


def _uses_reference(cfg) -> bool:
    """Whether GRPO keeps a frozen reference policy: a KL term with kl_coef > 0 (as the
    trainer decides, r1fast/train/grpo.py)."""
    obj = cfg.algo.objective
    return obj.kl is not None and obj.kl_coef > 0
