"""Hostile checkpoint folders: a damaged ``latest`` pointer, tampered or truncated rank files,
broken ``meta.json``, non-finite states. None may hide or delete a committed checkpoint, and no
non-finite tensor may be written."""
import json
import logging
import os

import pytest
import torch

from r1fast.train.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint,
                                     save_checkpoint)
from r1fast.train.run_folder import has_run_files

pytestmark = pytest.mark.reliability


def _two_checkpoints(root):
    save_checkpoint(root, 1, {"w": torch.zeros(4)}, {"data": 1})
    save_checkpoint(root, 2, {"w": torch.ones(4)}, {"data": 2})
    return root / "step_00000002"


@pytest.mark.parametrize("pointer", [
    "step_00000009",            # names a folder that does not exist
    "",                         # empty
    "../..",                    # outside the checkpoint folder
    "/etc",                     # absolute path
    "step_00000003",            # a step folder without meta.json (created below)
    "\x00\xff garbage",         # not a name at all
    None,                       # the pointer file is missing
    "dir",                      # the pointer is a directory
])
def test_damaged_pointer_finds_newest_complete_checkpoint(tmp_path, caplog, pointer):
    newest = _two_checkpoints(tmp_path)
    (tmp_path / "step_00000003").mkdir()  # torn: no meta.json, no rank file
    (tmp_path / "latest").unlink()
    if pointer == "dir":
        (tmp_path / "latest").mkdir()
    elif pointer is not None:
        (tmp_path / "latest").write_bytes(pointer.encode("utf-8", "surrogateescape"))
    with caplog.at_level(logging.WARNING, logger="r1fast.train"):
        found = latest_checkpoint(tmp_path)
    assert found == newest
    assert any("newest complete checkpoint" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    state, meta = load_checkpoint(found)
    assert meta["data"] == 2 and torch.equal(state["w"], torch.ones(4))


def test_step_without_rank_file_is_not_complete(tmp_path, caplog):
    _two_checkpoints(tmp_path)
    os.remove(tmp_path / "step_00000002" / "rank_00000.pt")
    with caplog.at_level(logging.WARNING, logger="r1fast.train"):
        assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert "misses a rank file" in caplog.text


def test_intact_pointer_is_quiet(tmp_path, caplog):
    newest = _two_checkpoints(tmp_path)
    with caplog.at_level(logging.WARNING, logger="r1fast.train"):
        assert latest_checkpoint(tmp_path) == newest
    assert not caplog.records
    assert latest_checkpoint(tmp_path / "nothing_here") is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "append", "swap", "empty"])
def test_tampered_rank_file_is_an_error_naming_it(tmp_path, damage):
    path = _two_checkpoints(tmp_path)
    f = path / "rank_00000.pt"
    data = bytearray(f.read_bytes())
    if damage == "flip":  # 40 flipped bytes in the middle of the tensor data
        mid = len(data) // 2
        for i in range(mid, mid + 40):
            data[i] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "append":
        data += b"\0" * 16
    elif damage == "swap":  # a rank file of another (valid) checkpoint
        data = bytearray((tmp_path / "step_00000001" / "rank_00000.pt").read_bytes())
    else:
        data = bytearray()
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="rank_00000.pt"):
        load_checkpoint(path)


def _write_policy(folder):
    (folder / "policy").mkdir()
    for i in range(3):
        torch.save(torch.full((64,), float(i)), folder / "policy" / f"__{i}_0.distcp")


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_tampered_shared_file_is_an_error_naming_it(tmp_path, damage, caplog):
    """The distributed model/optimizer files (policy/) are verified like rank files."""
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(4)}, {"data": 1}, write_shared=_write_policy)
    path = save_checkpoint(tmp_path, 2, {"w": torch.ones(4)}, {"data": 2},
                           write_shared=_write_policy)
    assert "policy/__1_0.distcp" in json.loads((path / "meta.json").read_text())["files"]
    f = path / "policy" / "__1_0.distcp"
    if damage == "missing":
        f.unlink()
        with caplog.at_level(logging.WARNING, logger="r1fast.train"):
            assert latest_checkpoint(tmp_path).name == "step_00000001"
        with pytest.raises(CheckpointError, match=r"__1_0.distcp is missing"):
            load_checkpoint(path)
        return
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[:-8]
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"policy/__1_0.distcp is damaged"):
        load_checkpoint(path)


@pytest.mark.parametrize("meta", ["", "{", "[]", '{"step": 2}', '{"world_size": "x"}'])
def test_broken_meta_json_is_an_error_naming_it(tmp_path, meta):
    path = _two_checkpoints(tmp_path)
    (path / "meta.json").write_text(meta)
    with pytest.raises(CheckpointError, match="meta.json"):
        load_checkpoint(path)
    # and it is not taken for a committed checkpoint
    assert latest_checkpoint(tmp_path).name == "step_00000001"


