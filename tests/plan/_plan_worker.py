"""torchrun worker for tests/plan/test_plan.py: build the tiny DeepSeek-V3-like policy at several
TP/PP/EP layouts on 4 gloo processes and record, per rank, what it really holds (local
parameter counts split dense/expert, and at PP1 the bytes autograd saves for one training
micro-batch), so the test can compare each rank with the planner.

    python -m torch.distributed.run --nproc-per-node 4 tests/plan/_plan_worker.py OUT.json
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from r1fast.ops.linear_logprob import linear_logprob
from r1fast.plan import measure_saved_bytes
from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.model import build_policy
from r1fast.policy.parallel import destroy_parallel

LAYOUTS = [(2, 1, 2), (1, 2, 2), (2, 2, 1)]  # (tp, pp, ep) on 4 ranks
BATCH, LENGTH = 2, 24


def model() -> ModelConfig:
    # layer 0 dense, layer 1 MoE with a shared expert: every parameter kind is present
    return ModelConfig.preset("tiny-dsv3").replace(dense_layers=(0,))


def measure(tp: int, pp: int, ep: int) -> dict:
    m = model()
    policy = build_policy(m, ParallelConfig(tp=tp, pp=pp, ep=ep), seed=0, trainable=True)
    dense = expert = 0
    for _, p in policy.gpt.named_parameters():
        if getattr(p, "allreduce", True):
            dense += p.numel()
        else:
            expert += p.numel()
    row = {"layout": [tp, pp, ep], "rank": dist.get_rank(), "pp_rank": policy.info.pp_rank,
           "dense": dense, "expert": expert, "saved": None}
    if pp == 1:
        g = torch.Generator().manual_seed(0)  # every rank the same tokens (one DP replica each)
        tokens = torch.randint(0, m.vocab_size, (BATCH, LENGTH), generator=g)

        def loss_fn(hidden, weight, mb):
            b, length, h = hidden.shape
            logp = linear_logprob(hidden.reshape(b * length, h), weight,
                                  mb["tokens"].reshape(-1), tp_group=policy.tp_group,
                                  impl="torch")
            return -logp.mean(), {}

        _, saved = measure_saved_bytes(
            lambda: policy.forward_backward([{"tokens": tokens}], loss_fn),
            exclude=list(policy.gpt.parameters()))
        row["saved"] = saved
    destroy_parallel(destroy_process_group=False)
    return row


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rows = []
    for layout in LAYOUTS:
        row = measure(*layout)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, row)
        rows.extend(gathered)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
