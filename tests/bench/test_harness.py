"""The benchmark harness's own promises (bench/harness.py): gradients are checked against fp64
under the same upstream gradient every provider gets, and a peer that raises leaves a row that
says so while an r1fast provider that raises stops the run."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from harness import Provider, reference_grads, run_case  # noqa: E402


def _inputs():
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(7, 5, generator=g).requires_grad_(),
            "w": torch.randn(5, 3, generator=g).requires_grad_()}


def _f(x, w):
    return torch.tanh(x @ w)


def _wrong_grad(x, w):  # the right value, a wrong gradient for w
    return torch.tanh(x @ w.detach()) + 0.0 * w.sum()


def test_gradients_are_compared_with_fp64():
    inputs = _inputs()
    grads = reference_grads(_f, inputs)
    assert all(g.dtype == torch.float64 for g in grads.values())
    rows = run_case("f", {}, inputs, [Provider("right", _f), Provider("wrong", _wrong_grad)],
                    modes=["full"], grad_reference=grads, reps=1, warmup=0,
                    measure_memory=False)
    err = {r["provider"]: r["max_grad_rel_err"] for r in rows}
    assert err["right"]["x"] < 1e-6 and err["right"]["w"] < 1e-6
    assert err["wrong"]["x"] < 1e-6 and err["wrong"]["w"] == pytest.approx(1.0)


def _broken(x, w):
    raise RuntimeError("an API that moved on\nsecond line")


def test_a_failing_peer_is_a_row_and_a_failing_r1fast_provider_stops_the_run():
    rows = run_case("f", {}, _inputs(), [Provider("peer", _broken, peer=True),
                                         Provider("ours", _f)],
                    modes=["forward"], reps=1, warmup=0, measure_memory=False)
    assert rows[0]["skipped"] == "the peer failed: RuntimeError: an API that moved on"
    assert rows[1]["provider"] == "ours" and rows[1]["ms"] > 0
    with pytest.raises(RuntimeError, match="an API that moved on"):
        run_case("f", {}, _inputs(), [Provider("ours", _broken)], modes=["forward"], reps=1,
                 warmup=0, measure_memory=False)


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward moved on")


def _forward_only(x, w):
    return _NoBackward.apply(torch.tanh(x @ w))


def test_a_peer_failing_in_a_later_mode_keeps_the_rows_it_finished():
    rows = run_case("f", {}, _inputs(), [Provider("peer", _forward_only, peer=True)],
                    modes=["forward", "backward"], reps=1, warmup=0, measure_memory=False)
    assert [(r.get("mode"), "ms" in r) for r in rows] == [("forward", True), (None, False)]
    assert rows[1]["skipped"] == "the peer failed: RuntimeError: backward moved on"


def test_compiled_at_first_call_compiles_once_and_only_when_called(monkeypatch):
    import harness

    made = []
    monkeypatch.setattr(harness.torch, "compile", lambda fn: made.append(fn) or fn)
    wrapped = harness.compiled_at_first_call(_f)
    assert made == []  # a skipped provider costs nothing
    x, w = _inputs().values()
    torch.testing.assert_close(wrapped(x, w), _f(x, w))
    wrapped(x, w)
    assert made == [_f]


def test_device_events_are_counted_by_kind():
    """The launch count a target like "one launch each way" is read from: kernels, memsets
    and copies to the host counted apart, CPU events ignored (made-up CUPTI-named events)."""
    from types import SimpleNamespace

    from harness import summarize_device_events
    from torch.autograd import DeviceType

    def ev(name, dev=DeviceType.CUDA):
        return SimpleNamespace(name=name, device_type=dev)

    events = [ev("aten::topk", DeviceType.CPU), ev("_route_fwd_kernel"),
              ev("Memset (Device)"), ev("Memcpy DtoH (Device -> Pinned)"),
              ev("Memcpy HtoD (Pageable -> Device)"), ev("_route_fwd_kernel"),
              ev("void at::native::vectorized_elementwise_kernel<4>" + "x" * 200)]
    got = summarize_device_events(events)
    assert (got["launches"], got["memsets"], got["copies_to_host"]) == (3, 1, 1)
    assert got["kernels"]["_route_fwd_kernel"] == 2
    assert max(len(k) for k in got["kernels"]) == 100  # long template names are cut
    assert summarize_device_events([ev("aten::mm", DeviceType.CPU)])["launches"] == 0


def test_rows_count_launches_on_cuda_only():
    """Off CUDA there is nothing to profile: the rows carry no launch fields at all (not a
    zero that would read as "no launch")."""
    rows = run_case("f", {"n": 7}, _inputs(), [Provider("ours", _f)], modes=("forward",),
                    reps=1, warmup=0, measure_memory=False)
    assert rows and not any(k in rows[0] for k in ("launches", "memsets", "launches_error"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_activity_counts_what_reaches_the_gpu():
    """On a GPU (run by `make gpu-check`): one in-place multiply is one kernel and no copy to
    the host; reading a sum back is a kernel plus one copy to the host (a host sync)."""
    from harness import device_activity

    dev = torch.device("cuda")
    a = torch.randn(4096, device=dev)
    a.mul_(2).sum().item()  # warm: the kernels are loaded before the counted calls
    one = device_activity(lambda: a.mul_(2), dev)
    assert (one["launches"], one["copies_to_host"]) == (1, 0), one
    read = device_activity(lambda: a.sum().item(), dev)
    assert read["launches"] >= 1 and read["copies_to_host"] == 1, read


def test_a_provider_doing_other_work_reports_its_own_rate():
    """Provider.flops overrides the case's FLOPs (an arrangement that skips a GEMM): its
    TFLOP/s is its own rate, and a mode it does not list gets none."""
    rows = run_case("f", {"n": 7}, _inputs(),
                    [Provider("ours", _f), Provider("lighter", _f, flops={"full": 3.0})],
                    modes=("forward", "full"), reps=1, warmup=0, measure_memory=False,
                    flops={"forward": 1.0, "full": 4.0})
    rate = {(r["provider"], r["mode"]): r.get("tflops") for r in rows}
    ms = {(r["provider"], r["mode"]): r["ms"] for r in rows}
    assert rate[("ours", "full")] == pytest.approx(4.0 / (ms[("ours", "full")] * 1e-3) / 1e12)
    assert rate[("lighter", "full")] == pytest.approx(
        3.0 / (ms[("lighter", "full")] * 1e-3) / 1e12)
    assert rate[("lighter", "forward")] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the failure is made by the missing GPU")
def test_a_failing_launch_profile_is_a_field_not_a_crash():
    """A profile that fails (here: CUDA asked for on a machine without it) leaves the reason
    in ``launches_error``; the benchmark's timings stay."""
    from harness import device_activity

    got = device_activity(lambda: None, torch.device("cuda"))
    assert set(got) == {"launches_error"} and got["launches_error"], got


