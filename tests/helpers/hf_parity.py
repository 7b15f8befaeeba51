"""Comparing the policy with a ``transformers`` model of the same checkpoint: log-probs and
every parameter's gradient, export -> reload (shared by the Qwen and DeepSeek checkpoint tests)."""
import torch

from r1fast.ops.linear_logprob import linear_logprob
from r1fast.policy.config import ParallelConfig
from r1fast.policy.hf_checkpoint import gather_hf_state_dict, load_hf_checkpoint, load_model_config
from r1fast.policy.model import build_policy


def hf_logprobs(model, tokens, targets, position_ids=None):
    """log p(targets) [B, L] in fp64 from a transformers causal LM (0 where targets are -100)."""
    logits = model(tokens, position_ids=position_ids).logits.float()
    lp = torch.log_softmax(logits.double(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return torch.where(targets == -100, 0.0, lp)


def per_expert(named: dict) -> dict:
    """transformers 5 keeps the experts of a layer as fused 3-D parameters (``experts.
    gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]) and writes per-expert keys on
    save; map fused names to the per-expert checkpoint names."""
    out = {}
    for k, v in named.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            base = k[: -len("gate_up_proj")]
            for e in range(v.shape[0]):
                gate, up = v[e].chunk(2, dim=0)
                out[f"{base}{e}.gate_proj.weight"] = gate
                out[f"{base}{e}.up_proj.weight"] = up
        elif k.endswith("mlp.experts.down_proj"):
            base = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = v[e]
        else:
            out[k] = v
    return out


def load(path, trainable=False):
    """The policy of checkpoint folder ``path`` at one rank."""
    policy = build_policy(load_model_config(path), ParallelConfig(), trainable=trainable)
    load_hf_checkpoint(policy, path)
    return policy


def summed_logprob_loss(policy, n: float):
    """megatron's loss_fn of -(sum of the targets' log-probs) / n, through the fused
    vocab-parallel head (the policy's TP group)."""
    def loss_fn(hidden, weight, mb):
        lp = linear_logprob(hidden.reshape(-1, hidden.shape[-1]), weight,
                            mb["targets"].reshape(-1), tp_group=policy.tp_group)
        return -lp.sum() / n, {}

    return loss_fn


def check_gradients_match_hf(model, path, tokens, targets, atol=1e-5) -> None:
    """Every parameter's gradient of a summed log-prob loss, policy (megatron DDP main_grad,
    exported to HF names) vs transformers' autograd."""
    policy = load(path, trainable=True)
    n = float((targets != -100).sum())
    model.zero_grad()
    (-hf_logprobs(model, tokens, targets).sum() / n).float().backward()
    ref = per_expert({k: p.grad for k, p in model.named_parameters() if p.grad is not None})

    policy.forward_backward([{"tokens": tokens, "targets": targets}],
                            summed_logprob_loss(policy, n))
    mine = gather_hf_state_dict(policy, grads=True)
    assert set(mine) == set(ref)
    for k in ref:
        assert (mine[k] - ref[k]).abs().max().item() < atol, k


def next_token_batch(vocab: int, seed: int = 1, b: int = 3, length: int = 13):
    """Random ``tokens`` [b, length] and their next tokens as ``targets`` (-100 at the end)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, length), generator=g)
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = -100
    return tokens, targets


def check_export_reloads_exactly(policy, model, model_cls, out: str, model_type: str) -> None:
    """``save_hf_checkpoint(policy, out)`` writes ``model_type``, and transformers' ``model_cls``
    reloads every tensor of ``model`` (the checkpoint the policy came from) bit for bit."""
    import json
    import os

    from r1fast.policy.hf_checkpoint import save_hf_checkpoint

    save_hf_checkpoint(policy, out)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model_type"] == model_type
    reloaded = model_cls.from_pretrained(out).float()
    ref, got = model.state_dict(), reloaded.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
