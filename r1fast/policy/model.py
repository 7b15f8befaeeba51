"""The policy: a megatron-core ``GPTModel`` (MoE or dense) built from a :class:`ModelConfig`,
laid out by a :class:`ParallelConfig`, with r1fast ops at the two hot spots (the MoE router and
the log-prob head), behind a small API the trainer uses.

Layout. Each rank holds one pipeline chunk: the embedding on the first stage, its share of the
layers, the final norm and the vocab-parallel output layer on the last stage. Training never
applies the output layer as a matmul: heads (:meth:`Policy.logprobs`, the ``loss_fn`` of
:meth:`Policy.forward_backward`) get the final-normed hidden states, the same on every TP rank,
and the weight shard ``[V/tp, H]``, and call r1fast's vocab-parallel ops (no [T, V] tensor),
which also return the full input-gradient on every TP rank, as the backward expects.

Pipeline parallelism. Everything runs through megatron's schedule (``get_forward_backward_func``:
1F1B send/recv of [L/sp, b, H] activations, ``forward_only`` for inference); inference results
are broadcast from the last stage so every rank returns the same tensor.

Data parallelism. Each DP rank passes its own batch (:meth:`Policy.dp_shard`). ``loss_fn``
returns the microbatch's share of the *global* loss, and megatron's 1/num_microbatches and DP
mean are undone, so gradients are sums; the MoE aux losses keep megatron's mean convention.

Sequences. ``tokens`` [B, L] are right-padded, or packed (``cu_seqlens``: positions restart per
sequence and attention stays within it, r1fast.policy.packed_attention); under sequence
parallelism L is padded to a multiple of tp inside (pads stay out of real positions). Routers
ignore those pads, and those past a microbatch's ``lengths`` (right padding, a packed tail).
Decoders (:mod:`r1fast.rollout`) use :meth:`Policy.rotary_table`, :meth:`Policy.head_input`,
:meth:`Policy.vocab_logits` and record MoE routing as they decode (post hoc: record_routing);
``routing=`` in :meth:`Policy.logprobs` and :meth:`Policy.forward_backward` replays it.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from r1fast.ops._validate import check_range, check_tensor
from r1fast.ops.linear_logprob import fp32_logits
from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.mla import mla_packed_params
from r1fast.megatron_compat import te_absent
from r1fast.policy.parallel import ParallelInfo, init_parallel, mark_expert_params
from r1fast.policy.transfer import to_device_async

log = logging.getLogger("r1fast.policy")

LossFn = Callable[[torch.Tensor, torch.Tensor, Mapping[str, Any]],
                  "tuple[torch.Tensor, dict[str, Any]]"]


# ------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------

def transformer_config(model: ModelConfig, parallel: ParallelConfig):
    """The megatron ``TransformerConfig`` of ``model`` under ``parallel``."""
    from r1fast.policy.mla import mla_config_kwargs

    config_cls, mla = mla_config_kwargs(model)  # MLATransformerConfig + its fields for MLA
    moe: dict[str, Any] = {}
    if model.is_moe:
        moe = dict(
            num_moe_experts=model.num_experts, moe_ffn_hidden_size=model.moe_ffn_hidden_size,
            moe_router_topk=model.moe_router_topk, moe_layer_freq=model.moe_layer_pattern(),
            moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False,
            moe_router_dtype="fp32", moe_router_score_function=model.router_score,
            moe_router_pre_softmax=model.router_pre_softmax,
            moe_router_num_groups=model.router_n_groups,
            moe_router_group_topk=model.router_topk_groups,
            moe_router_topk_scaling_factor=model.router_scaling_factor,
            moe_router_enable_expert_bias=model.router_expert_bias,
            moe_router_bias_update_rate=model.router_bias_update_rate,
            moe_router_load_balancing_type=model.aux_loss_type if model.aux_loss_coef > 0
            else "none",
            moe_aux_loss_coeff=model.aux_loss_coef,
            moe_z_loss_coeff=model.z_loss_coef if model.z_loss_coef > 0 else None,
            moe_shared_expert_intermediate_size=model.shared_expert_size,
            moe_shared_expert_gate=model.shared_expert_gate,
        )
    dtype = model.torch_dtype
    cfg = config_cls(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads, num_query_groups=model.kv_heads,
        kv_channels=model.kv_channels, ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=model.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm or model.is_mla, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=model.init_std,
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
        **parallel.megatron_kwargs(),  # uneven pipeline split, activation recompute
        expert_model_parallel_size=parallel.ep, expert_tensor_parallel_size=parallel.etp,
        sequence_parallel=parallel.use_sequence_parallel(model),
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, use_cpu_initialization=not torch.cuda.is_available(),
        # The fused kernels below need apex/TE or CUDA; the plain torch paths are exact.
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
        **moe, **mla,
    )
    # Router options megatron's config has no field for (read by R1fastRouter).
    cfg.r1fast_router_normalize = model.router_normalize
    cfg.r1fast_router_group_score_topk = model.router_group_score_topk
    return cfg


def layer_spec(model: ModelConfig, config, pp_rank: Optional[int] = None):
    """Block spec of this pipeline stage: megatron's local (or, on a GPU with Transformer
    Engine, TE) GPT layers, with every MoE layer's router replaced by :class:`R1fastRouter`."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from r1fast.policy.local_experts import use_r1fast_moe
    from r1fast.policy.mla import use_mla_local_modules
    from r1fast.policy.packed_attention import use_packed_core_attention

    use_te = torch.cuda.is_available() and not te_absent()
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te,
                                      normalization="RMSNorm", pp_rank=pp_rank)
    use_mla_local_modules(spec, model.rms_norm_eps)  # MLA: core attention, projections, eps
    use_packed_core_attention(spec)  # local GQA: packed rows attend per sequence
    use_r1fast_moe(spec)  # our router; local experts without megatron's per-linear overhead
    return spec


