import json
import multiprocessing as mp
import os
import random

import numpy as np
import pytest
import torch

from r1fast.train.checkpoint import (latest_checkpoint, load_checkpoint, rng_state,
                                     save_checkpoint, set_rng_state)


def test_save_load_roundtrip_and_latest(tmp_path):
    state = {"w": torch.randn(3, 4), "nested": {"step": 3, "lst": [1, 2.0]}}
    save_checkpoint(tmp_path, 1, state, {"data_pos": 7})
    save_checkpoint(tmp_path, 2, {"w": torch.ones(2)}, {"data_pos": 9})
    path = latest_checkpoint(tmp_path)
    assert path.name == "step_00000002"
    loaded, meta = load_checkpoint(path)
    assert meta["data_pos"] == 9 and meta["step"] == 2
    assert torch.equal(loaded["w"], torch.ones(2))


def test_keep_last(tmp_path, caplog):
    """Every checkpoint stays unless asked (Megatron-LM's and verl's default: a hard-coded 2
    deleted older ones without a word, helper-78); keep_last=N keeps the newest N and logs each
    deletion."""
    for s in range(3):
        save_checkpoint(tmp_path / "all", s, {"s": s}, {})
    assert len(list((tmp_path / "all").glob("step_*"))) == 3
    with caplog.at_level("INFO", logger="r1fast.train"):
        for s in range(4):
            save_checkpoint(tmp_path, s, {"s": s}, {}, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert "removing checkpoint step_00000001 (keeping the newest 2)" in caplog.text


def _killed_save(root):
    save_checkpoint(root, 1, {"v": torch.zeros(1)}, {"ok": 1})
    # the second save dies after writing everything but before the commit
    save_checkpoint(root, 2, {"v": torch.ones(1)}, {"ok": 2}, _before_commit=lambda: os._exit(9))


def test_kill_during_save_keeps_last_good(tmp_path):
    p = mp.get_context("spawn").Process(target=_killed_save, args=(str(tmp_path),))
    p.start()
    p.join(60)
    assert p.exitcode == 9
    path = latest_checkpoint(tmp_path)
    assert path.name == "step_00000001"
    state, meta = load_checkpoint(path)
    assert meta["ok"] == 1 and torch.equal(state["v"], torch.zeros(1))
    assert (tmp_path / ".tmp_step_00000002").is_dir()
    # a later save (of another step) removes the killed save's folder and commits
    save_checkpoint(tmp_path, 3, {"v": torch.ones(1)}, {"ok": 3})
    assert latest_checkpoint(tmp_path).name == "step_00000003"
    assert not list(tmp_path.glob(".tmp_step_*"))


def test_every_file_and_folder_of_a_checkpoint_is_synced(tmp_path, monkeypatch):
    synced, fsync = set(), os.fsync

    def recording_fsync(fd):
        # entries are synced under the temporary name, before the rename that commits them
        synced.add(os.readlink(f"/proc/self/fd/{fd}").replace("/.tmp_step_", "/step_"))
        fsync(fd)

    def write_shared(folder):  # like megatron's writer: files in a subfolder, never synced
        (folder / "policy").mkdir()
        (folder / "policy" / "common.pt").write_bytes(b"x" * 10)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    final = save_checkpoint(tmp_path, 1, {"v": torch.ones(2)}, {}, write_shared=write_shared)
    entries = {str(p) for p in final.rglob("*")} | {str(final), str(tmp_path)}
    assert entries <= synced, sorted(entries - synced)


def test_rng_state_roundtrip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    st = rng_state()
    save_checkpoint(tmp_path, 0, {"rng": st}, {})
    a = (torch.rand(3), np.random.rand(3), random.random())
    loaded, _ = load_checkpoint(latest_checkpoint(tmp_path))  # weights_only load
    set_rng_state(loaded["rng"])
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_unsafe_pickle_rejected(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    d = tmp_path / "step_00000001"
    d.mkdir()
    torch.save({"x": Evil()}, d / "rank_00000.pt")
    (d / "meta.json").write_text(json.dumps({"world_size": 1, "step": 1}))
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint(d)


def test_a_run_of_another_kind_is_refused_before_anything_is_built(tmp_path):
    """GRPO pointed at an SFT run's folder tried to resume it: it built the model, loaded the
    policy, then died on a missing reference or ``KeyError: 'data'``."""
    from r1fast.train.checkpoint import CheckpointError, resume_point

    save_checkpoint(tmp_path, 3, {"w": torch.ones(2)}, {"sft_data": {"position": 5}})
    with pytest.raises(CheckpointError, match=r"is not a GRPO checkpoint \(its meta.json has no "
                                              r"'data'.*choose another out_dir"):
        resume_point(tmp_path, resume=True, overwrite=False, start_over="x",
                     expect=("data", "GRPO"))
    assert resume_point(tmp_path, resume=True, overwrite=False, start_over="x",
                        expect=("sft_data", "SFT")).name == "step_00000003"


def test_a_resume_does_not_report_the_schedule_length_as_a_change(caplog):
    """Older SFT checkpoints recorded optim.total_steps as the run's steps; the config now keeps
    the default (the engine sets the length): a resume said the config differed."""
    from r1fast.policy.optim import OptimConfig
    from r1fast.train.checkpoint import check_resumed_config
    from r1fast.typed_toml import dump_toml

    with caplog.at_level("WARNING", logger="r1fast.train"):
        check_resumed_config("[optim]\n" + dump_toml(OptimConfig(lr=1e-3, total_steps=100)),
                             "[optim]\n" + dump_toml(OptimConfig(lr=1e-3)), "ckpt", ())
    assert "differs" not in caplog.text