class _Doubling(torch.autograd.Function):
    """2x as bf16, recording the upstream gradient its backward receives."""
    seen: list = []

    @staticmethod
    def forward(ctx, x):
        return (2 * x).to(torch.bfloat16)

    @staticmethod
    def backward(ctx, g):
        _Doubling.seen.append(g)
        return 2 * g.float()


def test_the_timed_backward_is_the_ops_own():
    """The timed backward hands the op its upstream gradient as is (its output's dtype,
    values exact in every dtype): no loss, cast or product of the harness's is timed with
    it, and the fp64 reference got the very same values."""
    inputs = {"x": torch.randn(6, 5, generator=torch.Generator().manual_seed(0)).requires_grad_()}
    # positional: torch 2.11 (the GPU image) takes no keywords in Function.apply
    rows = run_case("double", {}, inputs, [Provider("ours", lambda x: _Doubling.apply(x))],
                    modes=["backward", "full"], reps=1, warmup=0, measure_memory=False,
                    grad_reference=reference_grads(lambda x: 2 * x, inputs))
    g = _Doubling.seen[-1]
    assert g.dtype == torch.bfloat16 and g.shape == (6, 5)
    assert torch.equal(g.float() * 64, (g.float() * 64).round()) and g.abs().max() <= 4
    assert [r["mode"] for r in rows] == ["backward", "full"]
    assert rows[1]["max_grad_rel_err"] == {"x": 0.0}


def test_rows_keep_the_spread_of_their_repeats():
    """Rows kept only the median, so two providers' medians could not be judged against the
    noise of their repeats."""
    p = Provider("f", _f)
    rows = run_case("f", {"n": 7}, _inputs(), [p], modes=["forward"], reps=4)
    (row,) = rows
    assert len(row["ms_all"]) == 4 and row["ms_min"] <= row["ms"] <= row["ms_max"]
    assert row["launch_hidden"] is False  # CPU wall time: nothing to hide


def test_rows_record_the_clocks_under_load(tmp_path, monkeypatch):
    """The env's clocks are read before any timing (idle clocks); rows keep the clocks read
    when they are first saved, right after their timings."""
    import harness

    readings = iter([{"clocks.sm": "1980"}, {"clocks.sm": "1755"}])
    monkeypatch.setattr(harness.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(harness, "gpu_clocks", lambda: next(readings))
    first = [{"op": "a"}]
    harness.save_rows(first, "x", tmp_path, with_autotune=False)
    rows = first + [{"op": "b"}]
    harness.save_rows(rows, "x", tmp_path, with_autotune=False)
    import json
    saved = json.loads((tmp_path / "x.json").read_text())
    assert [r["clocks_after"]["clocks.sm"] for r in saved] == ["1980", "1755"]
