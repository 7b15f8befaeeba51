"""``r1fast plan`` flags: the decoder planned is the run's, and bad flag values are errors that
name the flag the user typed (not the planner's field names)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1fast.plan import plan_main, plan_memory
from r1fast.train.config import load_train_config

TINY = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny.toml")
KV_ROW = "rollout KV cache"
RECOMPUTE_ROW = "[B, L, V]: prefix-recomputing decoder"


def _plan(capsys, *argv: str) -> tuple[int, str, str]:
    rc = plan_main([TINY, "--plain", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("how", [["--rollout.decoder=recompute"],
                                 ["--override", "rollout.decoder=recompute"]])
def test_the_runs_decoder_is_planned(capsys, how):
    rc, out, err = _plan(capsys, *how)
    assert rc == 0, err
    assert RECOMPUTE_ROW in out and KV_ROW not in out
    assert "what-if" not in err


def test_json_plans_the_runs_decoder(capsys):
    assert plan_main([TINY, "--json", "--rollout.decoder=recompute"]) == 0
    assert json.loads(capsys.readouterr().out)["options"]["decoder"] == "recompute"


def test_decoder_flag_is_a_loud_what_if(capsys):
    rc, out, err = _plan(capsys)
    assert rc == 0 and KV_ROW in out and "what-if" not in err
    rc, out, err = _plan(capsys, "--decoder", "recompute")
    assert rc == 0 and RECOMPUTE_ROW in out
    assert "--decoder recompute is a what-if" in err and "rollout.decoder=kv_cache" in err
    rc, out, err = _plan(capsys, "--decoder", "recompute", "--rollout.decoder=recompute")
    assert rc == 0 and RECOMPUTE_ROW in out and "what-if" not in err


def test_decoder_flag_against_the_recipes_is_an_error(capsys):
    rc, out, err = _plan(capsys, "--decoder", "kv-cache", "--rollout.decoder=recompute")
    assert rc == 2 and out == ""
    assert err.startswith("r1fast plan: error: --decoder kv-cache contradicts "
                          "rollout.decoder=recompute")


def test_prompt_len_past_the_models_positions_is_an_error(capsys):
    # tiny-moe: 512 positions, rollout.max_new_tokens = 24 -> at most 488 prompt tokens
    rc, out, err = _plan(capsys, "--prompt-len", "488")
    assert rc == 0 and "(488 prompt + 24 new)" in out
    rc, out, err = _plan(capsys, "--prompt-len", "100000")
    assert rc == 2 and out == ""
    assert err.startswith("r1fast plan: error: --prompt-len must be in [1, 488]")
    assert err.rstrip().endswith("got 100000") and len(err.strip().splitlines()) == 1


def test_plan_memory_refuses_a_prompt_past_the_positions():
    cfg = load_train_config(TINY, [])
    assert plan_memory(cfg, prompt_len=488).prompt_len == 488
    with pytest.raises(ValueError, match=r"prompt_len must be at most .* = 488, got 489"):
        plan_memory(cfg, prompt_len=489)


@pytest.mark.parametrize("argv,message", [
    (["--gpu-mem", "0"], "--gpu-mem must be a finite number > 0 (GiB), got 0"),
    (["--gpu-mem", "-80"], "--gpu-mem must be a finite number > 0 (GiB), got -80"),
    (["--gpu-mem", "inf"], "--gpu-mem must be a finite number > 0 (GiB), got inf"),
    (["--gpu-mem", "nan"], "--gpu-mem must be a finite number > 0 (GiB), got nan"),
    (["--reserve", "-1"], "--reserve must be a finite number >= 0 (GiB), got -1"),
    (["--prompt-len", "0"], "--prompt-len must be in [1, 488]"),
    (["--gpus", "0"], "--gpus must be >= 1, got 0"),
    (["--world-size", "-2"], "--gpus must be >= 1, got -2"),
])
def test_bad_flags_name_the_flag(capsys, argv, message):
    rc, out, err = _plan(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith(f"r1fast plan: error: {message}"), err
    assert len(err.strip().splitlines()) == 1
