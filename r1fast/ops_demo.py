"""A minute-long GRPO job through r1fast's public ops on the CPU.

The "policy" is one MoE layer (router -> top-k -> permute -> per-expert SwiGLU -> weighted
unpermute) followed by an output head. Each prompt is a random context vector; a completion is
``length`` tokens sampled from the head's softmax at per-position inputs; the rule-based reward
is the fraction of tokens equal to the prompt's hidden target token. GRPO samples ``group``
completions per prompt, turns rewards into group advantages, and updates with the clipped
surrogate + k3 KL computed by :func:`r1fast.ops.fused_linear_policy_loss` straight from hidden
states (no logits are materialised). The reward climbs from chance (1/vocab) towards 1.
"""
from __future__ import annotations

import argparse
import copy
import time
from typing import Sequence

import torch
import torch.nn.functional as F

from r1fast import ops


class TinyMoEHead(torch.nn.Module):
    def __init__(self, hidden: int, vocab: int, experts: int, topk: int, ffn: int, length: int):
        super().__init__()
        self.topk = topk
        self.pos = torch.nn.Parameter(torch.randn(length, hidden) * 0.5)
        self.router = torch.nn.Parameter(torch.randn(experts, hidden) * 0.1)
        self.w_in = torch.nn.Parameter(torch.randn(experts, 2 * ffn, hidden) / hidden**0.5)
        self.w_out = torch.nn.Parameter(torch.randn(experts, hidden, ffn) / ffn**0.5)
        self.head = torch.nn.Parameter(torch.randn(vocab, hidden) / hidden**0.5)

    def hidden(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ctx [N, H] -> per-position hidden states [N*L, H] and the router aux loss."""
        x = (ctx[:, None, :] + self.pos[None]).reshape(-1, ctx.shape[-1])  # [T, H]
        logits = x @ self.router.T  # [T, E]
        route = ops.moe_route(logits, self.topk, score="softmax")
        rows, row_map, counts = ops.moe_permute(x, route.indices, self.router.shape[0])
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):  # each expert's contiguous block of rows
            gate, up = (rows[start:start + n] @ self.w_in[e].T).chunk(2, dim=-1)
            outs.append((F.silu(gate) * up) @ self.w_out[e].T)
            start += n
        y = ops.moe_unpermute(torch.cat(outs), row_map, route.weights)
        aux = ops.moe_aux_loss(logits, route.tokens_per_expert, self.topk, coef=1e-2)
        return x + y, aux


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="r1fast demo", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--length", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=257)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    P, G, L, V = args.prompts, args.group, args.length, args.vocab
    policy = TinyMoEHead(args.hidden, V, experts=8, topk=2, ffn=32, length=L)
    reference = copy.deepcopy(policy).requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-2)
    contexts = torch.randn(P, args.hidden)
    targets_of_prompt = torch.randint(0, V, (P,))
    cfg = ops.PolicyLossConfig(loss="ppo", clip_low=0.2, clip_high=0.28, kl="k3", kl_coef=1e-3,
                               agg="seq-mean-token-mean")
    print(f"r1fast demo: GRPO on a tiny MoE head, {P} prompts x {G} samples x {L} tokens, "
          f"vocab {V} (chance reward {1 / V:.3f})")
    t0 = time.time()
    first = last = None
    for step in range(1, args.steps + 1):
        ctx = contexts.repeat_interleave(G, 0)  # [P*G, H]: groups adjacent
        with torch.no_grad():
            h, _ = policy.hidden(ctx)
            probs = torch.softmax(h @ policy.head.T, -1)  # sampling needs the distribution
            tokens = torch.multinomial(probs, 1)[:, 0]  # [P*G*L]
            want = targets_of_prompt.repeat_interleave(G * L)
            rewards = (tokens == want).float().view(P * G, L).mean(-1)  # [P*G]
            adv = ops.group_advantages(rewards, group_size=G, estimator="grpo")
            old = ops.linear_logprob(h, policy.head, tokens)
            href, _ = reference.hidden(ctx)
            ref = ops.linear_logprob(href, reference.head, tokens)
        h, aux = policy.hidden(ctx)
        mask = torch.ones(P * G, L)
        loss, metrics = ops.fused_linear_policy_loss(
            h.view(P * G, L, -1), policy.head, tokens.view(P * G, L), old.view(P * G, L), adv,
            mask, ref.view(P * G, L), cfg)
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
        r = rewards.mean().item()
        first = r if first is None else first
        last = r
        if step == 1 or step % 5 == 0:
            print(f"step {step:3d}  reward {r:.3f}  loss {loss.item():+.4f}  "
                  f"kl {float(metrics['kl_mean']):.4f}  clip_frac {float(metrics['clip_frac']):.3f}")
    print(f"done in {time.time() - t0:.1f}s: reward {first:.3f} -> {last:.3f}")
    return 0 if last > first else 1


if __name__ == "__main__":
    raise SystemExit(main())
