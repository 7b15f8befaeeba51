"""bench/bench_mla_prefill.py at a tiny shape: both forms timed, each within fp32 rounding of
the bench's own fp64 attention, and the multiply-add counts it reports favour expanding."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from bench_mla_prefill import main  # noqa: E402


def test_both_forms_are_timed_and_exact():
    rows = main(["--B", "2", "--P", "24", "--heads", "2", "--reps", "1", "--no-save"])
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"absorbed", "expanded"}
    for r in rows:
        assert r["ms"] > 0 and r["max_abs_err"] < 1e-5, r
    assert by["expanded"]["gmacs"] < by["absorbed"]["gmacs"]
