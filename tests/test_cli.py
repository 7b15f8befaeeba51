"""The `r1fast` command line."""
import subprocess
import sys

import pytest
import torch

from r1fast.cli import main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "train", "policy", "plan"):
        assert cmd in out


def test_train_rejects_a_bad_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "recipes/tiny.toml", "--algo.kl_coeff=0.1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("r1fast: error: ") and "did you mean 'algo.kl_coef'" in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.reliability
@pytest.mark.parametrize("override,key", [
    ("--optim.lr=inf", "optim.lr"), ("--model.rms_norm_eps=nan", "model.rms_norm_eps"),
    ("--model.router_scaling_factor=nan", "model.router_scaling_factor"),
    ("--run.steps=-1", "run.steps"), ("--run.save_every=-1", "run.save_every"),
    ("--reward.workers=-2", "reward.workers"), ("--algo.group_size=1", "algo.group_size"),
    ("--algo.kl_coef=inf", "algo.kl_coef"), ("--run.stepz=3", "run.stepz"),
])
def test_config_errors_are_one_line_exit_2(override, key, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["train", "recipes/tiny.toml", override, f"--run.out_dir={tmp_path}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("r1fast: error: ") and key in err and err.count("\n") == 1, err


@pytest.mark.reliability
def test_missing_recipe_and_debug_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nsteps = 3\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "R1FAST_DEBUG"}
    out = subprocess.run([sys.executable, "-m", "r1fast.cli", "train", str(bad)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("r1fast: error: ") and str(bad) in out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    out = subprocess.run([sys.executable, "-m", "r1fast.cli", "train", str(bad)],
                         capture_output=True, text=True, timeout=120,
                         env={**env, "R1FAST_DEBUG": "1"})
    assert out.returncode != 0 and "Traceback" in out.stderr


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


@pytest.mark.parametrize("argv, says", [
    (["bogus"], "r1fast: argument command: invalid choice: 'bogus'"),
    (["train"], "r1fast train: the following arguments are required: recipe"),
    (["stage", "sft"], "r1fast stage: stage sft needs --out, --init"),
    (["stage", "nope"], "r1fast stage: argument name: invalid choice: 'nope'"),
    (["plan", "recipes/tiny.toml", "--gpu-mem", "x"], "argument --gpu-mem: invalid float"),
    (["policy", "--preset"], "argument --preset: expected one argument"),
    (["export"], "r1fast export: the following arguments are required: source, out_dir"),
    (["stage", "reward-model"], "r1fast stage reward-model: the following arguments are "
                                "required: --init, --data, --out"),
])
def test_usage_errors_are_one_line_exit_2(argv, says, capsys):
    """argparse's usage errors, in every subcommand, are one line like every other error."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("r1fast: error: ") and says in err, err
    assert err.count("\n") == 1 and err.rstrip().endswith("--help)"), err


def test_stage_cli_pretrain_then_evaluate(tmp_path, capsys):
    assert main(["stage", "pretrain", "--out", str(tmp_path / "b"), "--model", "tiny-dense",
                 "--steps", "2", "--num-train", "64"]) == 0
    assert main(["stage", "evaluate", "--model", str(tmp_path / "b" / "model"), "--k", "1",
                 "--num-test", "2", "--max-new-tokens", "4"]) == 0
    assert '"pass_at_1"' in capsys.readouterr().out


def test_export_never_replaces_a_folder_it_was_not_told_to(tmp_path, capsys):
    """``r1fast export RUN OUT`` deleted whatever OUT held (a user's notes included) and wrote
    the model there; a non-empty OUT is now refused before anything is read or written."""
    out = tmp_path / "important"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "no_run"), str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "already exists and is not empty" in err and "--overwrite" in err
    assert (out / "notes.txt").read_text() == "precious"
    # with --overwrite it goes on to the source (here: a folder that does not exist, named)
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "no_run"), str(out), "--overwrite"])
    assert "no_run does not exist" in capsys.readouterr().err


def test_export_of_an_sft_run(tmp_path, capsys):
    """`r1fast export` of an SFT run failed with "unknown config key 'steps'" (it read every
    checkpoint's config as a GRPO TrainConfig); it now writes the same weights the SFT run
    saved as its model, with the run's tokenizer."""
    from safetensors.torch import load_file

    from r1fast.pipeline import stages
    from r1fast.pipeline.demo import dense_model

    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(8)]
    model = stages.sft(rows, tmp_path / "sft", model=dense_model(), steps=1, batch_size=4)
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "sft"), str(out)]) == 0
    ours, theirs = load_file(out / "model.safetensors"), load_file(model / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (out / "tokenizer.json").read_text() == (model / "tokenizer.json").read_text()
    # --overwrite onto the run itself (or a folder above it) moved the run aside and deleted it
    for target in (tmp_path / "sft", tmp_path):
        with pytest.raises(SystemExit):
            main(["export", str(tmp_path / "sft"), str(target), "--overwrite"])
        assert "is or holds the run being exported" in capsys.readouterr().err
    assert (tmp_path / "sft" / "checkpoints").is_dir() and (model / "model.safetensors").is_file()


def test_export_under_torchrun_takes_the_processes_at_hand():
    """A run that pinned parallel.world_size (the README's multi-node example pins 16) could
    not be exported under torchrun on fewer processes: the error said to set the world size,
    which export takes no option for (helper-74). The distributed checkpoint reads at any
    layout: the export builds at the run's TP/PP/EP (or --tp/--pp/--ep) over the processes at
    hand."""
    from r1fast.policy.config import ParallelConfig
    from r1fast.train.export import export_layout

    run = ParallelConfig(tp=2, ep=4, world_size=16)
    assert export_layout(run, True, None, 1, "c") == ParallelConfig(world_size=1)
    under = export_layout(run, True, None, 8, "c")
    assert (under.tp, under.ep, under.world_size) == (2, 4, None)
    override = export_layout(run, True, {"tp": 1, "ep": 2}, 2, "c")
    assert (override.tp, override.ep, override.world_size) == (1, 2, None)
    assert export_layout(run, True, {"tp": 1}, 1, "c").tp == 1  # asked for: built so
    # the run's settings for its own TP / PP go with another one (they were refused: helper-75)
    split = ParallelConfig(tp=2, pp=2, sequence_parallel=True, pp_first_stage_layers=1)
    other = export_layout(split, True, {"tp": 1, "pp": 1}, 1, "c")
    assert (other.sequence_parallel, other.pp_first_stage_layers) == (None, None)
    with pytest.raises(ValueError, match=r"c is a single-file checkpoint .* drop --tp/--pp/--ep"):
        export_layout(run, False, {"tp": 1}, 2, "c")
    with pytest.raises(SystemExit):
        main(["export", "run", "out", "--tp", "x"])


def test_a_finished_run_says_that_no_step_ran(tmp_path, capsys):
    """A rerun into a run already at run.steps resumes and trains nothing: its last line said
    'last reward nan'."""
    run = ["train", "recipes/tiny.toml", f"--run.out_dir={tmp_path}", "--run.steps=1",
           "--rollout.max_new_tokens=4", "--data.prompts_per_step=2", "--algo.group_size=2",
           "--reward.workers=0", "--run.progress=false", "--run.tensorboard=false"]
    assert main(run) == 0
    assert "done: 1 steps" in capsys.readouterr().err.splitlines()[-1]
    assert main(run) == 0
    last = capsys.readouterr().err.splitlines()[-1]
    assert "no step ran here (the checkpoint was at run.steps)" in last and "nan" not in last


@pytest.mark.parametrize("argv, says", [
    # argparse took "1" for the recipe: "recipe file not found: 1"
    (["train", "--run.steps", "1", "recipes/tiny.toml"],
     "the recipe comes first, then the overrides as --section.key=value (the recipe was read "
     "as '1')"),
    # "is neither a run folder ... nor a checkpoint folder"
    (["export", "/nonexistent/run", "/nonexistent/out"], "export: /nonexistent/run does not "
                                                         "exist"),
])
def test_misplaced_arguments_say_what_was_read(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and err.count("\n") == 1, err
