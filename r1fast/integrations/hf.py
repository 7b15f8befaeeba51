"""r1fast ops on a Hugging Face causal LM, without materialising logits.

A ``*ForCausalLM`` model is a decoder whose last hidden state goes through an output head
(``model.get_output_embeddings()``). Calling the model computes ``[batch, length, vocab]``
logits; :func:`hf_logprobs` and :func:`hf_grpo_loss` call the model as it is, through any
DDP / FSDP / DeepSpeed wrapper (whose hooks then run: gradient synchronisation, gathering of
sharded weights), with the head replaced for that one call by a stand-in that hands the hidden
states and the head weight to :func:`r1fast.ops.linear_logprob` /
:func:`r1fast.ops.fused_linear_policy_loss`, which stream over the vocabulary. (Calling the
decoder alone skipped the wrapper: DDP then synchronised no gradient, silently.)

Shapes follow the causal-LM convention: the log-prob at position ``t`` is that of token
``t + 1``, so outputs have length ``L - 1``; with ``logits_to_keep=C`` (TRL's completion-only
tensors) they are the last ``C`` targets, ``[B, C]``, and the head runs on those rows only.
Extra keyword arguments go to the model's forward (``position_ids`` of a padding-free batch, a
VLM's images) and must be arguments it names: a name it would swallow unread in ``**kwargs``
is an error. Models whose head is more than a linear map
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
    head = _plain_head(model)
    _check_gathered("input embedding", getattr(model.get_input_embeddings(), "weight", None))
    _check_gathered("output head", head.weight)
    decoder = model.get_decoder()
    _check_decoder_arguments(decoder, decoder_kwargs)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, **decoder_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden, head.weight


def _unwrapped(model):
    """The transformers model inside DDP / FSDP1 / DeepSpeed wrappers (their ``.module``)."""
    inner = model
    while not hasattr(inner, "get_output_embeddings") \
            and isinstance(getattr(inner, "module", None), torch.nn.Module):
        inner = inner.module
    return inner


class _HeadCall(torch.nn.Module):
    """The output head's stand-in for one call of the model: ``fn(hidden, weight)`` on the
    hidden states the model hands its head and the weight as that forward sees it (gathered
    by FSDP), returned as the model's "logits"."""

    def __init__(self, head: torch.nn.Linear, fn):
        super().__init__()
        self.head, self.fn = head, fn

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        _check_gathered("output head", self.head.weight)
        return self.fn(hidden, self.head.weight)


def _through_model(model, input_ids, attention_mask, scored: int, fn, model_kwargs: dict):
    """``fn(hidden [B, C, H] before each of the last C = scored targets, weight)`` computed
    inside the model's own forward, called through ``model`` (its wrappers included)."""
    import inspect

    inner = _unwrapped(model)
    head = _plain_head(inner)
    _check_decoder_arguments(inner, model_kwargs)
    params = inspect.signature(inner.forward).parameters
    # use_cache stays the caller's (the model's config): transformers reads position_ids
    # resets as packed sequences only without a cache, so it changes the numbers
    extra = {"logits_to_keep": scored + 1} if "logits_to_keep" in params else {}

    def on_hidden(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return fn(hidden[:, -(scored + 1):-1], weight)  # the last row predicts no target

    inner.set_output_embeddings(_HeadCall(head, on_hidden))
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, **extra, **model_kwargs)
    finally:
        inner.set_output_embeddings(head)
    return out.logits if hasattr(out, "logits") else out[0]


def _plain_head(model) -> torch.nn.Linear:
    """The output head, if the logits are a plain ``hidden @ W^T`` of it (else an error)."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(head, torch.nn.Linear):
        raise ValueError("model must have a torch.nn.Linear output head (get_output_embeddings())")
    if head.bias is not None:
        raise ValueError("output heads with a bias are not supported (the logits would differ)")
    _check_plain_logits(model)
    return head


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


def _check_gathered(name: str, w) -> None:
    """An error when a weight read directly is still sharded (FSDP2's DTensor, DeepSpeed
    ZeRO-3's partitioned placeholder): the head's stand-in never calls the head's own forward,
    whose hooks would gather a head sharded on its own; :func:`hf_hidden_and_head` calls the
    decoder alone, past the root forward that gathers the root unit."""
    from torch.distributed.tensor import DTensor

    if isinstance(w, DTensor) or hasattr(w, "ds_id"):
        raise ValueError(f"the model's {name} weight is sharded ({type(w).__name__}, FSDP2 "
                         f"or ZeRO-3) where r1fast reads it; gather it first (ZeRO-3: "
                         f"deepspeed.zero.GatheredParameters), or shard the head with the root "
                         f"unit (FSDP2: fully_shard(model) gathers it for the model's forward)")


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


def hf_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                temperature: float | torch.Tensor = 1.0, return_entropy: bool = False,
                logits_to_keep: int | None = None, impl: str = "auto", **decoder_kwargs):
    """Log-prob of each next token, ``[B, L-1]`` fp32 (``[B, C]`` with ``logits_to_keep=C``),
    and entropy when asked; ``temperature`` is one float, ``[B]`` (one per sample) or one per
    scored token."""
    C = scored_targets(input_ids, logits_to_keep)
    B = input_ids.shape[0]
    targets = input_ids[:, -C:].reshape(-1)  # [B * C]
    tau = per_token_temperature(temperature, input_ids, C)
    if isinstance(tau, torch.Tensor):
        tau = tau.reshape(-1)  # [B * C]

    def logprobs(hidden, weight):  # [B, C, H] -> [B, C], or [2, B, C] with the entropy
        out = ops.linear_logprob(hidden.reshape(B * C, -1), weight, targets, temperature=tau,
                                 return_entropy=return_entropy, impl=impl)
        return torch.stack(out).view(2, B, C) if return_entropy else out.view(B, C)

    out = _through_model(model, input_ids, attention_mask, C, logprobs, decoder_kwargs)
    return (out[0], out[1]) if return_entropy else out


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
    C = scored_targets(input_ids, logits_to_keep)
    targets = input_ids[:, -C:]
    tau = per_token_temperature(temperature, input_ids, C)
    config = config or ops.PolicyLossConfig()
    metrics: dict = {}

    def loss_of(hidden, weight):  # the metrics leave beside the model's output
        loss, m = ops.fused_linear_policy_loss(
            hidden, weight, targets, old_logp, advantages, completion_mask, ref_logp, config,
            rollout_logp=rollout_logp, temperature=tau, global_normalizer=global_normalizer,
            max_len=max_len, impl=impl)
        metrics.update(m)
        return loss

    loss = _through_model(model, input_ids, attention_mask, C, loss_of, decoder_kwargs)
    return loss, metrics
