"""Multi-process helper of the policy and megatron_compat tests: start N gloo ranks as plain
subprocesses (one ``python tests/helpers/dist.py <scenario> <out>`` per rank, torchrun-style
environment, a rendezvous store this process serves), run a scenario in each, and return what each rank saved.
Subprocesses (not multiprocessing.spawn) keep the workers independent of how pytest imports
test modules. Test files import it as ``from tests.helpers import dist``.

Scenarios:
- ``parity``: load a checkpoint at a TP/PP/EP layout (optionally create it first, at world
  size 1), compute log-probs of this DP rank's share of a fixed batch, run one
  ``forward_backward`` + Adam step of the distributed optimizer; gather the full gradients
  before the step and the full weights after it. Saves ``logprobs``, ``grad_norm``,
  ``dp_rank``, ``dp``, ``logp_sum``, and on rank 0 ``grads`` and ``state`` (HF-named full
  tensors).
- ``uneven``: the gloo collective bridges of r1fast.megatron_compat on their own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root


def launch(world_size: int, scenario: str, args: dict[str, Any], timeout: float = 300.0
           ) -> list[dict[str, Any]]:
    """Run ``scenario(args)`` on ``world_size`` ranks; return each rank's saved dict."""
    import torch

    from tests.helpers.spawn import hosted_store

    out = tempfile.mkdtemp(prefix="r1fast_dist_")
    with open(os.path.join(out, "args.json"), "w") as f:
        json.dump(args, f)
    store, rendezvous = hosted_store(world_size)
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   **rendezvous, OMP_NUM_THREADS="1",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   PYTHONWARNINGS="ignore",
                   PYTHONFAULTHANDLER="1")  # a rank killed by a signal logs every stack
        env.setdefault("TRITON_INTERPRET", "1")
        log = open(os.path.join(out, f"rank{rank}.log"), "w")
        procs.append((subprocess.Popen([sys.executable, os.path.abspath(__file__), scenario, out],
                                       env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT),
                      log))
    failed = []
    try:
        for rank, (p, log) in enumerate(procs):
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for q, _ in procs:
                    if q.poll() is None:
                        q.kill()
                rc = "timeout"
            log.close()
            if rc != 0:
                failed.append((rank, rc))
    finally:  # interrupted (pytest-timeout's alarm): no rank is left waiting in a collective
        for q, log in procs:
            if q.poll() is None:
                q.kill()
            log.close()
    del store  # served until every rank has exited
    if failed:
        tails = []
        for rank, rc in failed:
            with open(os.path.join(out, f"rank{rank}.log")) as f:
                tails.append(f"--- rank {rank} (exit {rc}) ---\n" + f.read()[-4000:])
        raise RuntimeError(f"{scenario} failed on {len(failed)} of {world_size} ranks:\n"
                           + "\n".join(tails))
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True)
            for r in range(world_size)]


# ------------------------------------------------------------------------------------------
# Scenarios (run inside the worker processes)
# ------------------------------------------------------------------------------------------

