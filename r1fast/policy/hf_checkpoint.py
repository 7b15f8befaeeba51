"""Hugging Face checkpoints in and out of the policy, at any TP/PP/EP layout.

The on-disk layout is the HF one (``model.safetensors`` or shards + ``model.safetensors
.index.json``, and ``config.json``) for Qwen3-MoE (``qwen3_moe``: per-expert
``mlp.experts.{e}.{gate,up,down}_proj``, router ``mlp.gate.weight``, q/k norms), dense Qwen3
(``qwen3``) and Qwen2 (``qwen2``: q/k/v biases, no q/k norm). Parts of a :class:`ModelConfig`
that these families lack use the names of the HF families that have them: the aux-loss-free
expert bias is DeepSeek-V3's ``mlp.gate.e_score_correction_bias``, the shared expert Qwen2-MoE's
``mlp.shared_expert.*`` and ``mlp.shared_expert_gate.weight``. ``r1fast_config.json`` (the
ModelConfig) is always written, so every policy round-trips exactly.

DeepSeek-V3 (``deepseek_v3``, an MLA ModelConfig): ``self_attn.q_a_proj`` / ``q_a_layernorm`` /
``q_b_proj`` (or ``q_proj``), ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``,
``o_proj``; ``mlp.shared_experts.*`` (plural) and the ``mlp.gate.e_score_correction_bias``.
DeepSeek-V2 (``deepseek_v2``) has the same names without the correction bias.
Multi-token-prediction layers (``model.layers.{num_layers + i}.*``, ``mtp_layers``) are not
built: load records their names and save copies them back, bit for bit (an FP8 release's as
bf16), from the checkpoint the policy was loaded from (so that folder must still exist at
export). DeepSeek's FP8 release (float8 weights with a scale per 128 x 128 block) loads
directly, each weight read as its fp32 dequantization (r1fast.policy.hf_fp8).

Loading: each rank reads only its slices (safetensors ``get_slice``: TP rows/columns, its
pipeline stage's layers, its EP share of the experts) and copies them into its parameters;
no pickle. Saving (r1fast.policy.hf_save): each tensor is all-gathered over its TP group and
has one owner rank, which writes it (a small model: rank 0 writes one file).

Megatron <-> HF layouts: ``linear_qkv`` [(nq + 2*nkv) * d, H] interleaves per KV group the
group's query heads, then its key and value head, and TP splits it by groups;
``linear_fc1`` of a SwiGLU MLP is [gate; up] *per TP shard*; ``linear_proj``/``linear_fc2``
split their input dimension; embedding and output layer split the vocabulary rows.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from r1fast.policy.config import ModelConfig
from r1fast.policy import hf_fp8 as fp8
from r1fast.policy.parallel import all_ranks_object, host_group

log = logging.getLogger("r1fast.policy")

SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"
R1FAST_CONFIG = "r1fast_config.json"


# ------------------------------------------------------------------------------------------
# Which HF tensor(s) each megatron tensor is
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Map:
    """How one local megatron tensor relates to HF tensors.

    kind: ``rep`` (same tensor), ``rows`` / ``cols`` (TP split of dim 0 / 1), ``glu`` (TP
    shard = [gate shard; up shard]), ``qkv`` (grouped q/k/v interleave, TP split by group).
    ``tp`` is False for experts (expert tensor parallel size 1: whole experts per rank).
    """

    kind: str
    keys: tuple[str, ...]
    tp: bool = True


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")


_MLA = {  # megatron MLASelfAttention -> HF DeepseekV3Attention (TP splits the up projections
    # by heads; the down projections are whole on every rank, see r1fast.policy.mla)
    "linear_q_proj": ("rows", "q_proj"), "linear_q_down_proj": ("rep", "q_a_proj"),
    "q_layernorm": ("rep", "q_a_layernorm"), "linear_q_up_proj": ("rows", "q_b_proj"),
    "linear_kv_down_proj": ("rep", "kv_a_proj_with_mqa"),
    "kv_layernorm": ("rep", "kv_a_layernorm"), "linear_kv_up_proj": ("rows", "kv_b_proj"),
}


def _layer_map(rest: str, g: int, expert_offset: int, deepseek: bool = False) -> Optional[_Map]:
    p = f"model.layers.{g}."
    m = re.match(r"^self_attention\.(\w+)\.weight$", rest)
    if deepseek and m and m.group(1) in _MLA:
        kind, hf = _MLA[m.group(1)]
        return _Map(kind, (f"{p}self_attn.{hf}.weight",))
    shared = "mlp.shared_experts." if deepseek else "mlp.shared_expert."
    m = _EXPERT.match(rest)
    if m:
        e = expert_offset + int(m.group(1))
        q = f"{p}mlp.experts.{e}."
        if m.group(2) == "linear_fc1":
            return _Map("glu", (q + "gate_proj.weight", q + "up_proj.weight"), tp=False)
        return _Map("rep", (q + "down_proj.weight",), tp=False)
    table: dict[str, _Map] = {
        "input_layernorm.weight": _Map("rep", (p + "input_layernorm.weight",)),
        "pre_mlp_layernorm.weight": _Map("rep", (p + "post_attention_layernorm.weight",)),
        "self_attention.q_layernorm.weight": _Map("rep", (p + "self_attn.q_norm.weight",)),
        "self_attention.k_layernorm.weight": _Map("rep", (p + "self_attn.k_norm.weight",)),
        "self_attention.linear_proj.weight": _Map("cols", (p + "self_attn.o_proj.weight",)),
        "mlp.linear_fc1.weight": _Map("glu", (p + "mlp.gate_proj.weight",
                                              p + "mlp.up_proj.weight")),
        "mlp.linear_fc2.weight": _Map("cols", (p + "mlp.down_proj.weight",)),
        "mlp.router.weight": _Map("rep", (p + "mlp.gate.weight",)),
        "mlp.router.expert_bias": _Map("rep", (p + "mlp.gate.e_score_correction_bias",)),
        "mlp.shared_experts.linear_fc1.weight": _Map("glu", (p + shared + "gate_proj.weight",
                                                             p + shared + "up_proj.weight")),
        "mlp.shared_experts.linear_fc2.weight": _Map("cols", (p + shared + "down_proj.weight",)),
        "mlp.shared_experts.gate_weight": _Map("rep", (p + "mlp.shared_expert_gate.weight",)),
    }
    for part in ("weight", "bias"):
        if rest == f"self_attention.linear_qkv.{part}":
            return _Map("qkv", tuple(f"{p}self_attn.{x}_proj.{part}" for x in "qkv"))
    return table.get(rest)


def _local_tensors(policy) -> Iterator[tuple[str, torch.Tensor, _Map]]:
    """(megatron name, local tensor, map) for every tensor of this rank's chunk that has an HF
    counterpart: parameters, and the expert-bias buffers."""
    from megatron.core import parallel_state as ps

    gpt, cfg = policy.gpt, policy.model_cfg
    experts_per_rank = (cfg.num_experts or 0) // max(policy.info.ep, 1)
    expert_offset = ps.get_expert_model_parallel_rank() * experts_per_rank
    layer_numbers = {i: layer.layer_number - 1 for i, layer in enumerate(gpt.decoder.layers)}
    for name, t in gpt.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor) or name.endswith("_extra_state") \
                or name.endswith("local_tokens_per_expert"):
            continue
        if name == "embedding.word_embeddings.weight":
            yield name, t, _Map("rows", ("model.embed_tokens.weight",))
        elif name == "output_layer.weight":
            if cfg.tie_embeddings:
                continue  # the last stage's copy of the embedding; the embedding is the truth
            yield name, t, _Map("rows", ("lm_head.weight",))
        elif name == "decoder.final_layernorm.weight":
            yield name, t, _Map("rep", ("model.norm.weight",))
        else:
            m = _LAYER.match(name)
            mp = _layer_map(m.group(2), layer_numbers[int(m.group(1))], expert_offset,
                            cfg.is_mla) if m else None
            if mp is None:
                raise RuntimeError(f"hf_checkpoint: no HF name for megatron tensor {name!r}")
            yield name, t, mp


def _qkv_groups(cfg: ModelConfig) -> tuple[int, int, int]:
    return cfg.kv_heads, cfg.num_attention_heads // cfg.kv_heads, cfg.kv_channels


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------

class _Reader:
    """Lazy access to the tensors of a safetensors checkpoint (single file or index); an FP8
    weight with a block scale reads as its fp32 dequantization (r1fast.policy.hf_fp8), its
    scale as no tensor."""

    def __init__(self, path: str) -> None:
        from safetensors import safe_open

        self._open = safe_open
        index = os.path.join(path, INDEX)
        single = os.path.join(path, SAFETENSORS)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self.files = {k: os.path.join(path, v) for k, v in weight_map.items()}
        elif os.path.exists(single):
            with safe_open(single, framework="pt") as f:
                self.files = {k: single for k in f.keys()}
        else:
            raise ValueError(f"load_hf_checkpoint: no {SAFETENSORS} or {INDEX} in {path!r}")
        self._handles: dict[str, Any] = {}
        self._block = fp8.block_size(path) or fp8.DEFAULT_BLOCK
        suffix = fp8.SCALE_SUFFIX
        scales = {k[:-len(suffix)]: k for k in self.files if k.endswith(suffix)}
        self._scales = {w: scale for w, scale in scales.items() if w in self.files}
        self.fp8 = frozenset(self._scales)  # weights read through their block scales
        # scales are no tensors of the policy; a shard of their own is possible in an index
        self._scale_files = {scale: self.files.pop(scale) for scale in self._scales.values()}

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def slice(self, key: str):
        if key not in self.files:
            raise ValueError(f"load_hf_checkpoint: checkpoint has no tensor {key!r}")
        if key in self._scales:
            return fp8.DequantSlice(key, self._stored(key), self._stored(self._scales[key]),
                                    self._block)
        return self._stored(key)

    def _stored(self, key: str):
        f = self.files[key] if key in self.files else self._scale_files[key]
        if f not in self._handles:
            self._handles[f] = self._open(f, framework="pt")
        return self._handles[f].get_slice(key)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self.slice(key)[start:stop]

    def info(self, key: str) -> tuple[tuple[int, ...], str]:
        """(full shape, safetensors dtype name such as "BF16") of a tensor, without reading it."""
        sl = self.slice(key)
        return tuple(sl.get_shape()), sl.get_dtype()

    def full(self, key: str) -> torch.Tensor:
        return self.slice(key)[:]


def _shard_value(reader: _Reader, mp: _Map, cfg: ModelConfig, tp: int, rank: int,
                 shape: torch.Size) -> torch.Tensor:
    """The value of this TP rank's shard of a megatron tensor, read from the checkpoint."""
    if not mp.tp:
        tp, rank = 1, 0
    if mp.kind == "rep":
        return reader.full(mp.keys[0])
    if mp.kind == "rows":
        n = shape[0]
        return reader.rows(mp.keys[0], rank * n, (rank + 1) * n)
    if mp.kind == "cols":
        n = shape[1]
        return reader.slice(mp.keys[0])[:, rank * n:(rank + 1) * n]
    if mp.kind == "glu":
        n = shape[0] // 2
        return torch.cat([reader.rows(k, rank * n, (rank + 1) * n) for k in mp.keys], dim=0)
    if mp.kind == "qkv":
        groups, q_per_group, d = _qkv_groups(cfg)
        g_local = groups // tp
        parts = []
        for g in range(rank * g_local, (rank + 1) * g_local):
            parts.append(reader.rows(mp.keys[0], g * q_per_group * d, (g + 1) * q_per_group * d))
            parts.append(reader.rows(mp.keys[1], g * d, (g + 1) * d))
            parts.append(reader.rows(mp.keys[2], g * d, (g + 1) * d))
        return torch.cat(parts, dim=0)
    raise AssertionError(mp.kind)