class Policy:
    """One pipeline chunk of the model on this rank, plus what the trainer calls.

    Attributes: ``model_cfg``, ``parallel_cfg``, ``info`` (:class:`ParallelInfo`),
    ``config`` (megatron TransformerConfig), ``module`` (the model as the optimizer sees it:
    megatron DDP when trainable) and ``gpt`` (the bare GPTModel chunk)."""
    packed_attention = "segments"  # packed rows attend per sequence; "mask": the [T, T] mask

    def __init__(self, model_cfg: ModelConfig, parallel_cfg: ParallelConfig, info: ParallelInfo,
                 config, gpt: torch.nn.Module) -> None:
        self.model_cfg, self.parallel_cfg, self.info = model_cfg, parallel_cfg, info
        self.config, self.gpt = config, gpt  # megatron TransformerConfig, the GPTModel chunk
        self.module: torch.nn.Module = gpt

    # -- layout -----------------------------------------------------------------------------
    @property
    def tp_group(self):
        from megatron.core import parallel_state as ps
        return ps.get_tensor_model_parallel_group()

    @property
    def pp_group(self):
        from megatron.core import parallel_state as ps
        return ps.get_pipeline_model_parallel_group()

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")

    @property
    def sequence_parallel(self) -> bool:
        return bool(self.config.sequence_parallel)

    def dp_shard(self, x: torch.Tensor) -> torch.Tensor:
        """This DP rank's contiguous block of a global batch (dim 0 must divide by dp)."""
        dp, r = self.info.dp, self.info.dp_rank
        if x.shape[0] % dp != 0:
            raise ValueError(f"dp_shard: batch size {x.shape[0]} must be divisible by the data "
                             f"parallel size {dp}")
        n = x.shape[0] // dp
        return x[r * n:(r + 1) * n]

    @property
    def output_weight(self) -> Optional[torch.Tensor]:
        """The vocab-parallel output weight shard [V/tp, H] (rows tp_rank*V/tp ...), on the last
        stage; None elsewhere. With tied embeddings it is the (synchronised) embedding."""
        if not self.gpt.post_process:
            return None
        if self.model_cfg.tie_embeddings:
            return self.gpt.shared_embedding_or_output_weight()
        return self.gpt.output_layer.weight

    def num_parameters(self) -> int:
        """Parameter count of the whole model (every rank returns the same number)."""
        from megatron.core import parallel_state as ps

        n = 0
        for p in self.gpt.parameters():
            if not getattr(p, "allreduce", True):  # expert weight: distinct per EP rank
                if ps.get_expert_data_parallel_rank() != 0:
                    continue
            elif self.info.dp_rank != 0 or (self.info.tp_rank != 0
                                            and not getattr(p, "tensor_model_parallel", False)):
                continue  # a replica (over DP, or over TP for norms and the router)
            n += p.numel()
        if self.model_cfg.tie_embeddings and self.gpt.post_process and not self.gpt.pre_process \
                and self.info.dp_rank == 0:
            n -= self.output_weight.numel()  # the last stage's copy of the tied embedding
        total = torch.tensor([n], dtype=torch.float64, device=self.device)
        if self.info.world_size > 1:
            dist.all_reduce(total)
        return int(total.item())

    # -- running one stage ------------------------------------------------------------------
    @property
    def token_layout(self):
        """How the tokens of a [b, L] microbatch are laid out at this rank's routers."""
        from r1fast.policy.router import TokenLayout

        return TokenLayout(tp=self.info.tp, tp_rank=self.info.tp_rank,
                           sequence_parallel=self.sequence_parallel, tp_group=self.tp_group)

    def _padded_len(self, length: int) -> int:
        return self.token_layout.padded_len(length)

    def _check_tokens(self, tokens: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        check_tensor("tokens", tokens, ndim=2, dtypes=(torch.int64, torch.int32))
        if tokens.shape[0] < 1 or tokens.shape[1] < 1:
            raise ValueError(f"tokens must be non-empty [B, L], got {list(tokens.shape)}")
        longest, limit = tokens.shape[1], self.model_cfg.max_position_embeddings
        if cu_seqlens is not None:  # packed rows: positions restart at every sequence
            longest = int(cu_seqlens.reshape(-1, cu_seqlens.shape[-1]).diff(dim=-1).max())
        if longest > limit:
            raise ValueError(f"tokens: sequence length {longest} exceeds "
                             f"max_position_embeddings={limit}")
        return to_device_async(tokens.to(torch.int64), self.device)  # no wait for the GPU

    def rotary_table(self, position_ids: torch.Tensor) -> torch.Tensor:
        """RoPE angles for explicit positions ``[B, S]``, megatron's layout [S, B, 1, dim]
        (non-interleaved halves, as RotaryEmbedding.get_emb builds them for 0..S-1)."""
        inv_freq = self.gpt.rotary_pos_emb.inv_freq.to(self.device)
        freqs = position_ids.t().to(torch.float32)[..., None] * inv_freq  # [S, B, dim/2]
        return torch.cat((freqs, freqs), dim=-1)[:, :, None, :]

    def _stage_forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor],
                       attention_mask: Optional[torch.Tensor] = None, packed_seq_params=None,
                       real_lengths: Optional[torch.Tensor] = None):
        """Run this rank's chunk. First stage: embed ``tokens``; other stages read the tensor
        the schedule received (``set_input_tensor``). Returns [L', b, H] (L' = padded L, /tp
        under sequence parallelism); on the last stage final-normed. ``attention_mask``
        [b|1, 1, L', L'] bool (True = hidden), e.g. block-diagonal for packed sequences; None:
        causal. ``packed_seq_params``: megatron's ``thd`` boundaries of one packed row.
        ``real_lengths`` [b]: real tokens per row; the pads after them pass the experts but
        not the routers' load counts and aux/z losses."""
        gpt = self.gpt
        b, length = tokens.shape
        lp = self._padded_len(length)
        if not (explicit := position_ids is not None):  # MLA: packed rows in given ones only
            position_ids = torch.arange(length, device=self.device).expand(b, length)
        if lp > length:
            tokens = F.pad(tokens, (0, lp - length))
            tail = position_ids[:, -1:] + torch.arange(1, lp - length + 1, device=self.device)
            position_ids = torch.cat([position_ids, tail], dim=1)
        padding_mask = self.token_layout.padding_mask(b, length, self.device, real_lengths)
        decoder_input = None
        if gpt.pre_process:
            decoder_input = gpt.embedding(input_ids=tokens, position_ids=position_ids)
        packed = mla_packed_params(position_ids if explicit else None, lp, packed_seq_params) \
            if self.model_cfg.is_mla else packed_seq_params
        hidden = gpt.decoder(hidden_states=decoder_input, attention_mask=attention_mask,
                             rotary_pos_emb=None if self.model_cfg.is_mla or packed is not None
                             else self.rotary_table(position_ids),  # those rope in attention
                             padding_mask=padding_mask, packed_seq_params=packed)
        return hidden

    def head_input(self, hidden: torch.Tensor, length: int) -> torch.Tensor:
        """[L', b, H] last-stage output -> [b, L, H], the same on every TP rank. The backward
        expects the full input-gradient on every TP rank, which is what the r1fast heads
        deliver (linear_logprob all-reduces its partial dx over tp_group): under sequence
        parallelism each rank then keeps its own slice, otherwise it passes through."""
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        if self.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden,
                                                          tensor_parallel_output_grad=False)
        return hidden[:length].transpose(0, 1)

    # -- MoE routing: replay and record -----------------------------------------------------
    def _routers(self) -> list:  # walked once: a decode step must not walk every module
        from r1fast.policy.router import R1fastRouter
        if "_router_list" not in vars(self):
            self._router_list = [m for m in self.gpt.modules() if isinstance(m, R1fastRouter)]
        return self._router_list

    def moe_layers(self) -> list[int]:
        """0-based (global) indices of the MoE layers held by this rank's pipeline stage."""
        return sorted(r.layer_index for r in self._routers())

    def set_routing_hook(self, hook) -> None:
        """Give every router of this policy ``hook`` (a RouterReplay, or None to remove)."""
        for r in self._routers():
            r.routing_hook = hook

    @contextlib.contextmanager
    def _hooked(self, hook):
        previous = [(r, r.routing_hook) for r in self._routers()]
        self.set_routing_hook(hook)
        try:
            yield
        finally:
            for r, h in previous:
                r.routing_hook = h

    def record_routing(self, tokens: torch.Tensor, *,
                       micro_batch_size: Optional[int] = None) -> dict[int, torch.Tensor]:
        """Run an inference forward and return the experts each MoE layer of this stage chose:
        ``{layer: [B, L, k] int64}``, the ``routing`` entry that :meth:`logprobs` and the
        batches of :meth:`forward_backward` accept for replay."""
        from r1fast.policy.router_replay import RouterReplay

        tokens = self._check_tokens(tokens)
        mbs = micro_batch_size or self.parallel_cfg.micro_batch_size or tokens.shape[0]
        replay = RouterReplay()
        with replay.record(), self._hooked(replay):
            self._inference(tokens, lambda h, mb: (), [], mbs, broadcast=False)
        length = tokens.shape[1]
        # One recorded call per microbatch, in order.
        sizes = [t.shape[0] for t in tokens.split(mbs)]
        return {layer: torch.cat([self.token_layout.from_router_order(rows, b, length)
                                  for rows, b in zip(replay.steps(layer), sizes)], dim=0)
                for layer in replay.layers()}

    # -- the schedule -----------------------------------------------------------------------
    def _microbatches(self, batches: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
        if not batches:
            raise ValueError("batches must hold at least one microbatch")
        shape = None
        for i, mb in enumerate(batches):
            if "tokens" not in mb:
                raise ValueError(f"batches[{i}] must have a 'tokens' entry [b, L]")
            t = mb["tokens"]
            check_tensor(f"batches[{i}]['tokens']", t, ndim=2, dtypes=(torch.int64, torch.int32))
            if mb.get("lengths") is not None:
                check_tensor(f"batches[{i}]['lengths']", mb["lengths"], shape=[t.shape[0]],
                             dtypes=(torch.int64, torch.int32))
            if shape is None:
                shape = tuple(t.shape)
            elif tuple(t.shape) != shape and self.info.pp > 1:
                raise ValueError(f"batches[{i}]['tokens'] must have the shape of batches[0] "
                                 f"{list(shape)} under pipeline parallelism (the stages send "
                                 f"fixed shapes), got {list(t.shape)}")
        return shape

    def _schedule(self, batches: Sequence[Mapping[str, Any]], head: Callable, forward_only: bool):
        """Run megatron's forward(-backward) schedule over ``batches``; ``head(hidden[b,L,H],
        batch)`` runs on the last stage. Returns the list of what ``head`` produced (last stage)
        or [] (other stages)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from r1fast.policy.packed_attention import packed_inputs
        from r1fast.policy.router_replay import kept_for_recompute, replaying

        b, length = self._microbatches(batches)
        batches = [{**mb, "tokens": self._check_tokens(mb["tokens"], mb.get("cu_seqlens"))}
                   for mb in batches]
        it = iter(batches)
        self._reset_aux_loss_scale()

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            pos, mask, cu = mb.get("position_ids"), None, mb.get("cu_seqlens")
            if cu is not None:  # packed sequences: mask or per-sequence boundaries
                pos, mask, cu = packed_inputs(self, cu, mb["tokens"].shape[1])
            with replaying(self, mb.get("routing"), mb["tokens"].shape):
                hidden = self._stage_forward(mb["tokens"], None if pos is None else
                                             pos.to(self.device), mask, cu, mb.get("lengths"))

            def loss_func(output, non_loss_data: bool = False):
                return head(self.head_input(output, mb["tokens"].shape[1]), mb)

            return hidden, loss_func

        fb = get_forward_backward_func()
        with kept_for_recompute(self._routers() if not forward_only
                                and self.parallel_cfg.recompute == "full"
                                and any(mb.get("routing") is not None for mb in batches)
                                else []):
            return fb(forward_step_func=forward_step, data_iterator=it, model=self.module,
                      num_microbatches=len(batches), seq_length=self._padded_len(length),
                      micro_batch_size=b, forward_only=forward_only,
                      collect_non_loss_data=forward_only)

    def _reset_aux_loss_scale(self) -> None:
        """megatron keeps the MoE aux-loss gradient scale in a class variable that the schedule
        copies a [1] tensor into, while a backward outside the schedule makes it 0-d (and the
        next copy fails): start each run from a [1]-shaped 1."""
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        MoEAuxLossAutoScaler.main_loss_backward_scale = torch.ones(1, device=self.device)

    def _broadcast_from_last_stage(self, value: Optional[torch.Tensor], shape, dtype):
        if self.info.pp == 1:
            return value
        from megatron.core import parallel_state as ps

        buf = value.contiguous() if value is not None else torch.empty(shape, dtype=dtype,
                                                                        device=self.device)
        dist.broadcast(buf, src=ps.get_pipeline_model_parallel_last_rank(), group=self.pp_group)
        return buf

    def _inference(self, tokens: torch.Tensor, head: Callable, out_shapes: list[tuple],
                   micro_batch_size: Optional[int], broadcast: bool,
                   per_row: Optional[Mapping[str, Any]] = None):
        """Forward-only schedule in eval mode under no_grad. ``per_row`` entries (a [B, ...]
        tensor, or a {layer: [B, ...]} dict such as ``routing``) are split into the microbatch
        dicts with the tokens. ``head(hidden, mb)`` returns a tuple of tensors per microbatch;
        they are concatenated over microbatches (dim 0) into a tuple on the last stage,
        broadcast over the pipeline group when ``broadcast`` (``out_shapes`` gives the shapes
        other stages receive, fp32), else None elsewhere."""
        mbs = micro_batch_size or self.parallel_cfg.micro_batch_size or tokens.shape[0]
        if tokens.shape[0] % mbs != 0:
            raise ValueError(f"micro_batch_size ({mbs}) must divide the batch size "
                             f"{tokens.shape[0]}")
        batches: list[dict[str, Any]] = [{"tokens": t} for t in tokens.split(mbs)]
        for key, value in (per_row or {}).items():
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                for mb, part in zip(batches, value.split(mbs)):
                    mb[key] = part
                continue
            for layer, idx in value.items():
                check_tensor(f"{key}[{layer}]", idx, ndim=3)
                for mb, part in zip(batches, idx.split(mbs)):
                    mb.setdefault(key, {})[layer] = part
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                out = self._schedule(batches, head, forward_only=True)
        finally:
            self.module.train(was_training)
        result = None
        if self.gpt.post_process:
            result = tuple(torch.cat(parts, dim=0) for parts in zip(*out))
        if not broadcast:
            return result
        parts = result if result is not None else [None] * len(out_shapes)
        return tuple(self._broadcast_from_last_stage(p, shape, torch.float32)
                     for p, shape in zip(parts, out_shapes))

    # -- public API -------------------------------------------------------------------------
    def hidden_states(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None):
        """Final-normed hidden states [B, L, H] on the last stage (None on other stages): under
        the caller's autograd mode at pp == 1, megatron's forward-only schedule (no_grad) else."""
        tokens = self._check_tokens(tokens)
        if position_ids is not None:
            check_tensor("position_ids", position_ids, shape=list(tokens.shape),
                         dtypes=(torch.int64, torch.int32))
        if self.info.pp == 1:
            self._reset_aux_loss_scale()  # a backward from here weighs aux losses by 1
            hidden = self._stage_forward(tokens, position_ids)
            return self.head_input(hidden, tokens.shape[1])
        out = self._inference(tokens, lambda h, mb: (h,), [], None, broadcast=False)
        return None if out is None else out[0]

    def logprobs(self, tokens: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                 return_entropy: bool = False, *, micro_batch_size: Optional[int] = None,
                 broadcast: bool = True, routing: Optional[Mapping[int, torch.Tensor]] = None,
                 impl: str = "auto", cu_seqlens: Optional[torch.Tensor] = None):
        """log p(targets | tokens) [B, L] fp32 (and the entropy [B, L] when asked), computed by
        ``linear_logprob`` on the vocab-parallel output layer; no full logits. ``targets`` equal
        to -100 give 0. With PP the result is broadcast from the last stage to every rank.
        ``routing`` ({layer: [B, L, k]}, e.g. from :meth:`record_routing` at rollout time)
        replays those experts instead of routing. ``cu_seqlens`` [B, S+1]: each row holds
        packed sequences with these boundaries (r1fast.policy.packed)."""
        from r1fast.ops.linear_logprob import linear_logprob

        tokens = self._check_tokens(tokens, cu_seqlens)
        check_tensor("targets", targets, shape=list(tokens.shape),
                     dtypes=(torch.int64, torch.int32))
        check_range("temperature", temperature, 0.0, None, lo_open=True)
        targets = targets.to(self.device, torch.int64)

        def head(hidden, mb):
            b, length, h = hidden.shape
            out = linear_logprob(hidden.reshape(b * length, h), self.output_weight,
                                 mb["targets"].reshape(-1), temperature=temperature,
                                 return_entropy=return_entropy, tp_group=self.tp_group,
                                 impl=impl)
            if return_entropy:
                return out[0].view(b, length), out[1].view(b, length)
            return (out.view(b, length),)

        shape = tuple(tokens.shape)
        out = self._inference(tokens, head, [shape] * (2 if return_entropy else 1),
                              micro_batch_size, broadcast,
                              per_row={"targets": targets, "routing": routing,
                                       "cu_seqlens": cu_seqlens})
        if out is None:
            return None
        return out if return_entropy else out[0]

    def logits(self, tokens: torch.Tensor, *, micro_batch_size: Optional[int] = None,
               broadcast: bool = True) -> Optional[torch.Tensor]:
        """Full logits [B, L, V] fp32 (gathered over TP; use :meth:`logprobs` for training)."""
        tokens = self._check_tokens(tokens)

        def head(hidden, mb):
            return (self.vocab_logits(hidden),)

        shape = tuple(tokens.shape) + (self.model_cfg.vocab_size,)
        out = self._inference(tokens, head, [shape], micro_batch_size, broadcast)
        return None if out is None else out[0]

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer on head inputs ``[..., H]`` (see :meth:`head_input`): fp32 logits
        ``[..., V]`` of the whole vocabulary, gathered over the TP group (collective)."""
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        local = fp32_logits(hidden, self.output_weight)  # [..., V/tp]
        return gather_from_tensor_model_parallel_region(local)

    def forward_backward(self, batches: Sequence[Mapping[str, Any]], loss_fn: LossFn, *,
                         zero_grad: bool = True) -> list[dict[str, Any]]:
        """One gradient accumulation over ``batches`` (the microbatches of this DP rank).

        Each batch is a dict with ``tokens`` [b, L] (same shape in every microbatch), optional
        ``position_ids`` [b, L], ``routing`` ({layer: [b, L, k]} experts to replay) and
        ``lengths`` [b] (real tokens per row: the rest, right padding or a packed row's tail,
        stays out of the routers' statistics and aux losses), and whatever ``loss_fn`` reads.
        ``loss_fn(hidden [b, L, H], output_weight [V/tp, H], batch) -> (loss, metrics)`` runs on
        the last stage; ``loss`` is this microbatch's share of the global loss (sum over all
        microbatches of all DP ranks = the loss). Gradients land in the DDP buffers
        (``param.main_grad``), summed and finalised (DP reduce, TP reduce of replicated norms,
        embedding tie, expert-bias update) by megatron's finalize_model_grads; then call the
        optimizer's ``step()``. Returns the per-microbatch ``metrics`` (last stage; else [])."""
        if not hasattr(self.module, "zero_grad_buffer"):
            raise RuntimeError("forward_backward needs a trainable policy "
                               "(build_policy(..., trainable=True))")
        if zero_grad:
            self.module.zero_grad_buffer()
        n_micro = len(batches)
        scale = float(n_micro * self.info.dp)  # undo megatron's 1/num_microbatches and DP mean

        def head(hidden, mb):
            loss, metrics = loss_fn(hidden, self.output_weight, mb)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError("loss_fn must return (scalar tensor loss, metrics dict)")
            return loss * scale, {**metrics, "loss": loss.detach()}

        self.module.train()
        return list(self._schedule(batches, head, forward_only=False))


def build_policy(model_cfg: ModelConfig, parallel_cfg: Optional[ParallelConfig] = None,
                 seed: int = 0, *, trainable: bool = True, distributed_optimizer: bool = True
                 ) -> Policy:
    """Initialise the parallel layout (if needed), build this rank's GPTModel chunk with the
    r1fast router, and wrap it in megatron DDP when ``trainable`` (optim.wrap_ddp)."""
    from megatron.core.models.gpt import GPTModel

    from r1fast.policy.dispatcher import use_fixed_order_dispatch
    from r1fast.policy.local_experts import use_grouped_experts

    model_cfg.validate()
    parallel_cfg = parallel_cfg or ParallelConfig()
    info = init_parallel(parallel_cfg, model_cfg, seed=seed)
    config = transformer_config(model_cfg, parallel_cfg)
    gpt = GPTModel(
        config=config, transformer_layer_spec=layer_spec(model_cfg, config),
        vocab_size=model_cfg.vocab_size, max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=info.is_first_stage, post_process=info.is_last_stage,
        share_embeddings_and_output_weights=model_cfg.tie_embeddings,
        position_embedding_type="rope", rotary_base=int(model_cfg.rope_theta),
        parallel_output=True)
    if model_cfg.rope_theta != int(model_cfg.rope_theta) and not model_cfg.is_mla:
        # megatron types rotary_base as int; rebuild the table with the exact base, where
        # megatron put it (a plain attribute: .cuda() below would not move a CPU one)
        dim, rope = config.kv_channels, gpt.rotary_pos_emb
        rope.inv_freq = 1.0 / (model_cfg.rope_theta ** (torch.arange(
            0, dim, 2, dtype=torch.float32, device=rope.inv_freq.device) / dim))
    mark_expert_params(gpt)
    use_fixed_order_dispatch(gpt)  # MoE rows moved by r1fast kernels: no sync, no atomics
    if torch.cuda.is_available():
        gpt.cuda(torch.cuda.current_device())
    use_grouped_experts(gpt, parallel_cfg.experts)  # after the move: the kernels' device
    policy = Policy(model_cfg, parallel_cfg, info, config, gpt)
    if trainable:
        from r1fast.policy.optim import wrap_ddp

        wrap_ddp(policy, distributed_optimizer)
    else:
        gpt.eval()
        for p in gpt.parameters():
            p.requires_grad_(False)
    return policy