def fixed_batch(vocab: int, batch: int, length: int, seed: int = 1234):
    """Tokens [batch, length] and next-token targets with a few ignored (-100) positions."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, length), generator=g)
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = -100
    targets[0, 2] = -100
    return tokens, targets


def parity(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    from r1fast.ops.linear_logprob import linear_logprob
    from r1fast.policy.config import ModelConfig, ParallelConfig
    from r1fast.policy.hf_checkpoint import (gather_hf_state_dict, load_hf_checkpoint,
                                             load_model_config, save_hf_checkpoint)
    from r1fast.policy.model import build_policy
    from r1fast.policy.optim import OptimConfig, build_optimizer, unshard_main_grads

    ckpt = args["ckpt"]
    layout = ParallelConfig(tp=args["tp"], pp=args["pp"], ep=args["ep"],
                            **args.get("layout", {}))  # e.g. uneven pipeline stage sizes
    if args.get("create"):
        cfg = ModelConfig.from_dict(args["model"])
        maker = build_policy(cfg, layout, seed=args.get("seed", 0), trainable=False)
        with torch.no_grad():  # a sharper random model than the 0.02-std init
            g = torch.Generator().manual_seed(7)
            for name, p in maker.gpt.named_parameters():
                if "layernorm" in name:
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
        save_hf_checkpoint(maker, ckpt)
    cfg = load_model_config(ckpt)
    policy = build_policy(cfg, layout, seed=0)
    load_hf_checkpoint(policy, ckpt)
    # A large Adam epsilon makes the step Lipschitz in the gradient (the first Adam step is
    # otherwise ~lr*sign(g), which amplifies rounding in near-zero gradients).
    opt, _ = build_optimizer(policy, OptimConfig(lr=args["lr"], clip_grad=1e3,
                                                 adam_eps=args.get("adam_eps", 1e-8)))
    tokens, targets = fixed_batch(cfg.vocab_size, args["batch"], args["length"])
    local, local_t = policy.dp_shard(tokens), policy.dp_shard(targets)
    logprobs = policy.logprobs(local, local_t)
    n_valid = float((targets != -100).sum())  # the GLOBAL normaliser

    def loss_fn(hidden, weight, mb):
        h = hidden.reshape(-1, hidden.shape[-1])
        lp = linear_logprob(h, weight, mb["targets"].reshape(-1).to(h.device),
                            tp_group=policy.tp_group)
        return -lp.sum() / n_valid, {"logp_sum": lp.detach().sum()}

    micro = [{"tokens": local[i:i + 1], "targets": local_t[i:i + 1]}
             for i in range(local.shape[0])]
    metrics = policy.forward_backward(micro, loss_fn)
    unshard_main_grads(policy)
    grads = gather_hf_state_dict(policy, grads=True)
    ok, grad_norm, _ = opt.step()
    state = gather_hf_state_dict(policy)
    out = {"logprobs": logprobs, "grad_norm": torch.tensor(float(grad_norm)),
           "ok": torch.tensor(bool(ok)), "dp_rank": torch.tensor(policy.info.dp_rank),
           "dp": torch.tensor(policy.info.dp),
           "logp_sum": torch.stack([m["logp_sum"] for m in metrics]) if metrics
           else torch.zeros(0)}
    if state is not None:
        out["state"], out["grads"] = state, grads
    return out


def uneven(args: dict[str, Any]) -> dict[str, Any]:
    """The gloo bridges of megatron_compat alone: uneven all-gather / reduce-scatter along the
    first dimension and all-to-all with tensor split sizes, against the even-size truth."""
    import torch
    import torch.distributed as dist

    from r1fast.megatron_compat import install
    from r1fast.policy.parallel import init_distributed

    install()
    init_distributed()
    from megatron.core.tensor_parallel import mappings

    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    sizes = [r + 1 for r in range(world)]  # rank r holds r+1 rows
    mine = torch.full((sizes[rank], 3), float(rank + 1)).add_(torch.arange(3.0))
    gathered = mappings._gather_along_first_dim(mine, group, output_split_sizes=sizes)
    full = torch.randn(sum(sizes), 3, generator=torch.Generator().manual_seed(rank))
    scattered = mappings._reduce_scatter_along_first_dim(full, group, input_split_sizes=sizes)
    splits = torch.tensor([1] * world)  # tensor split sizes, as the dispatcher passes on CPU
    a2a = mappings.all_to_all(group, torch.full((world, 2), float(rank)), splits, splits)
    return {"gathered": gathered, "scattered": scattered, "a2a": a2a, "full": full}


SCENARIOS = {"parity": parity, "uneven": uneven}


def _main() -> None:
    import torch

    scenario, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    with open(os.path.join(out, "args.json")) as f:
        args = json.load(f)
    result = SCENARIOS[scenario](args)
    torch.save(result, os.path.join(out, f"rank{os.environ['RANK']}.pt"))
    from r1fast.policy.parallel import destroy_parallel

    destroy_parallel()  # also ends the process group when megatron was not initialised


if __name__ == "__main__":
    _main()
