"""metrics.jsonl, TensorBoard and the progress bar (r1fast.train.metrics)."""
import math

import torch

from r1fast.train.metrics import MetricsLogger, read_jsonl


def test_rows_are_written_and_read_back(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=True, progress=False, total_steps=2)
    row = log.log(1, {"loss": torch.tensor(0.5), "reward_mean": 1, "nan": float("nan")})
    log.log(2, {"loss": 0.25})
    log.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == 0.5 and isinstance(row["reward_mean"], float)
    assert math.isnan(rows[0]["nan"])  # logged, but kept out of TensorBoard
    assert any((tmp_path / "tensorboard").iterdir())


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "x", enabled=False)
    assert log.log(1, {"loss": 1.0})["loss"] == 1.0
    log.close()
    assert not (tmp_path / "x").exists()


def test_read_jsonl_skips_blank_lines(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(tmp_path / "a.jsonl") == [{"a": 1}, {"a": 2}]
