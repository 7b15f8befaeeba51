"""r1fast ops on a Hugging Face causal LM, without materialising logits.

A ``*ForCausalLM`` model is a decoder (``model.get_decoder()``) whose last hidden state goes
through an output head (``model.get_output_embeddings()``). Calling the model computes
``[batch, length, vocab]`` logits; these helpers call the decoder instead and hand its hidden
states and the head weight to :func:`r1fast.ops.linear_logprob` /
:func:`r1fast.ops.fused_linear_policy_loss`, which stream over the vocabulary.

Shapes follow the causal-LM convention: the log-prob at position ``t`` is that of token
``t + 1``, so outputs have length ``L - 1``. Models whose head is more than a linear map
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
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            raise ValueError(f"model config sets {attr}={getattr(cfg, attr)}: its logits are not a "
                             "plain linear map of the hidden states, which these helpers assume")
    decoder = model.get_decoder()
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, **decoder_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden, head.weight


def per_token_temperature(temperature: float | torch.Tensor, input_ids: torch.Tensor
                          ) -> float | torch.Tensor:
    """A float as it is; a ``[B]`` tensor of per-sample temperatures as ``[B, L-1]``, one per
    next-token position of ``input_ids [B, L]``; a ``[B, L-1]`` tensor (one per token) as it
    is."""
    if not isinstance(temperature, torch.Tensor):
        return temperature
    B, L = input_ids.shape
    shape = (B, L - 1) if temperature.dim() == 2 else (B,)
    check_tensor("temperature", temperature, dtypes=FLOAT_DTYPES, shape=shape,
                 device=input_ids.device)
    return temperature if temperature.dim() == 2 else temperature[:, None].expand(B, L - 1)


def hf_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                temperature: float | torch.Tensor = 1.0, return_entropy: bool = False,
                impl: str = "auto"):
    """Log-prob of each next token, ``[B, L-1]`` fp32 (and entropy when asked);
    ``temperature`` is one float, ``[B]`` (one per sample) or ``[B, L-1]`` (one per token)."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [B, L] with L >= 2, got {tuple(input_ids.shape)}")
    tau = per_token_temperature(temperature, input_ids)
    hidden, weight = hf_hidden_and_head(model, input_ids, attention_mask)
    B, L, H = hidden.shape
    targets = input_ids[:, 1:].reshape(-1)
    if isinstance(tau, torch.Tensor):
        tau = tau.reshape(-1)  # [B * (L-1)]
    out = ops.linear_logprob(hidden[:, :-1].reshape(-1, H), weight, targets,
                             temperature=tau, return_entropy=return_entropy, impl=impl)
    if return_entropy:
        return out[0].view(B, L - 1), out[1].view(B, L - 1)
    return out.view(B, L - 1)


def hf_grpo_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 completion_mask: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                 ref_logp: torch.Tensor | None = None,
                 config: "ops.PolicyLossConfig | None" = None, *,
                 temperature: float | torch.Tensor = 1.0,
                 rollout_logp: torch.Tensor | None = None,
                 global_normalizer: float | None = None, impl: str = "auto"):
    """GRPO loss of an HF causal LM from hidden states.

    ``completion_mask``, ``old_logp``, ``ref_logp``, ``rollout_logp``: ``[B, L-1]`` aligned with
    the next-token targets ``input_ids[:, 1:]``; ``advantages``: ``[B]`` per sequence;
    ``temperature``: one float, ``[B]`` or ``[B, L-1]``. Returns ``(loss, metrics)`` as
    :func:`r1fast.ops.policy_loss`.
    """
    tau = per_token_temperature(temperature, input_ids)
    hidden, weight = hf_hidden_and_head(model, input_ids, attention_mask)
    config = config or ops.PolicyLossConfig()
    return ops.fused_linear_policy_loss(
        hidden[:, :-1], weight, input_ids[:, 1:], old_logp, advantages, completion_mask,
        ref_logp, config, rollout_logp=rollout_logp, temperature=tau,
        global_normalizer=global_normalizer, impl=impl)
