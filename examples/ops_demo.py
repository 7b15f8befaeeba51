"""GRPO from r1fast's public ops alone: a tiny MoE policy learns a task on the CPU in seconds.

    python examples/ops_demo.py                          # 40 steps, reward from ~1/257 upwards
    python examples/ops_demo.py --steps 60 --vocab 31 --seed 1

What it shows: one GRPO update is a handful of :mod:`r1fast.ops` calls, the same ones the
megatron trainer makes at scale.

- The "policy" is one MoE layer followed by an output head: :func:`~r1fast.ops.moe_route`
  (router softmax -> top-k), :func:`~r1fast.ops.moe_permute` (tokens grouped by expert), a
  SwiGLU per expert, :func:`~r1fast.ops.moe_unpermute` (weighted sum back in token order), and
  :func:`~r1fast.ops.moe_aux_loss` (load balancing).
- A prompt is a random context vector; a completion is ``length`` tokens sampled from the
  head's softmax at per-position inputs. The rule-based reward is the fraction of tokens equal
  to the prompt's hidden target token, so chance is ``1 / vocab`` and the best is 1.
- GRPO samples ``group`` completions per prompt, :func:`~r1fast.ops.group_advantages` turns
  their rewards into advantages within each group, :func:`~r1fast.ops.linear_logprob` gives the
  sampling policy's and the frozen reference's log-probs, and
  :func:`~r1fast.ops.fused_linear_policy_loss` computes the clipped surrogate + k3 KL straight
  from hidden states and the head weight (the ``[tokens, vocab]`` logits are never built).

Every random draw (initial weights, prompts, sampling) comes from one ``torch.Generator``
seeded by ``--seed``, so a run is reproducible; tests/examples/test_ops_demo.py checks that and
that the reward really rises. :func:`train` returns the mean reward of every step.
"""
from __future__ import annotations

import argparse
import copy
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from r1fast import ops


class TinyMoEHead(torch.nn.Module):
    """Per-position input -> one MoE layer (``experts`` SwiGLU experts, top-``topk``) -> head."""

    def __init__(self, hidden: int, vocab: int, experts: int, topk: int, ffn: int, length: int,
                 generator: Optional[torch.Generator] = None):
        super().__init__()

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator)

        self.topk = topk
        self.pos = torch.nn.Parameter(randn(length, hidden) * 0.5)
        self.router = torch.nn.Parameter(randn(experts, hidden) * 0.1)
        self.w_in = torch.nn.Parameter(randn(experts, 2 * ffn, hidden) / hidden**0.5)
        self.w_out = torch.nn.Parameter(randn(experts, hidden, ffn) / ffn**0.5)
        self.head = torch.nn.Parameter(randn(vocab, hidden) / hidden**0.5)

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


def train(steps: int = 40, prompts: int = 8, group: int = 8, length: int = 12, vocab: int = 257,
          hidden: int = 64, seed: int = 0, lr: float = 3e-2,
          log: Optional[Callable[[str], None]] = None) -> list[float]:
    """Run ``steps`` GRPO steps and return each step's mean reward (over ``prompts * group``
    completions). ``log`` receives a progress line every 5 steps."""
    g = torch.Generator().manual_seed(seed)
    P, G, L, V = prompts, group, length, vocab
    policy = TinyMoEHead(hidden, V, experts=8, topk=2, ffn=32, length=L, generator=g)
    reference = copy.deepcopy(policy).requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr)
    contexts = torch.randn(P, hidden, generator=g)
    targets_of_prompt = torch.randint(0, V, (P,), generator=g)
    cfg = ops.PolicyLossConfig(loss="ppo", clip_low=0.2, clip_high=0.28, kl="k3", kl_coef=1e-3,
                               agg="seq-mean-token-mean")
    ctx = contexts.repeat_interleave(G, 0)  # [P*G, H]: a prompt's group is adjacent
    want = targets_of_prompt.repeat_interleave(G * L)  # [P*G*L]
    rewards_per_step = []
    for step in range(1, steps + 1):
        # rollout: sample, score, advantages, and the log-probs the update compares against
        with torch.no_grad():
            h, _ = policy.hidden(ctx)
            probs = torch.softmax(h @ policy.head.T, -1)  # sampling needs the distribution
            tokens = torch.multinomial(probs, 1, generator=g)[:, 0]  # [P*G*L]
            rewards = (tokens == want).float().view(P * G, L).mean(-1)  # [P*G]
            adv = ops.group_advantages(rewards, group_size=G, estimator="grpo")
            old = ops.linear_logprob(h, policy.head, tokens)
            href, _ = reference.hidden(ctx)
            ref = ops.linear_logprob(href, reference.head, tokens)
        # update: clipped surrogate + KL from hidden states, plus the router's balancing loss
        h, aux = policy.hidden(ctx)
        mask = torch.ones(P * G, L)
        loss, metrics = ops.fused_linear_policy_loss(
            h.view(P * G, L, -1), policy.head, tokens.view(P * G, L), old.view(P * G, L), adv,
            mask, ref.view(P * G, L), cfg)
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
        rewards_per_step.append(rewards.mean().item())
        if log is not None and (step == 1 or step % 5 == 0):
            log(f"step {step:3d}  reward {rewards_per_step[-1]:.3f}  loss {loss.item():+.4f}  "
                f"kl {float(metrics['kl_mean']):.4f}  clip_frac {float(metrics['clip_frac']):.3f}")
    return rewards_per_step


def main(argv: Sequence[str] | None = None) -> int:
    """Train and print progress; exit status 0 when the last quarter of the steps earned more
    reward on average than the first quarter."""
    ap = argparse.ArgumentParser(prog="examples/ops_demo.py", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8, help="completions per prompt")
    ap.add_argument("--length", type=int, default=12, help="tokens per completion")
    ap.add_argument("--vocab", type=int, default=257)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"GRPO on a tiny MoE head, {args.prompts} prompts x {args.group} samples x "
          f"{args.length} tokens, vocab {args.vocab} (chance reward {1 / args.vocab:.3f})")
    t0 = time.time()
    rewards = train(args.steps, args.prompts, args.group, args.length, args.vocab, args.hidden,
                    args.seed, log=print)
    k = max(1, len(rewards) // 4)
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    print(f"done in {time.time() - t0:.1f}s: mean reward of the first {k} steps {first:.3f}, "
          f"of the last {k} {last:.3f}")
    return 0 if last > first else 1


if __name__ == "__main__":
    raise SystemExit(main())
