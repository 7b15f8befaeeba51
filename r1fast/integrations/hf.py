"""r1fast ops on a Hugging Face causal LM, without materialising logits.

A ``*ForCausalLM`` model is a decoder (``model.get_decoder()``) whose last hidden state goes
through an output head (``model.get_output_embeddings()``). Calling the model computes
``[batch, length, vocab]`` logits; these helpers call the decoder instead and hand its hidden
states and the head weight to :func:`r1fast.ops.linear_logprob` /
:func:`r1fast.ops.fused_linear_policy_loss`, which stream over the vocabulary.

Shapes follow the causal-LM convention: the log-prob at position ``t`` is that of token
``t + 1``, so outputs have length ``L - 1``; with ``logits_to_keep=C`` (TRL's completion-only
tensors) they are the last ``C`` targets, ``[B, C]``, and the head runs on those rows only.
Extra keyword arguments go to the decoder (``position_ids`` of a padding-free batch) and must
be arguments its ``forward`` names: a name it would swallow unread in ``**kwargs`` (a VLM's
``pixel_values`` reach only its text model) is an error. Models whose head is more than a linear map
(final-logit soft-capping, logit scaling, a head bias) are rejected with a clear error rather
than silently computing something different from the model's own logits.
"""
from __future__ import annotations

import torch

from r1fast import ops
from r1fast.ops._validate import FLOAT_DTYPES, check_tensor


def hf_hidden_and_head(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       **decoder_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states ``[B, L, H]`` and the output weight ``[V, H]`` of an HF causal LM."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(head, torch.nn.Linear):
        raise ValueError("model must have a torch.nn.Linear output head (get_output_embeddings())")
    if head.bias is not None:
        raise ValueError("output heads with a bias are not supported (the logits would differ)")
    _check_plain_logits(model)
    _check_gathered(model, head)
    decoder = model.get_decoder()
    _check_decoder_arguments(decoder, decoder_kwargs)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, **decoder_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden, head.weight


def _check_decoder_arguments(decoder, kwargs: dict) -> None:
    """An error naming each argument that neither ``decoder.forward`` names nor transformers'
    layers read from its ``**kwargs`` (``TransformersKwargs``: ``cu_seq_lens_q``, ...): the
    decoder would take it and never read it (a VLM's images, a misspelt ``position_id``)."""
    import inspect

    params = inspect.signature(decoder.forward).parameters.values()
    named = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if any(p.kind == p.VAR_KEYWORD for p in params):
        from transformers.utils.generic import TransformersKwargs

        named |= set(TransformersKwargs.__annotations__)
    unknown = sorted(set(kwargs) - named)
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not an argument of the model's decoder "
                         f"({type(decoder).__name__}.forward takes {', '.join(sorted(named))}); "
                         f"a vision-language model's image inputs are not supported")


def _check_gathered(model, head: torch.nn.Linear) -> None:
    """An error when the embedding or the head is still sharded (FSDP2's DTensor, DeepSpeed
    ZeRO-3's partitioned placeholder): these helpers call the decoder and read the head weight
    directly, so the root module's forward, which would gather them, never runs."""
    from torch.distributed.tensor import DTensor

    embed = model.get_input_embeddings()
    for name, w in (("input embedding", getattr(embed, "weight", None)),
                    ("output head", head.weight)):
        if isinstance(w, DTensor) or hasattr(w, "ds_id"):
            raise ValueError(f"the model's {name} weight is sharded ({type(w).__name__}, FSDP2 "
                             f"or ZeRO-3): these helpers skip the root forward that gathers it; "
                             f"gather it first (FSDP2 keeps the root unit gathered after a root "
                             f"forward; ZeRO-3: deepspeed.zero.GatheredParameters) or leave the "
                             f"embedding and head out of the sharding")


#: config fields of transformers models whose logits are not ``hidden @ W^T``: a softcap
#: (Gemma 2/3: ``cap * tanh(z / cap)``, at any value) and scales (Cohere's ``logit_scale``,
#: Granite's ``logits_scaling`` divisor, Falcon-H1's ``lm_head_multiplier``, ...), fine at 1
_SOFTCAPS = ("final_logit_softcapping",)
_SCALES = ("logit_scale", "output_multiplier_scale", "output_multiplier", "logits_scaling",
           "lm_head_multiplier")


def _check_plain_logits(model) -> None:
    """An error naming the field when ``model``'s logits are not a plain linear map of its
    hidden states (these helpers would compute other log-probs, silently)."""
    cfg = getattr(model, "config", None)
    configs = [cfg] if cfg is None or not hasattr(cfg, "get_text_config") else \
        [cfg, cfg.get_text_config()]
    for c in configs:
        bad = [(a, getattr(c, a)) for a in _SOFTCAPS if getattr(c, a, None) is not None]
        bad += [(a, getattr(c, a)) for a in _SCALES if getattr(c, a, None) not in (None, 1, 1.0)]
        if bad:
            attr, value = bad[0]
            raise ValueError(f"model config sets {attr}={value}: its logits are not a plain "
                             f"linear map of the hidden states, which these helpers assume")
    if getattr(model, "final_logits_bias", None) is not None:
        raise ValueError("model adds final_logits_bias to its logits: not a plain linear map of "
                         "the hidden states, which these helpers assume")


