import dataclasses
from typing import Literal

import pytest

from r1fast.typed_toml import ConfigError, dump_toml, from_dict, load, parse_overrides


@dataclasses.dataclass
class Inner:
    kl_coef: float = 0.0
    """doc"""
    kl: Literal["k1", "k3"] | None = None
    steps: int = 3
    stops: tuple[int, ...] = ()


@dataclasses.dataclass
class Outer:
    algo: Inner = dataclasses.field(default_factory=Inner)
    name: str = "x"
    flag: bool = False


def test_overrides_parse_toml_literals():
    assert parse_overrides(["--algo.kl_coef=0.001", "--algo.kl", "k3", "--flag=true"]) == {
        "algo": {"kl_coef": 0.001, "kl": "k3"}, "flag": True}


def test_load_recipe_and_overrides(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('name = "r"\n[algo]\nkl_coef = 0.1\nsteps = 5\nstops = [1, 2]\n')
    cfg = load(Outer, p, ["--algo.kl_coef=1", "--algo.kl=k1"])
    assert cfg == Outer(algo=Inner(kl_coef=1.0, kl="k1", steps=5, stops=(1, 2)), name="r")
    # round trip through TOML
    p2 = tmp_path / "r2.toml"
    p2.write_text(dump_toml(cfg))
    assert load(Outer, p2) == cfg


@pytest.mark.parametrize("overrides, match", [
    (["--algo.kl_coeff=1"], r"unknown config key 'algo.kl_coeff'; did you mean 'algo.kl_coef'"),
    (["--algo.steps=1.5"], r"'algo.steps' must be an integer"),
    (["--algo.kl=k9"], r"'algo.kl'"),
    (["--flag=3"], r"'flag' must be true or false"),
    (["--algo=3"], r"'algo' must be a table"),
    (["algo.steps=3"], r"must look like --section.key=value"),
    (["--algo.steps"], r"has no value"),
])
def test_bad_keys_are_named(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load(Outer, None, overrides)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load(Outer, tmp_path / "nope.toml")


def test_from_dict_nested_unknown():
    with pytest.raises(ConfigError, match="unknown config key 'algo.nope'"):
        from_dict(Outer, {"algo": {"nope": 1}})


@pytest.mark.parametrize("overrides, says", [
    ([], None),
    (["--rollout.top_p=0.95"], "rollout.top_p=0.95: completions are drawn from a truncated"),
    (["--rollout.top_p=0.9", "--rollout.top_k=20", "--algo.tis_cap=2"],
     "rollout.top_p=0.9 and rollout.top_k=20: completions"),
    (["--rollout.top_k=20", "--rollout.logprobs=sampled"], "rollout.top_k=20: completions"),
    (["--rollout.top_k=20", "--rollout.logprobs=sampled", "--algo.tis_cap=2"], None),
    (["--rollout.logprobs=sampled"], "without algo.tis_cap"),
    # a sequence-wise balance loss over packed rows balances rows, not samples (helper-79)
    (["--model.aux_loss_coef=1e-3", "--model.aux_loss_type=seq_aux_loss",
      "--parallel.max_tokens_per_microbatch=512"],
     "model.aux_loss_type = 'seq_aux_loss' with packed micro-batches"),
    (["--model.aux_loss_coef=1e-3", "--model.aux_loss_type=seq_aux_loss"], None),
    (["--model.aux_loss_coef=0", "--model.aux_loss_type=seq_aux_loss"],  # no weight: unused
     "model.aux_loss_type='seq_aux_loss' is not used: model.aux_loss_coef is 0"),
])
def test_sampling_warnings_name_an_uncorrected_truncation(overrides, says):
    from r1fast.train.config import config_warnings, load_train_config

    warnings = config_warnings(load_train_config(None, overrides))
    assert warnings == [] if says is None else (len(warnings) == 1 and says in warnings[0])


def test_dump_toml_round_trips_any_text_and_key():
    """Strings with newlines, quotes and control characters, and keys that need quoting,
    come back from the run folder's config.toml as they went in."""
    import tomllib

    from r1fast.train.config import load_train_config

    cfg = load_train_config(None, ['--data.system_prompt=Think.\n"Then" answer\t\x01.',
                                   '--reward.weights={"a.b" = 0.5, accuracy = 1.0}'])
    back = tomllib.loads(dump_toml(cfg))
    assert back["data"]["system_prompt"] == 'Think.\n"Then" answer\t\x01.'
    assert back["reward"]["weights"] == cfg.reward.weights and "a.b" in cfg.reward.weights


def test_the_default_learning_rate_is_named_when_a_run_starts_from_a_checkpoint(tmp_path):
    """1e-4 suits the tiny models trained from scratch; from a large pretrained folder it is a
    warning (verl's actor default is 1e-6), also under an [optim] table that leaves lr out;
    an optim.lr the user set, 1e-4 included, is not, nor a tiny model r1fast pretrained."""
    import json
    import pickle
    import shutil
    from pathlib import Path

    from r1fast.policy.config import ModelConfig
    from r1fast.train.config import DEFAULT_LR, config_warnings, load_train_config

    big, tiny = tmp_path / "qwen3", tmp_path / "tiny"
    big.mkdir(), tiny.mkdir()
    shutil.copy(Path(__file__).parents[1] / "fixtures/hf_configs/qwen3_30b_a3b_base.json",
                big / "config.json")
    (tiny / "config.json").write_text(json.dumps(ModelConfig.preset("tiny-moe").to_hf_config()))
    start = [f"--run.init_from={big}"]
    (warning,) = config_warnings(load_train_config(None, start))
    assert warning.startswith("optim.lr=0.0001 is the trainer's default")
    assert f"({big}, 30.53 B parameters)" in warning
    assert len(config_warnings(load_train_config(None, [*start, "--optim.clip_grad=0.5"]))) == 1
    for chosen in ("1e-6", "1e-4"):
        assert config_warnings(load_train_config(None, [*start, f"--optim.lr={chosen}"])) == []
    assert config_warnings(load_train_config(None, [])) == []
    assert config_warnings(load_train_config(None, [f"--run.init_from={tiny}"])) == []
    # the mark stays in this process: a spawned process or a pickle reads a plain float
    back = pickle.loads(pickle.dumps(DEFAULT_LR))
    assert type(back) is float and back == 1e-4


def test_a_weights_table_replaces_the_default_and_overrides_edit_the_recipes(tmp_path, caplog):
    """``weights = {accuracy = 1.0}`` is accuracy alone: it was merged onto the default
    {accuracy = 1.0, format = 0.1}, so a format reward was paid that nobody wrote. A dotted
    override edits the weights there are (the recipe's, else the default) key by key, and a
    table that leaves ``weights`` out keeps the default."""
    from r1fast.train.config import load_train_config

    recipe = tmp_path / "r.toml"
    recipe.write_text("[reward]\nweights = { accuracy = 1.0 }\n")
    assert load_train_config(recipe).reward.weights == {"accuracy": 1.0}
    assert load_train_config(None, ["--reward.weights={accuracy = 1.0}"]).reward.weights == {
        "accuracy": 1.0}
    edited = load_train_config(recipe, ["--reward.weights.format=0.2"])
    assert edited.reward.weights == {"accuracy": 1.0, "format": 0.2}
    assert load_train_config(None, ["--reward.weights.format=0.2"]).reward.weights == {
        "accuracy": 1.0, "format": 0.2}
    assert load_train_config(None, ["--reward.weights.language=0.5"]).reward.weights == {
        "accuracy": 1.0, "format": 0.1, "language": 0.5}
    assert load_train_config(None, ["--reward.workers=3"]).reward.weights == {
        "accuracy": 1.0, "format": 0.1}
    # a written table over a recipe's replaces it too (it was merged in: the README's
    # hf_tiny example trained with a format reward nobody wrote; helper-62)
    recipe.write_text("[reward]\nweights = { accuracy = 1.0, format = 0.1 }\n[rollout]\n"
                      "max_new_tokens = 77\n")
    with caplog.at_level("WARNING", logger="r1fast"):
        written = load_train_config(recipe, ["--reward.weights={accuracy = 1.0, short = 0.2}"])
    assert written.reward.weights == {"accuracy": 1.0, "short": 0.2}
    assert "override --reward.weights={...} replaces the recipe's table, whose format is " \
        "dropped" in caplog.text
    # a section written as a table: the recipe's other keys go back to their defaults, said
    caplog.clear()
    with caplog.at_level("WARNING", logger="r1fast"):
        cfg = load_train_config(recipe, ["--rollout={temperature = 0.7}"])
    assert cfg.rollout.max_new_tokens != 77 and "whose max_new_tokens is dropped" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="r1fast"):
        cfg = load_train_config(None, ["--reward.weights.format=0.2",
                                       "--reward.weights={accuracy = 1.0}"])
    assert cfg.reward.weights == {"accuracy": 1.0}
    assert "replaces the earlier --reward.weights.KEY edits (format)" in caplog.text


def test_a_key_given_twice_says_which_one_is_used(caplog):
    """``--run.steps=5 --run.steps=7`` took 7 without a word."""
    from r1fast.train.config import load_train_config

    with caplog.at_level("WARNING", logger="r1fast"):
        assert load_train_config(None, ["--run.steps=5", "--run.steps", "7"]).run.steps == 7
    assert "override --run.steps is given twice (5, then 7): the last one is used" in \
        caplog.text



def test_both_spellings_of_a_flattened_key_must_agree(tmp_path):
    """``[algo] kl_coef`` is ``algo.objective.kl_coef``: a recipe writing one spelling and an
    override the other used to keep the flat one silently, whichever came last."""
    from r1fast.train.config import load_train_config

    recipe = tmp_path / "r.toml"
    recipe.write_text("[algo]\nkl_coef = 0.1\n")
    with pytest.raises(ConfigError, match=r"'algo.kl_coef' = 0.1 is also given as "
                                          r"'algo.objective.kl_coef' = 0.2; write it once"):
        load_train_config(recipe, ["--algo.objective.kl_coef=0.2"])
    # the same value twice is no conflict; either spelling alone is read
    assert load_train_config(recipe, ["--algo.objective.kl_coef=0.1"]).algo.objective.kl_coef == 0.1
    assert load_train_config(None, ["--algo.objective.kl_coef=0.3"]).algo.objective.kl_coef == 0.3
    assert load_train_config(recipe, ["--algo.kl_coef=0.4"]).algo.objective.kl_coef == 0.4


def test_options_a_run_never_reads_are_named_at_its_start():
    """Each of these was accepted and ignored without a word (helper-62)."""
    from r1fast.train.config import config_warnings, load_train_config

    def warned(*overrides):
        return config_warnings(load_train_config(None, list(overrides)))

    assert warned() == []
    assert warned("--parallel.micro_batch_size=3", "--parallel.max_tokens_per_microbatch=512") \
        == ["parallel.micro_batch_size=3 is not used: parallel.max_tokens_per_microbatch packs"]
    assert warned("--parallel.max_tokens_per_logprob_forward=100")[0].startswith(
        "parallel.max_tokens_per_logprob_forward=100 is not used")
    assert warned("--algo.router_replay_capture=posthoc")[0].startswith(
        "algo.router_replay_capture='posthoc' is not used: algo.router_replay is off")
    assert warned("--algo.ref_reset_every=5", "--algo.kl_coef=0")[0].startswith(
        "algo.ref_reset_every=5 is not used: there is no reference")
    assert warned("--reward.reward_model_weight=3")[0].startswith(
        "reward.reward_model_weight=3.0 is not used")
    assert warned("--reward.cpu_time_s=10")[0].startswith(
        "reward.cpu_time_s=10 >= reward.timeout_s=5: the wall-clock limit always ends")
    assert warned("--data.path=x.jsonl", "--data.num_train=5") == [
        "data.num_train=5 is not used: data.path=x.jsonl is the data"]
    # a system prompt for a synthetic task's own prompts, held-out settings without held-out
    # problems (helper-69)
    assert warned("--data.system_prompt=Be brief.")[0].startswith(
        "data.system_prompt='Be brief.' is not used: the synthetic data.task='arithmetic' "
        "prompts as written")
    assert warned("--data.system_prompt=Be brief.", "--data.template=r1-zero") == []
    assert warned("--data.eval_k=8")[0].startswith("data.eval_k=8 is not used: there are no "
                                                   "held-out problems")
    assert warned("--data.eval_k=8", "--data.num_test=4") == []