def _edit_data(m):
    m["data"] = 3  # resume on other prompts


def _edit_step(m):
    m["step"] = 7


def _edit_checksum(m):  # the rank file's record replaced by another checkpoint's
    m["files"]["rank_00000.pt"] = json.loads(
        (m.pop("_root") / "step_00000001" / "meta.json").read_text())["files"]["rank_00000.pt"]


def _edit_drop_checksums(m):
    del m["files"]


@pytest.mark.parametrize("edit", [_edit_data, _edit_step, _edit_checksum, _edit_drop_checksums],
                         ids=["data", "step", "checksum", "no_checksums"])
def test_edited_meta_json_is_an_error_naming_it(tmp_path, edit, caplog):
    """meta.json carries its own sha256: a value changed in place (still valid JSON, so the
    parse checks pass) is an error naming meta.json, never a resume at another data position,
    step or with another file's checksum; and such a folder is not the newest complete one."""
    path = _two_checkpoints(tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    meta["_root"] = tmp_path
    edit(meta)
    meta.pop("_root", None)
    (path / "meta.json").write_text(json.dumps(meta, indent=1))
    with pytest.raises(CheckpointError, match=r"step_00000002/meta.json is damaged"):
        load_checkpoint(path)
    with caplog.at_level(logging.WARNING, logger="r1fast.train"):
        assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert "newest complete checkpoint" in caplog.text


def test_meta_records_checksums_of_every_rank_file(tmp_path):
    path = _two_checkpoints(tmp_path)
    files = json.loads((path / "meta.json").read_text())["files"]
    assert set(files) == {"rank_00000.pt"}
    assert len(files["rank_00000.pt"]["sha256"]) == 64


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_state_is_never_written(tmp_path, bad):
    _two_checkpoints(tmp_path)
    state = {"model": {"layer.weight": torch.tensor([1.0, bad])}, "step": torch.tensor(3)}
    with pytest.raises(FloatingPointError, match="model.layer.weight"):
        save_checkpoint(tmp_path, 3, state, {})
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    assert not (tmp_path / "step_00000003").exists()
    assert not (tmp_path / ".tmp_step_00000003").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_shared_tensors_are_never_written(tmp_path, bad):
    """The distributed model/optimizer state is checked before any rank writes anything."""
    _two_checkpoints(tmp_path)
    calls = []
    shared = {"optimizer": [{"0": {"exp_avg": torch.tensor([0.0, bad])}}]}
    with pytest.raises(FloatingPointError, match=r"optimizer\[0\]\.0\.exp_avg"):
        save_checkpoint(tmp_path, 3, {"rng": torch.zeros(2)}, {}, shared_tensors=shared,
                        write_shared=calls.append)
    assert calls == [] and latest_checkpoint(tmp_path).name == "step_00000002"
    assert not (tmp_path / ".tmp_step_00000003").exists()


def test_keep_last_never_deletes_later_steps(tmp_path):
    for s in (4, 5):
        save_checkpoint(tmp_path, s, {"s": torch.tensor(s)}, {})
    # a save of an earlier step (a restart) keeps every later checkpoint
    save_checkpoint(tmp_path, 1, {"s": torch.tensor(1)}, {}, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [
        "step_00000001", "step_00000004", "step_00000005"]


def test_has_run_files(tmp_path):
    assert has_run_files(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text("")
    assert has_run_files(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "checkpoints" / "step_00000001").mkdir(parents=True)
    assert has_run_files(tmp_path) == ["checkpoints/step_00000001", "metrics.jsonl"]
    # a GRPO run's step-0 evaluation comes before its first checkpoint and metrics row: a
    # start after a first attempt that died in step 1 took that row as its own baseline
    (tmp_path / "eval.jsonl").write_text('{"step": 0}\n')
    assert has_run_files(tmp_path)[-1] == "eval.jsonl"
    # an SFT run neither writes nor sets one aside: it is no file of its kind (helper-75)
    assert "eval.jsonl" not in has_run_files(tmp_path, ("metrics.jsonl",))


def test_meta_json_without_its_seal_loads_with_a_warning_naming_it(tmp_path, caplog):
    """A checkpoint written before meta.json carried its own sha256 still loads (its other
    files are verified against it), but never silently: a WARNING names its meta.json as not
    verified. A sealed one loads without that WARNING."""
    path = _two_checkpoints(tmp_path)
    with caplog.at_level(logging.WARNING, logger="r1fast.train"):
        load_checkpoint(path)
    assert "not verified" not in caplog.text
    meta = json.loads((path / "meta.json").read_text())
    del meta["meta_sha256"]
    (path / "meta.json").write_text(json.dumps(meta, indent=1))
    with caplog.at_level(logging.WARNING, logger="r1fast.train"):
        state, got = load_checkpoint(path)
    assert torch.equal(state["w"], torch.ones(4)) and got["data"] == 2
    assert f"checkpoint file {path / 'meta.json'} is not verified" in caplog.text
    assert "meta_sha256" in caplog.text
    with open(path / "rank_00000.pt", "ab") as f:  # the rank file is still checked
        f.write(b"\0")
    with pytest.raises(CheckpointError, match="rank_00000.pt is damaged"):
        load_checkpoint(path)


def _fresh_start_worker(rank, run_dir):
    import time

    import torch.distributed as dist

    from r1fast.train.run_folder import start_fresh

    if rank == 1:
        time.sleep(1.0)  # looks at the folder after rank 0 has moved its files aside
    start_fresh(run_dir, ("metrics.jsonl", "eval.jsonl"), overwrite=True, resume=False,
                what="run", resume_off="run.resume=false", overwrite_on="--run.overwrite=true")
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)  # the next collective still pairs up
    assert t.item() == 3.0


@pytest.mark.multiproc
def test_a_fresh_start_over_a_run_decides_once_for_every_rank(tmp_path):
    """Each rank looked at the folder itself: one that looked after rank 0 had moved the old
    files aside saw none, skipped the barrier rank 0 waited in, and the run hung at its next
    collective (helper-74, with the plain CLI under torchrun). Rank 0's view now holds for all."""
    from tests.helpers.spawn import run_gloo

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    run_gloo(2, str(tmp_path / "store"), _fresh_start_worker, str(run))
    assert not (run / "metrics.jsonl").exists()
    (aside,) = run.glob("previous_*")
    assert (aside / "metrics.jsonl").is_file()


def _shared_folder_worker(rank, root):
    from r1fast.train import run_folder
    from r1fast.train.run_folder import SHARED_MARKER, check_shared_folder

    run_folder.SHARED_WAIT_S = 0.5  # the blind rank's retries (5 s on a real file system)

    shared = os.path.join(root, "shared")
    check_shared_folder(shared, "run.out_dir")  # one folder for both: passes
    assert rank != 0 or not os.path.exists(os.path.join(shared, SHARED_MARKER))  # removed
    local = os.path.join(root, f"node{rank}")  # as a node-local path is on each node
    with pytest.raises(ValueError, match=r"run.out_dir=.*node\d is not one folder for every "
                                         r"process: rank\(s\) \[1\] do not see the file rank 0 "
                                         r"wrote there; .* a file system all nodes share"):
        check_shared_folder(local, "run.out_dir")


@pytest.mark.multiproc
def test_a_run_folder_that_is_not_shared_is_refused_at_the_start(tmp_path):
    """A run.out_dir on node-local disks ran the whole interval up to the first checkpoint,
    then failed with a bare FileNotFoundError on one rank and 'Connection closed' on the
    others (helper-74). Every rank now checks that it sees rank 0's file there, at the start."""
    from tests.helpers.spawn import run_gloo

    (tmp_path / "shared").mkdir()
    run_gloo(2, str(tmp_path / "store"), _shared_folder_worker, str(tmp_path))


def _resume_worker(rank, root):
    import logging

    import torch.distributed as dist

    from r1fast.train import checkpoint

    from pathlib import Path

    # rank 1's node: its file-system cache still shows the previous latest
    seen = Path(root) / ("step_00000002" if rank == 0 else "step_00000001")
    checkpoint.latest_checkpoint = lambda _root: seen
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("r1fast.train").addHandler(handler)
    path = checkpoint.resume_point(root, resume=True, overwrite=False, start_over="-")
    assert path == Path(root) / "step_00000002", (rank, path)
    said = " ".join(r.getMessage() for r in records)
    if rank == 0:
        assert "rank(s) [1] saw another latest checkpoint" in said and \
            "every rank resumes rank 0's" in said, said
    assert checkpoint.resume_point(root, resume=False, overwrite=False, start_over="-") is None
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)  # the collectives still pair up
    assert t.item() == 3.0


@pytest.mark.multiproc
def test_every_rank_resumes_rank_zeros_checkpoint(tmp_path):
    """Each rank found the latest checkpoint itself: a rank whose file-system cache showed the
    previous one resumed step 1 while rank 0 resumed step 2, and both trained on without an
    error until the next save (helper-78). Every rank now takes rank 0's."""
    from tests.helpers.spawn import run_gloo

    run_gloo(2, str(tmp_path / "store"), _resume_worker, str(tmp_path / "checkpoints"))
