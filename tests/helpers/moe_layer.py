"""One MoE layer of a built policy, run forward and backward on fixed data (dispatcher and expert
tests compare such runs across implementations)."""
from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def first_moe_layer(policy):
    layer = next(l.mlp for l in policy.gpt.decoder.layers if hasattr(l.mlp, "token_dispatcher"))
    for p in layer.parameters():
        p.requires_grad_(True)
    return layer


def layer_inputs(layer, dtype=torch.float32):
    """``(x, upstream)``: fixed ``[S, B, H]`` input and output gradient on the device (made
    apart from the run, so a run can be watched for host syncs without their copies)."""
    H = layer.config.hidden_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 3, H, generator=g).to(DEVICE, dtype)
    return x, torch.randn(37, 3, H, generator=g).to(DEVICE, dtype)


def layer_forward_backward(layer, dispatcher_class=None, dtype=torch.float32, inputs=None):
    """One MoE layer's output, input gradient and parameter gradients on fixed data
    (``inputs``: :func:`layer_inputs`, made here when None)."""
    if dispatcher_class is not None:
        layer.token_dispatcher.__class__ = dispatcher_class
    x, upstream = inputs if inputs is not None else layer_inputs(layer, dtype)
    x = x.detach().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out, _ = layer(x)
    out.backward(upstream)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads
