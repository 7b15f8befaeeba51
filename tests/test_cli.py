"""The `r1fast` command line."""
import subprocess
import sys

import pytest

from r1fast.cli import main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "train", "policy", "plan"):
        assert cmd in out


def test_train_rejects_a_bad_key(tmp_path):
    from r1fast.typed_toml import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'algo.kl_coef'"):
        main(["train", "recipes/tiny.toml", "--algo.kl_coeff=0.1"])


def test_policy_command_prints_params_and_logprob():
    out = subprocess.run([sys.executable, "-m", "r1fast.cli", "policy", "--preset", "tiny-moe"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "param" in out.stdout.lower() and "log" in out.stdout.lower()


def test_stage_cli_names_missing_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["stage", "sft", "--out", "x"])
    assert e.value.code == 2
    assert "needs --init" in capsys.readouterr().err


def test_stage_cli_pretrain_then_evaluate(tmp_path, capsys):
    assert main(["stage", "pretrain", "--out", str(tmp_path / "b"), "--model", "tiny-dense",
                 "--steps", "2", "--num-train", "64", "--digits", "1"]) == 0
    assert main(["stage", "evaluate", "--model", str(tmp_path / "b" / "model"), "--k", "1",
                 "--num-test", "2", "--digits", "1", "--max-new-tokens", "4",
                 "--num-train", "64"]) == 0
    assert '"pass_at_1"' in capsys.readouterr().out
