"""r1fast.atomic: a failed write leaves the old file whole and no temporary behind."""
import pytest

from r1fast.atomic import write_text_atomic


def test_writes_text_and_creates_parents(tmp_path):
    path = write_text_atomic(tmp_path / "a" / "b" / "summary.json", "{\"x\": 1}\n")
    assert path.read_text() == "{\"x\": 1}\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["summary.json"]


def test_a_write_that_fails_midway_keeps_the_old_file(tmp_path):
    path = write_text_atomic(tmp_path / "eval.json", "old")
    # a lone surrogate cannot be encoded: the write fails after the file was opened
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(path, "new" * 1000 + "\ud800")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_replaces_an_existing_file(tmp_path):
    path = write_text_atomic(tmp_path / "config.toml", "a = 1\n")
    write_text_atomic(path, "a = 2\n")
    assert path.read_text() == "a = 2\n"
    assert not path.with_name("config.toml.tmp").exists()
