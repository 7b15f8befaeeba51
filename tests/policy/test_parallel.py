"""Process layout on one rank: init_parallel is idempotent, reports where this rank sits, and
refuses a second, different layout; destroy_parallel tears everything down."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from r1fast.policy import parallel
from r1fast.policy.config import ModelConfig, ParallelConfig


def test_init_info_idempotence_and_destroy():
    info = parallel.init_parallel(ParallelConfig(), ModelConfig.preset("tiny-moe"), seed=3)
    try:
        assert (info.world_size, info.rank, info.tp, info.pp, info.ep, info.dp) == \
            (1, 0, 1, 1, 1, 1)
        assert info.is_first_stage and info.is_last_stage
        assert parallel.init_parallel(ParallelConfig()) == info
        assert parallel.parallel_info() == info
    finally:
        parallel.destroy_parallel()
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"call init_parallel\(\) first"):
        parallel.parallel_info()


def test_layout_is_validated_against_the_world():
    with pytest.raises(ValueError, match=r"world size 1 is not a multiple of tp\*pp = 2\*1"):
        parallel.init_parallel(ParallelConfig(tp=2))
    parallel.destroy_parallel()


def test_a_different_layout_while_one_is_active():
    parallel.init_parallel(ParallelConfig())
    try:
        parallel._LAYOUT = (2, 1, 1)  # as if megatron had been started at tp=2
        with pytest.raises(ValueError, match=r"already initialised with \(tp, pp, ep\) = "
                                             r"\(2, 1, 1\), asked for \(1, 1, 1\)"):
            parallel.init_parallel(ParallelConfig())
    finally:
        parallel.destroy_parallel()


@pytest.mark.parametrize("value", ["ten", "0", "-5", "nan"])
def test_a_bad_collective_timeout_names_the_variable(monkeypatch, value):
    """R1FAST_DIST_TIMEOUT_S sets how long a collective waits (a 671B checkpoint on a slow
    filesystem can keep ranks at a barrier past the 600 s default); bad values are refused."""
    assert parallel.dist_timeout_s() == 600.0
    monkeypatch.setenv("R1FAST_DIST_TIMEOUT_S", "3600")
    assert parallel.dist_timeout_s() == 3600.0
    monkeypatch.setenv("R1FAST_DIST_TIMEOUT_S", value)
    with pytest.raises(ValueError, match=f"R1FAST_DIST_TIMEOUT_S must be a number of seconds "
                                         f"> 0, got '{value}'"):
        parallel.dist_timeout_s()


def test_every_group_waits_as_long_as_the_default_group(monkeypatch):
    """R1FAST_DIST_TIMEOUT_S reached the default group only: megatron's TP / DP / EP groups
    (and their gloo twins) waited its 30-minute default, so a rank that hung in a gradient
    reduce kept the others 30 minutes (helper-74: a DP all-reduce waited 40 s past a 5 s
    setting)."""
    import torch
    from megatron.core import parallel_state as ps

    monkeypatch.setenv("R1FAST_DIST_TIMEOUT_S", "7")
    parallel.init_parallel(ParallelConfig())
    try:
        cpu = torch.device("cpu")
        for group in (ps.get_data_parallel_group(), ps.get_tensor_model_parallel_group(),
                      ps.get_expert_model_parallel_group(), ps.get_data_parallel_group_gloo()):
            assert group._get_backend(cpu).options._timeout.total_seconds() == 7.0
        assert parallel.group_timeout().total_seconds() == 7.0
    finally:
        parallel.destroy_parallel()


def _host_group_worker(rank):
    assert parallel.host_group() is None  # the default group is gloo already: no new group
    parts = [None, None] if rank == 0 else None
    dist.gather_object({"rank": rank}, parts, dst=0, group=parallel.host_group())
    if rank == 0:
        assert parts == [{"rank": 0}, {"rank": 1}]


def test_object_gathers_use_the_host_group(tmp_path):
    """The HF export gathers every rank's tensors as objects; over NCCL that stages them on
    rank 0's GPU, so they take a gloo group (here, under gloo, the default group). The NCCL
    branch (a gloo group made once) needs several GPUs and is not exercised here."""
    from tests.helpers.spawn import run_gloo

    # run_gloo: a barrier and the group's teardown in step (CI: rank 1 left while rank 0 was
    # still in the gather, and gloo aborted it)
    run_gloo(2, str(tmp_path / "store"), _host_group_worker)
