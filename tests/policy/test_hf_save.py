"""Writing an HF folder from several ranks (r1fast.policy.hf_save): each owner writes its own
shards, and the folder holds exactly the tensors one rank would have gathered."""
import json
import os

import pytest
import torch

pytestmark = pytest.mark.multiproc


def _save_worker(rank, out, layout):
    import torch.distributed as dist
    from safetensors.torch import load_file

    from r1fast.policy import build_policy
    from r1fast.policy.config import ParallelConfig
    from r1fast.policy.hf_checkpoint import INDEX, SAFETENSORS, gather_hf_state_dict
    from r1fast.policy.hf_save import write_hf_folder
    from tests.helpers.reward_world import MODEL

    policy = build_policy(MODEL, ParallelConfig(world_size=dist.get_world_size(), **layout),
                          seed=3, trainable=False)
    whole = gather_hf_state_dict(policy)  # rank 0: every tensor, the reference
    wrote = {}
    for name, shard_bytes in (("sharded", 48 * 1024), ("small", 1 << 30)):
        wrote[name] = write_hf_folder(policy, os.path.join(out, name),
                                      max_shard_bytes=shard_bytes)
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, wrote)
    if rank != 0:
        return
    assert all(w["sharded"] for w in seen), seen  # both ranks own tensors and wrote them
    assert seen[0]["small"] == [SAFETENSORS] and seen[1]["small"] == []
    with open(os.path.join(out, "sharded", INDEX)) as f:
        index = json.load(f)
    files = sorted({f for w in seen for f in w["sharded"]})
    assert sorted(set(index["weight_map"].values())) == files
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in whole.values())
    for name, names in (("sharded", files), ("small", [SAFETENSORS])):
        got = {}
        for f in names:
            part = load_file(os.path.join(out, name, f))
            assert not set(part) & set(got)  # each tensor once
            got.update(part)
        assert set(got) == set(whole), name
        for k, v in whole.items():
            assert torch.equal(got[k], v), (name, k)


@pytest.mark.parametrize("layout", [{"ep": 2}, {"pp": 2}], ids=["dp2-ep2", "pp2"])
def test_each_owner_writes_its_shards(tmp_path, layout):
    """An export used to send every tensor to rank 0 (DeepSeek-V3: 1.3 TB in one process).
    Under EP the second rank owns half the experts, under PP the second stage's layers: each
    writes them; rank 0 writes the index over all files."""
    from tests.helpers.spawn import run_gloo

    run_gloo(2, str(tmp_path / "store"), _save_worker, str(tmp_path), layout)


def _failure_worker(rank, out):
    import torch.distributed as dist

    from r1fast.policy import build_policy, hf_save
    from r1fast.policy.config import ParallelConfig
    from tests.helpers.reward_world import MODEL

    policy = build_policy(MODEL, ParallelConfig(world_size=dist.get_world_size(), ep=2),
                          seed=3, trainable=False)
    # a node-local path: each node's disk gets its own folder, rank 1 never sees rank 0's
    with pytest.raises(RuntimeError, match=r"rank 1 failed \(FileNotFoundError: .* must be on "
                                           r"a file system all nodes share\)"):
        hf_save.write_hf_folder(policy, os.path.join(out, f"local{rank}"),
                                max_shard_bytes=48 * 1024)
    # one rank's disk is full: both ranks raise, neither waits for the other
    if rank == 1:
        def full(*_):
            raise OSError(28, "No space left on device")
        hf_save._write = full
    with pytest.raises(RuntimeError, match=r"rank 1 failed \(OSError: \[Errno 28\] No space"):
        hf_save.write_hf_folder(policy, os.path.join(out, "full"), max_shard_bytes=48 * 1024)


def test_a_failure_on_one_rank_raises_on_every_rank(tmp_path):
    """A rank whose write failed used to raise alone while the others waited at the final
    barrier (until the collective timeout); rank 0 made the folder on its own node only."""
    from tests.helpers.spawn import run_gloo

    run_gloo(2, str(tmp_path / "store"), _failure_worker, str(tmp_path))
