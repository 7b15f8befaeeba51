"""Config errors that need no model fail before the model is built.

Building the policy, its optimizer and the reference takes seconds (7-12 s for a real recipe on
a loaded machine) and prints megatron's configuration dump; an error that only a file system or
registry lookup can find -- a missing ``data.path`` or ``run.init_from``, a misspelt reward, a
fresh start over an existing run, a layout that does not fit the world size -- must not wait
for it. The tests replace the trainer's engine with one that fails the test if it is ever
constructed, so each error must come first,
and check it is one ``r1fast: error:`` line naming the key with exit code 2 through the CLI."""
import json

import pytest

from r1fast.cli import main
from r1fast.policy.config import ModelConfig
from r1fast.policy.hf_checkpoint import R1FAST_CONFIG
from r1fast.train.reward_model_io import FORMAT, META_FILE
from r1fast.train.config import load_train_config

pytestmark = pytest.mark.reliability

BASE = ["--model.vocab_size=128", "--data.prompts_per_step=1", "--algo.group_size=2",
        "--rollout.max_new_tokens=4", "--reward.workers=0", "--run.progress=false",
        "--run.tensorboard=false", "--data.num_train=16", "--run.steps=1"]


class _NoModel:
    def __init__(self, *a, **k):
        raise AssertionError("the model was built before the config error was raised")


@pytest.fixture
def no_model(monkeypatch):
    import r1fast.train.grpo as grpo

    monkeypatch.setattr(grpo, "TrainEngine", _NoModel)


def _cases(tmp_path):
    run = tmp_path / "old_run"  # a finished run's metrics, no checkpoint
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    missing = tmp_path / "missing"
    not_rm = tmp_path / "not_a_reward_model"  # a model folder without the reward files
    not_rm.mkdir()
    no_head = tmp_path / "no_head"  # a reward model whose score head was lost
    no_head.mkdir()
    (no_head / META_FILE).write_text(json.dumps({"format": FORMAT, "max_length": 64}))
    (no_head / R1FAST_CONFIG).write_text(json.dumps(ModelConfig.preset("tiny-moe").to_dict()))
    bad_row = tmp_path / "bad_row.jsonl"  # data errors need the file read, not the model
    bad_row.write_text('{"prompt": " ", "answer": "3"}\n')  # bad rows are skipped; none left
    routed = tmp_path / "routed.jsonl"
    routed.write_text('{"prompt": "Write a poem.", "reward": "reward_model"}\n')
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(json.dumps({"prompt": "1+" * 300 + "1=", "answer": "301"}) + "\n")
    return [
        ([f"--data.path={bad_row}"], "bad_row.jsonl"),
        ([f"--data.path={routed}"], "1 of 1 rows of data.path="),
        ([f"--data.path={long_prompt}"], "longer than"),
        (["--parallel.micro_batch_size=3"], "parallel.micro_batch_size=3 must divide the rows "
                                             "a data-parallel rank trains on: 2 per step"),
        (["--parallel.micro_batch_size=2", "--algo.mini_batches=2"],
         r"2 per step .* 1 per update \(/ algo.mini_batches 2\)"),
        ([f"--data.path={missing}.jsonl"], "data.path="),
        ([f"--data.test_path={missing}.jsonl"], "data.test_path="),
        ([f"--run.init_from={missing}"], "run.init_from="),
        ([f"--reward.reward_model={missing}"], "reward.reward_model="),
        (["--reward.weights={acuracy=1.0}"], "reward.weights names 'acuracy'"),
        (["--reward.weights={accuracy=1.0, formatt=0.1}"], "reward.weights names 'formatt'"),
        ([f"--run.out_dir={run}"], "--run.overwrite=true"),
        ([f"--run.out_dir={run}", "--run.resume=false"], "has run.resume=false"),
        (["--parallel.world_size=4"], "parallel.world_size=4, but torch.distributed has 1"),
        (["--parallel.tp=2"], "ParallelConfig: world size 1 is not a multiple of tp"),
        ([f"--reward.reward_model={not_rm}"], "is not a reward-model folder"),
        ([f"--reward.reward_model={no_head}"], "reward_head.safetensors .the score head. is missing"),
        (["--model.vocab_size=8"], "but model.vocab_size is 8"),
        (["--algo.logprob_head=gemm"], "algo.logprob_head='gemm' runs on Triton"),
        (["--reward.accuracy_metric=acc"], "reward.accuracy_metric='acc' is not one of the "
                                           "reward parts"),
        (["--model.max_position_embeddings=64", "--rollout.max_new_tokens=100"],
         "rollout.max_new_tokens=100 leaves no room for a prompt"),
    ]


@pytest.mark.parametrize("i", range(21))
def test_error_comes_before_the_model(tmp_path, no_model, i):
    from r1fast.train.grpo import GRPOTrainer

    extra, msg = _cases(tmp_path)[i]
    cfg = load_train_config(None, [*BASE, f"--run.out_dir={tmp_path / 'run'}", *extra])
    with pytest.raises(ValueError, match=msg.replace("[", r"\[")) as e:
        GRPOTrainer(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("i", [0, 5, 7, 9, 11, 13, 15, 17])
def test_cli_error_is_one_line_exit_2(tmp_path, no_model, capsys, i):
    extra, msg = _cases(tmp_path)[i]
    with pytest.raises(SystemExit) as e:
        main(["train", "recipes/tiny.toml", *BASE, f"--run.out_dir={tmp_path / 'run'}", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("r1fast: error: ") and msg in err and err.count("\n") == 1, err


def test_a_custom_reward_skips_the_name_check(tmp_path, no_model):
    """With reward= the recipe's names are not used, so they are not an error: the trainer
    goes on to build the model (here: the stand-in that refuses)."""
    from r1fast.train.grpo import GRPOTrainer

    cfg = load_train_config(None, [*BASE, f"--run.out_dir={tmp_path / 'run'}",
                                   "--reward.weights={mine=1.0}"])
    with pytest.raises(AssertionError, match="model was built"):
        GRPOTrainer(cfg, reward=lambda text, ex: 0.0)