def scored_targets(input_ids: torch.Tensor, logits_to_keep: int | None) -> int:
    """How many next-token targets are scored: the last ``logits_to_keep``, else all ``L - 1``."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:  # next-token targets need L >= 2
        raise ValueError(f"input_ids must be [B, L] with L >= 2, got {tuple(input_ids.shape)}")
    last = input_ids.shape[1] - 1
    if logits_to_keep is None:
        return last
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) \
            or not 1 <= logits_to_keep <= last:
        raise ValueError(f"logits_to_keep must be an int in [1, {last}] (input_ids is "
                         f"{tuple(input_ids.shape)}), got {logits_to_keep!r}")
    return logits_to_keep


def per_token_temperature(temperature: float | torch.Tensor, input_ids: torch.Tensor,
                          targets: int | None = None) -> float | torch.Tensor:
    """A float as it is; a ``[B]`` tensor of per-sample temperatures as ``[B, C]``, one per
    scored target of ``input_ids [B, L]`` (``C = targets``, default ``L - 1``); a ``[B, C]``
    tensor (one per token) as it is."""
    if not isinstance(temperature, torch.Tensor):
        return temperature
    B, L = input_ids.shape
    c = L - 1 if targets is None else targets
    shape = (B, c) if temperature.dim() == 2 else (B,)
    check_tensor("temperature", temperature, dtypes=FLOAT_DTYPES, shape=shape,
                 device=input_ids.device)
    return temperature if temperature.dim() == 2 else temperature[:, None].expand(B, c)


def _scored(model, input_ids, attention_mask, logits_to_keep, decoder_kwargs):
    """(hidden states before each scored target [B, C, H], head weight, targets [B, C])."""
    c = scored_targets(input_ids, logits_to_keep)
    hidden, weight = hf_hidden_and_head(model, input_ids, attention_mask, **decoder_kwargs)
    last = input_ids.shape[1] - 1
    return hidden[:, last - c:last], weight, input_ids[:, last + 1 - c:]


def hf_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                temperature: float | torch.Tensor = 1.0, return_entropy: bool = False,
                logits_to_keep: int | None = None, impl: str = "auto", **decoder_kwargs):
    """Log-prob of each next token, ``[B, L-1]`` fp32 (``[B, C]`` with ``logits_to_keep=C``),
    and entropy when asked; ``temperature`` is one float, ``[B]`` (one per sample) or one per
    scored token."""
    hidden, weight, targets = _scored(model, input_ids, attention_mask, logits_to_keep,
                                      decoder_kwargs)
    B, C, H = hidden.shape
    tau = per_token_temperature(temperature, input_ids, C)
    if isinstance(tau, torch.Tensor):
        tau = tau.reshape(-1)  # [B * C]
    out = ops.linear_logprob(hidden.reshape(-1, H), weight, targets.reshape(-1),
                             temperature=tau, return_entropy=return_entropy, impl=impl)
    if return_entropy:
        return out[0].view(B, C), out[1].view(B, C)
    return out.view(B, C)


def hf_grpo_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 completion_mask: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                 ref_logp: torch.Tensor | None = None,
                 config: "ops.PolicyLossConfig | None" = None, *,
                 temperature: float | torch.Tensor = 1.0,
                 rollout_logp: torch.Tensor | None = None,
                 global_normalizer: float | None = None, max_len: int | None = None,
                 logits_to_keep: int | None = None, impl: str = "auto", **decoder_kwargs):
    """GRPO loss of an HF causal LM from hidden states.

    ``completion_mask``, ``old_logp``, ``ref_logp``, ``rollout_logp``: ``[B, L-1]`` aligned with
    the next-token targets ``input_ids[:, 1:]``, or ``[B, C]`` with ``logits_to_keep=C`` (the
    last C targets: TRL's completion tensors); ``advantages``: ``[B]`` per sequence;
    ``temperature``: one float, ``[B]`` or one per scored token. Returns ``(loss, metrics)`` as
    :func:`r1fast.ops.policy_loss`. An integer or bool ``completion_mask`` (TRL's and verl's
    are) is taken as 0/1 weights. Dr.GRPO (``agg="seq-mean-token-sum-norm"``) divides by
    B * ``max_len``: pass TRL's ``max_completion_length`` (the default is the scored width,
    L-1 or C, which changes from batch to batch), or ``global_normalizer``.
    """
    if isinstance(completion_mask, torch.Tensor) and not completion_mask.is_floating_point():
        completion_mask = completion_mask.float()
    hidden, weight, targets = _scored(model, input_ids, attention_mask, logits_to_keep,
                                      decoder_kwargs)
    tau = per_token_temperature(temperature, input_ids, hidden.shape[1])
    config = config or ops.PolicyLossConfig()
    return ops.fused_linear_policy_loss(
        hidden, weight, targets, old_logp, advantages, completion_mask,
        ref_logp, config, rollout_logp=rollout_logp, temperature=tau,
        global_normalizer=global_normalizer, max_len=max_len, impl=impl)