def load_model_config(path: str) -> ModelConfig:
    """The ModelConfig of a checkpoint directory: ``r1fast_config.json`` if present (exact),
    else translated from the HF ``config.json``."""
    mine = os.path.join(path, R1FAST_CONFIG)
    if os.path.exists(mine):
        with open(mine) as f:
            return ModelConfig.from_dict(json.load(f))
    hf = os.path.join(path, "config.json")
    if not os.path.exists(hf):
        raise ValueError(f"load_model_config: no {R1FAST_CONFIG} or config.json in {path!r}")
    with open(hf) as f:
        return ModelConfig.from_hf_config(json.load(f))


#: safetensors dtypes a weight may have (ints and bools are never weights; an FP8 weight is
#: read through its block scale, as F32)
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
#: checkpoint tensors that are not weights of any policy and are ignored
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def _hf_shapes(mp: _Map, cfg: ModelConfig, tp: int,
               shape: torch.Size) -> dict[str, tuple[int, ...]]:
    """The full shape of each checkpoint tensor that a local megatron tensor of ``shape``
    is read from (TP shards times the TP size; the q/k/v split of a fused qkv)."""
    n = tp if mp.tp else 1
    shape = tuple(shape)
    if mp.kind == "rep":
        return {mp.keys[0]: shape}
    if mp.kind == "rows":
        return {mp.keys[0]: (shape[0] * n, *shape[1:])}
    if mp.kind == "cols":
        return {mp.keys[0]: (shape[0], shape[1] * n, *shape[2:])}
    if mp.kind == "glu":
        return {k: (shape[0] // 2 * n, *shape[1:]) for k in mp.keys}
    if mp.kind == "qkv":
        groups, q_per_group, d = _qkv_groups(cfg)
        q, kv = (groups * q_per_group * d, *shape[1:]), (groups * d, *shape[1:])
        return {mp.keys[0]: q, mp.keys[1]: kv, mp.keys[2]: kv}
    raise AssertionError(mp.kind)


def _entry_problems(reader: _Reader, want: dict[str, tuple[int, ...]]) -> list[str]:
    """Why the checkpoint's tensors ``want`` (key -> full shape) cannot be loaded, if they
    cannot: a non-float dtype or a shape other than the policy's (no slicing of a larger one)."""
    out = []
    for key, shape in want.items():
        got, dtype = reader.info(key)
        if dtype.startswith("F8"):
            out.append(f"{key} is {dtype} without its block scale {key}_scale_inv (an FP8 "
                       f"weight loads only with the scale DeepSeek's release stores beside it)")
        elif dtype not in _FLOAT_DTYPES:
            out.append(f"{key} has dtype {dtype}, a weight must be a float tensor "
                       f"({'/'.join(_FLOAT_DTYPES)})")
        elif got != tuple(shape):
            out.append(f"{key} has shape {list(got)}, the policy needs {list(shape)}")
    return out


#: bytes per element of the safetensors float dtypes
_FLOAT_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


def _narrowed(reader: _Reader, keys: Sequence[str], dtype: torch.dtype) -> list[str]:
    """The checkpoint tensors among ``keys`` stored wider than ``dtype`` (an FP8 weight's
    dequantisation is not: its block scale makes it fp32 only in passing)."""
    width = torch.finfo(dtype).bits // 8
    return [k for k in keys
            if k not in reader.fp8 and _FLOAT_BYTES.get(reader.info(k)[1], 0) > width]


def _load_one(t: torch.Tensor, value: torch.Tensor, keys: Sequence[str],
              allow_nonfinite: bool) -> list[str]:
    if not allow_nonfinite and value.is_floating_point() and \
            not bool(torch.isfinite(value).all()):
        return [f"{'/'.join(keys)} holds NaN or Inf values (allow_nonfinite=True loads it "
                f"anyway)"]
    t.data.copy_(value.to(t.dtype))
    return []


def load_hf_checkpoint(policy, path: str, *, allow_nonfinite: bool = False) -> None:
    """Copy the weights of the checkpoint at ``path`` into ``policy`` (every rank its slices).

    Strict: every tensor's full shape and dtype must be the policy's (a larger embedding is
    never sliced to fit, an int/bool tensor never cast), the checkpoint must have every tensor
    the policy needs and no tensor it does not use (``rotary_emb.inv_freq`` buffers, and
    ``lm_head.weight`` of a tied model, are ignored), and no weight may hold NaN/Inf unless
    ``allow_nonfinite``. All problems are reported together in one ``ValueError`` (the same on
    every rank: collective when torch.distributed runs several processes).

    Load before building the optimizer (for 16-bit params the optimizer keeps fp32 master
    copies made at construction; otherwise call its ``reload_model_params()``)."""
    from megatron.core import parallel_state as ps

    cfg = policy.model_cfg
    _check_same_architecture(cfg, load_model_config(path), path)
    reader = _Reader(path)
    tp, rank = policy.info.tp, ps.get_tensor_model_parallel_rank()
    missing: list[str] = []
    problems: list[str] = []
    narrowed: list[str] = []  # stored wider than the parameter (a transformers-saved fp32 gate)
    used: set[str] = set()
    with torch.no_grad():
        for name, t, mp in _local_tensors(policy):
            used.update(mp.keys)
            if not all(k in reader for k in mp.keys):
                missing.extend(k for k in mp.keys if k not in reader)
                continue
            bad = _entry_problems(reader, _hf_shapes(mp, cfg, tp, t.shape))
            if bad:
                problems.extend(bad)
                continue
            value = _shard_value(reader, mp, cfg, tp, rank, t.shape)
            if tuple(value.shape) != tuple(t.shape):
                problems.append(f"{'/'.join(mp.keys)} gives shape {list(value.shape)} for "
                                f"{name}, expected {list(t.shape)}")
                continue
            problems.extend(_load_one(t, value, mp.keys, allow_nonfinite))
            narrowed.extend(_narrowed(reader, mp.keys, t.dtype))
        if cfg.tie_embeddings and policy.gpt.post_process and not policy.gpt.pre_process:
            # The last stage's copy of the tied embedding.
            key = "model.embed_tokens.weight"
            used.add(key)
            w = policy.gpt.output_layer.weight
            n = w.shape[0]
            if key not in reader:
                missing.append(key)
            else:
                bad = _entry_problems(reader, {key: (n * tp, *w.shape[1:])})
                problems.extend(bad or _load_one(w, reader.rows(key, rank * n, (rank + 1) * n),
                                                 (key,), allow_nonfinite))
    parts = all_ranks_object((missing, problems, sorted(used), narrowed))
    missing = [k for p in parts for k in p[0]]
    problems = [k for p in parts for k in p[1]]
    used = {k for p in parts for k in p[2]}
    narrowed = sorted({k for p in parts for k in p[3]})
    missing = list(dict.fromkeys(missing))
    problems = list(dict.fromkeys(problems))
    extra = sorted(k for k in reader.files if k not in used and not _IGNORED.match(k)
                   and not (cfg.tie_embeddings and k == "lm_head.weight"))
    mtp = [k for k in extra if _is_mtp(k, cfg)]
    extra = [k for k in extra if not _is_mtp(k, cfg)]
    # MTP layers are not built: save_hf_checkpoint copies them back from here, unchanged (a
    # checkpoint may lack them although its config counts them: transformers saves none).
    policy.hf_passthrough = (os.path.abspath(path), mtp)
    report = []
    if missing:
        report.append(f"lacks {len(missing)} tensors, e.g. {missing[:5]}")
    if extra:
        report.append(f"has {len(extra)} tensors the policy does not use (another "
                      f"architecture?), e.g. {extra[:5]}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        report.append("; ".join(problems[:5]) + more)
    if report:
        raise ValueError(f"load_hf_checkpoint: checkpoint at {path!r} " + "; ".join(report))
    if narrowed and (not dist.is_initialized() or dist.get_rank() == 0):
        log.warning("load_hf_checkpoint: %d tensor(s) of %s are stored wider than the policy's "
                    "params_dtype=%s and were rounded to it (e.g. %s)%s", len(narrowed), path,
                    cfg.params_dtype, ", ".join(narrowed[:3]), _GATE_NOTE
                    if any(k.endswith("mlp.gate.weight") for k in narrowed) else "")


_GATE_NOTE = (": a router's gate.weight is among them, which transformers keeps in fp32; "
              "tokens whose expert scores nearly tie may route differently from the "
              "checkpoint's own model")


def _is_mtp(key: str, cfg: ModelConfig) -> bool:
    """A tensor of a multi-token-prediction layer (DeepSeek-V3: model.layers.{L + i}.*)."""
    m = re.match(r"^model\.layers\.(\d+)\.", key)
    return m is not None and cfg.num_layers <= int(m.group(1)) < cfg.num_layers + cfg.mtp_layers


def keep_mtp_from(policy, path: str) -> list[str]:
    """Record the MTP tensors of the HF folder ``path`` to be copied back by
    :func:`save_hf_checkpoint` (an export of a run that started from ``path``: MTP layers are
    not trained, so the start's tensors are the run's). Returns their names."""
    keys = sorted(k for k in _Reader(path).files if _is_mtp(k, policy.model_cfg))
    policy.hf_passthrough = (os.path.abspath(path), keys)
    return keys


def passthrough_tensors(policy) -> dict[str, torch.Tensor]:
    """The checkpoint tensors the policy keeps but does not build (MTP layers), read again from
    the checkpoint it was loaded from."""
    src, keys = getattr(policy, "hf_passthrough", (None, []))
    if not keys:
        return {}
    reader = _Reader(src)
    # an FP8 release's MTP weights as DeepSeek's bf16 conversion writes them
    return {k: reader.full(k).to(torch.bfloat16) if k in reader.fp8 else reader.full(k)
            for k in keys}


#: fields whose difference leaves every tensor's shape alone: not an error (a longer context or
#: another RoPE base is a legitimate start), but the checkpoint computed something else
_MATH_FIELDS = ("rope_theta", "rms_norm_eps", "max_position_embeddings", "rope_type",
                "rope_factor", "rope_original_max_position", "rope_beta_fast", "rope_beta_slow",
                "rope_mscale", "rope_mscale_all_dim", "moe_router_topk", "router_score",
                "router_pre_softmax", "router_n_groups", "router_topk_groups",
                "router_group_score_topk", "router_scaling_factor", "router_normalize")


def _check_same_architecture(mine: ModelConfig, theirs: ModelConfig, path: str = "") -> None:
    """A shape-changing difference is an error; a difference in :data:`_MATH_FIELDS` a
    WARNING naming each field (the policy will not compute what the checkpoint did)."""
    keys = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "kv_heads",
            "kv_channels", "ffn_hidden_size", "num_experts", "moe_ffn_hidden_size",
            "dense_layers", "shared_expert_size", "shared_expert_gate", "qk_layernorm",
            "add_qkv_bias", "tie_embeddings", "router_expert_bias", "attention", "q_lora_rank",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "mtp_layers")

    def differ(names):
        return [f"{k}: policy {getattr(mine, k)!r} vs checkpoint {getattr(theirs, k)!r}"
                for k in names if getattr(mine, k) != getattr(theirs, k)]

    diff = differ(keys)
    if diff:
        raise ValueError("load_hf_checkpoint: the checkpoint's architecture differs: "
                         + "; ".join(diff))
    diff = differ(_MATH_FIELDS)
    if diff:
        log.warning("load_hf_checkpoint: %s was trained with other settings than this policy "
                    "uses (its weights load; the outputs will differ): %s", path or "the "
                    "checkpoint", "; ".join(diff))


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------

def _gather_tp(t: torch.Tensor, dim: int, group) -> list[torch.Tensor]:
    size = dist.get_world_size(group)
    if size == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _full_hf(t: torch.Tensor, mp: _Map, cfg: ModelConfig, group) -> dict[str, torch.Tensor]:
    """HF tensors of one megatron tensor (collective over the TP group when TP-split)."""
    t = t.detach()
    if mp.kind == "rep":
        return {mp.keys[0]: t}
    parts = _gather_tp(t, 0, group) if mp.tp else [t]
    if mp.kind == "rows":
        return {mp.keys[0]: torch.cat(parts, 0)}
    if mp.kind == "cols":
        return {mp.keys[0]: torch.cat(parts, 1)}
    if mp.kind == "glu":
        halves = [p.chunk(2, dim=0) for p in parts]
        return {mp.keys[0]: torch.cat([h[0] for h in halves], 0),
                mp.keys[1]: torch.cat([h[1] for h in halves], 0)}
    if mp.kind == "qkv":
        groups, q_per_group, d = _qkv_groups(cfg)
        full = torch.cat(parts, 0).view(groups, (q_per_group + 2) * d, *t.shape[1:])
        q, k, v = full.split([q_per_group * d, d, d], dim=1)
        tail = tuple(t.shape[1:])
        return {mp.keys[0]: q.reshape(groups * q_per_group * d, *tail),
                mp.keys[1]: k.reshape(groups * d, *tail), mp.keys[2]: v.reshape(groups * d, *tail)}
    raise AssertionError(mp.kind)


def _kept_fp32(cfg: ModelConfig, key: str) -> bool:
    """DeepSeek's router weight and expert-bias, which transformers keeps in fp32 whatever the
    checkpoint's dtype (``_keep_in_fp32_modules_strict``): bf16 would flip expert choices."""
    return cfg.is_mla and key.endswith((".mlp.gate.weight", ".mlp.gate.e_score_correction_bias"))


def owned_hf_tensors(policy, dtype: Optional[torch.dtype] = None, *,
                     grads: bool = False) -> dict[str, torch.Tensor]:
    """The HF-named full tensors this rank owns, on the CPU, in ``dtype`` when given
    (DeepSeek's router weight and bias stay fp32, as in transformers). Each tensor has one
    owner: for an expert, one rank of its expert-data-parallel group; else one TP rank of its
    pipeline stage's first replica. Collective (each tensor is all-gathered over
    its TP group). ``grads=True``: the gradients instead (``main_grad`` under DDP -- call
    optim.unshard_main_grads first with the distributed optimizer -- else ``.grad``; tensors
    without a gradient are left out)."""
    from megatron.core import parallel_state as ps

    cfg = policy.model_cfg
    tp_group = ps.get_tensor_model_parallel_group()
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    edp = max(ps.get_expert_data_parallel_world_size(), 1)
    edp_rank = ps.get_expert_data_parallel_rank()
    mine: dict[str, torch.Tensor] = {}
    # Owners take turns (the i-th tensor of a stage, counted alike on the ranks that hold it):
    # an export's host memory and writes spread over the TP ranks of replica 0 and over the
    # expert-data-parallel ranks, rather than all on their first rank.
    for i, (name, t, mp) in enumerate(_local_tensors(policy)):
        if grads:
            t = getattr(t, "main_grad", None) if hasattr(t, "main_grad") else t.grad
            if t is None:
                continue
        full = _full_hf(t, mp, cfg, tp_group)  # every TP rank joins the gather
        if (policy.info.dp_rank == 0 and i % tp == tp_rank) if mp.tp else i % edp == edp_rank:
            for k, v in full.items():
                to = torch.float32 if dtype is not None and _kept_fp32(cfg, k) else dtype
                mine[k] = v.to(to or v.dtype).cpu().clone()
    return mine


def gather_hf_state_dict(policy, dtype: Optional[torch.dtype] = None, *,
                         grads: bool = False) -> Optional[dict]:
    """The whole model as HF-named full tensors on global rank 0 (None on other ranks): every
    rank's :func:`owned_hf_tensors` (same arguments), sent to rank 0's host memory. For
    tests and small models; :func:`save_hf_checkpoint` never holds a large model in one
    process. Collective: every rank must call it."""
    mine = owned_hf_tensors(policy, dtype, grads=grads)
    if dist.get_world_size() == 1:
        return mine
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0, group=host_group())  # in host memory
    if dist.get_rank() != 0:
        return None
    out: dict[str, torch.Tensor] = {}
    for part in gathered:
        out.update(part)
    return out


def save_hf_checkpoint(policy, path: str, *, dtype: Optional[torch.dtype] = None,
                       max_shard_bytes: int = 4 << 30) -> None:
    """Write ``policy`` to ``path`` in the HF layout (collective; see
    :func:`r1fast.policy.hf_save.write_hf_folder`, which does the work).

    Files: ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards plus
    ``model.safetensors.index.json`` when larger than ``max_shard_bytes``, each written by
    the rank that owns its tensors), ``config.json`` when the model is of a supported HF
    family, and ``r1fast_config.json`` always. A non-finite tensor writes nothing.
    """
    from r1fast.policy.hf_save import write_hf_folder

    write_hf_folder(policy, path, dtype=dtype, max_shard_bytes=max_shard_bytes)
