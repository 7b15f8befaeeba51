"""metrics.jsonl, TensorBoard and the progress bar (r1fast.train.metrics)."""
import math

import torch

from r1fast.train.metrics import (MetricsLogger, combine_micro_metrics, read_jsonl,
                                  replica_token_means)


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


def test_micro_batch_metrics_keep_extremes_and_weigh_tokens():
    """ratio_min / ratio_max were averaged over micro-batches (a 3.0 among three 1.0s showed
    as 1.5), an empty micro-batch's neutral 1.0 pulled them toward 1, and a 5-token
    micro-batch weighed as much as a 5000-token one in every mean."""
    stats = {"loss": [0.5, 0.25, 0.0, 0.25], "num_tokens": [5000.0, 10.0, 0.0, 5.0],
             "ratio_max": [3.0, 1.0, 1.0, 1.2], "ratio_min": [0.9, 0.5, 1.0, 0.95],
             "clip_frac": [0.1, 1.0, 0.0, 1.0]}
    out = combine_micro_metrics(stats)
    assert out["loss"] == 1.0  # shares of the global loss: summed
    assert (out["ratio_max"], out["ratio_min"]) == (3.0, 0.5)
    assert math.isclose(out["clip_frac"], (500 + 10 + 5) / 5015)
    # a rank without tokens has no ratio (the extreme over ranks skips it)
    assert combine_micro_metrics({"ratio_max": [1.0], "num_tokens": [0.0]})["ratio_max"] is None


def test_replica_metrics_are_means_over_all_their_tokens():
    """Update metrics were a plain mean of the replicas' token means: a replica that kept no
    tokens (dynamic sampling, the overlong filter) halved clip_frac, kl and entropy at DP 2,
    and uneven token counts weighed a short replica like a long one."""
    keys = ["loss", "clip_frac", "entropy_mean"]
    ranks = [({"loss": 0.25, "clip_frac": 0.5, "entropy_mean": 2.0}, 30.0),
             ({"loss": 0.125, "clip_frac": 0.1, "entropy_mean": 1.0}, 10.0),
             ({"loss": 0.0, "clip_frac": 1.0, "entropy_mean": 1.0}, 0.0)]  # kept nothing

    sent = []  # what each replica puts into the all-reduce
    for local, tokens in ranks:
        replica_token_means(local, keys, tokens, lambda v, k: sent.append(v) or dict(v))
    total = {k: sum(v[k] for v in sent) for k in sent[0]}
    out = replica_token_means(ranks[0][0], keys, ranks[0][1], lambda v, k: dict(total))
    assert out["loss"] == 0.375  # shares of each update's global loss: summed
    assert math.isclose(out["clip_frac"], (15 + 1) / 40)
    assert math.isclose(out["entropy_mean"], (60 + 10) / 40)
    nothing = replica_token_means({}, keys, 0.0, lambda v, k: {n: 0.0 for n in k})
    assert nothing == {"loss": 0.0, "clip_frac": 0.0, "entropy_mean": 0.0}


def test_a_resumed_run_purges_tensorboard_points_after_its_checkpoint(tmp_path):
    """metrics.jsonl is cut back to the checkpoint's step on resume; TensorBoard kept the
    crashed run's later points beside the resumed run's."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    from r1fast.train.metrics import truncate_metrics

    crashed = MetricsLogger(tmp_path, tensorboard=True, progress=False)
    for step in (1, 2, 3):  # the checkpoint was at step 1
        crashed.log(step, {"loss": 10.0 + step})
    crashed.close()
    truncate_metrics(tmp_path / "metrics.jsonl", 1)
    resumed = MetricsLogger(tmp_path, tensorboard=True, progress=False, initial_step=1)
    for step in (2, 3):
        resumed.log(step, {"loss": 20.0 + step})
    resumed.close()
    want = [(1, 11.0), (2, 22.0), (3, 23.0)]
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == want
    events = EventMultiplexer({"run": str(tmp_path / "tensorboard")}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("run", "loss")] == want
