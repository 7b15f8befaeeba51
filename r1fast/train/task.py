"""What a run trains on: prompts, their tokenizer, and the rewards that score completions.

:func:`build_task` turns the ``[data]`` and ``[reward]`` sections of a recipe into a
:class:`TaskData`: the training prompts (a dataset file read by :mod:`r1fast.data.files`, or a
synthetic task), rendered as text for the run's tokenizer (the prompt template, then the
tokenizer's chat template), in a resumable :class:`PromptDataset`, and a
:class:`RewardRunner` over the weighted reward parts. The reward name ``accuracy`` means "the
checker of this example": the reward its row names (``reward`` / verl ``data_source``), else
math accuracy for files and the task's own checker for synthetic tasks (the equation checker
for Countdown), so one recipe section serves every data source.

R1's stage 4 mixes sources: with ``[reward] reward_model`` naming a trained reward-model folder,
rows whose ``reward`` field is ``"reward_model"`` (or ``"model"``) are general prompts scored by
that model alone, every other row by the weighted parts, and the step reports each source's
share and mean (:mod:`r1fast.train.reward_routing`).

The tokenizer is the model folder's (``run.init_from``): a Hugging Face tokenizer with its chat
template and stop tokens, or r1fast's character tokenizer. Synthetic tasks are made for the
character tokenizer; asking for one with another tokenizer is an error, not a silent run.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Sequence

from r1fast.data import (PROMPT_TEMPLATE, CharTokenizer, PromptDataset, generate_task,
                         load_tokenizer, make_prompt)
from r1fast.data.files import convert_rows, load_examples, read_rows, row_name
from r1fast.data.template import with_system_prompt
from r1fast.rewards import (CompositeReward, RewardRunner, RoutedReward, RunnerConfig,
                            available_rewards, get_reward)
from r1fast.rewards.extract import as_scored, opens_thought
from r1fast.rewards.registry import DEFAULT_ROUTES
from r1fast.train.batch import mini_batches_follow_dp, rank_prompts
from r1fast.train.held_out import HeldOut
from r1fast.train.reward_routing import MixedScorer, general_example, row_source, split_rows

log = logging.getLogger("r1fast.train")

TASK_REWARD = {"arithmetic": "math_accuracy", "countdown": "countdown"}


class TaskData:
    """The prompts of a run, their tokenizer and the rewards. ``model_reward``: the reward
    model that scores the rows routed to it (``reward`` field ``"reward_model"``), with weight
    ``model_weight``; None: every row is scored by ``reward_parts``. ``held_out``: what the
    run evaluates, a :class:`~r1fast.train.held_out.HeldOut` or ``(name, examples)``."""

    def __init__(self, examples: Sequence[dict], tokenizer, reward_parts: Sequence[tuple],
                 prompts_per_step: int, seed: int, runner_config: RunnerConfig,
                 model_reward: Callable | None = None, model_weight: float = 1.0,
                 held_out: HeldOut | tuple[str, list[dict]] | None = None):
        self.tokenizer = tokenizer
        self.held_out = None if held_out is None else HeldOut(*held_out)
        """The problems the run evaluates, prompts rendered; None: nothing."""
        self.dataset = PromptDataset(list(examples), prompts_per_step, seed=seed)
        self.runner = RewardRunner(CompositeReward(list(reward_parts)), runner_config)
        self.part_names = [name for name, _, _ in reward_parts]
        self.mixed = None
        self.failures_before: dict[str, float] = {}
        """Reward-failure counts of the processes before a resume (from the checkpoint)."""
        self.failures: dict[str, float] = {}
        """The run's counts as of the last :meth:`failure_metrics`."""
        self.model_reward = model_reward
        self._texts_cut = 0
        if model_reward is not None:
            model = RewardRunner(CompositeReward([("reward_model", model_reward, model_weight)]),
                                 runner_config)
            self.mixed = MixedScorer(self.runner, model)

    def next_prompts(self, n: int, dp: int, dp_rank: int, mini_batches: int = 1) -> list[dict]:
        """This DP rank's share of the next ``n`` prompts (every rank draws the same batch):
        those of :func:`r1fast.train.batch.rank_prompts`, in its order."""
        if n % dp != 0:
            raise ValueError(f"data.prompts_per_step ({n}) must be divisible by the data parallel "
                             f"size ({dp})")
        batch = self.dataset.next_batch()
        return [batch[i] for i in rank_prompts(n, dp, dp_rank, mini_batches)]

    def score(self, texts: Sequence[str], examples: Sequence[dict], *,
              rules: bool = True) -> dict[str, list[float]]:
        """``{"total": [...], <part>: [...]}`` per completion (with a reward model, also the
        per-source columns of :class:`~r1fast.train.reward_routing.MixedScorer`). The rule
        rewards read a completion whose prompt opened ``<think>`` with it in front
        (:func:`~r1fast.rewards.extract.as_scored`). ``rules=False``: zeros in place of the
        rewards this process would compute alone, which a model-parallel peer computes
        instead (a reward model still runs: collective)."""
        rule_texts = [as_scored(t, ex.get("prompt", "")) for t, ex in zip(texts, examples)]
        if self.mixed is not None:
            return self.mixed(list(texts), list(examples), rule_texts, rules=rules)
        out = self.runner(rule_texts, list(examples), local_parts=rules)
        return {"total": list(out.total), **{k: list(v) for k, v in out.parts.items()}}

    def failure_metrics(self, dp_sum: Callable[[list[float]], list[float]] | None = None
                        ) -> dict[str, float]:
        """Failed reward calls of the run so far (errors, timeouts, crashes): this process's
        counts, summed over the data-parallel ranks with ``dp_sum`` (each scores its own
        share; collective), plus those of the processes before a resume (checkpointed)."""
        if self.mixed is not None:
            local = self.mixed.failure_metrics()
        else:
            m = self.runner.metrics()
            local = {k: m.get(f"rewards/{k}", 0.0) for k in ("errors", "timeouts", "crashes")}
        summed = dp_sum(list(local.values())) if dp_sum is not None else list(local.values())
        self.failures = {k: v + self.failures_before.get(k, 0.0) for k, v in zip(local, summed)}
        return self.failures

    def reward_model_metrics(self, dp_sum: Callable[[list[float]], list[float]]
                             ) -> dict[str, float]:
        """``reward_model_texts_cut``: texts the reward model scored on their end alone (longer
        than its ``max_length``) since the last call, summed over the data-parallel ranks
        (collective); {} without a reward model that counts them. The reward model warns at
        its first cut only: completions grow during RL, and this says by how much."""
        scorer = getattr(self.model_reward, "model", None)
        if not hasattr(scorer, "texts_cut"):
            return {}
        new, self._texts_cut = scorer.texts_cut - self._texts_cut, scorer.texts_cut
        return {"reward_model_texts_cut": dp_sum([float(new)])[0]}

    def state_dict(self) -> dict:
        """The prompt order's position and the run's reward-failure counts."""
        return {**self.dataset.state_dict(), "reward_failures": dict(self.failures)}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self.failures_before = dict(state.get("reward_failures", {}))
        self.failures = dict(self.failures_before)

    def close(self) -> None:
        if self.mixed is not None:
            self.mixed.close()  # both runners
        else:
            self.runner.close()


def reward_parts(task: str | None, weights: dict[str, float], language: str | None = None,
                 model_reward: Callable | None = None) -> list[tuple[str, Callable, float]]:
    """The weighted reward parts; ``accuracy`` is the task's checker (``task`` None: a dataset
    file, whose rows may name their own reward); ``language`` the target of the ``language``
    part (reward.language); ``reward_model`` the loaded ``model_reward`` (reward.reward_model)."""
    parts = []
    for name, w in weights.items():
        if name == "accuracy":
            fn = get_reward(TASK_REWARD[task]) if task else RoutedReward("math_accuracy")
        elif name == "language" and language is not None:
            fn = get_reward("language", target=language)
        elif name == "reward_model":
            if model_reward is None:
                raise ValueError("reward.weights has reward_model, which needs reward.reward_model"
                                 " = <reward-model folder> (written by r1fast stage reward-model)")
            fn = model_reward
        else:
            fn = get_reward(name)
        parts.append((name, fn, float(w)))
    return parts


def prompt_room(cfg) -> int:
    """Tokens a prompt may have (bos included): the context less the completion's budget."""
    return cfg.model.max_position_embeddings - cfg.rollout.max_new_tokens


def check_inputs(cfg, custom_reward: bool = False) -> None:
    """Cheap checks of a run's inputs, made before the model is built (seconds earlier than the
    failure they prevent): the parallel layout fits this run's world size and the model, every
    named path exists and every reward name is registered.
    ``custom_reward``: the caller replaces the recipe's reward parts, whose names then do not
    matter."""
    from r1fast.policy.parallel import check_layout

    layout = check_layout(cfg.parallel, cfg.model)  # world size and divisibility, first
    check_micro_batch_size(cfg, layout.dp)
    a, prompts = cfg.algo, cfg.data.prompts_per_step
    if mini_batches_follow_dp(prompts, layout.dp, a.mini_batches):
        log.warning("algo.mini_batches=%d at dp %d: data.prompts_per_step=%d is not a multiple "
                    "of %d, so each rank's mini-batch comes from its own prompts and an "
                    "optimizer step trains on other rows than at another DP size (as verl's); "
                    "a multiple of mini_batches x dp gives every step a one-rank run's rows",
                    a.mini_batches, layout.dp, prompts, a.mini_batches * layout.dp)
    # the model here is the final one (run.init_from's architecture, when it names a folder)
    room = prompt_room(cfg)
    if room <= 0:
        raise ValueError(f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} leaves no room "
                         f"for a prompt in the model's context (model.max_position_embeddings="
                         f"{cfg.model.max_position_embeddings})")
    if cfg.data.max_prompt_tokens > room:
        raise ValueError(f"data.max_prompt_tokens={cfg.data.max_prompt_tokens} keeps prompts "
                         f"that do not fit: model.max_position_embeddings="
                         f"{cfg.model.max_position_embeddings} leaves {room} tokens beside "
                         f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}")
    for key, path in (("data.path", cfg.data.path), ("data.test_path", cfg.data.test_path),
                      ("run.init_from", cfg.run.init_from),
                      ("reward.reward_model", cfg.reward.reward_model)):
        if path is not None and not Path(path).exists():
            raise ValueError(f"{key}={path} does not exist")
    init = cfg.run.init_from
    if init and (Path(init) / "checkpoints").is_dir() and not (Path(init) / "meta.json").exists() \
            and not any((Path(init) / f).is_file() for f in ("config.json", "r1fast_config.json")):
        # a run folder (its checkpoints/ also hold optimizer state): read as a checkpoint, it
        # failed on a missing meta.json
        raise ValueError(f"run.init_from={init} is a run folder: give its model folder "
                         f"({Path(init) / 'model'}, written when the run ends) or a "
                         f"folder that `r1fast export` made of one of its checkpoints")
    if cfg.reward.reward_model is not None:
        from r1fast.train.reward_model_io import check_reward_model_folder

        check_reward_model_folder(cfg.reward.reward_model, "reward.reward_model")
    if custom_reward:
        return
    # the names reward_parts resolves itself; every other one goes through get_reward
    own = {"accuracy", "reward_model", "language"}
    for name in cfg.reward.weights:
        if name not in own and name not in available_rewards():
            raise ValueError(f"reward.weights names {name!r}, which is not a reward: use "
                             f"accuracy or one of {tuple(available_rewards())}")
    if cfg.reward.accuracy_metric not in cfg.reward.weights:  # else no "accuracy" is logged
        raise ValueError(f"reward.accuracy_metric={cfg.reward.accuracy_metric!r} is not one of "
                         f"the reward parts {tuple(cfg.reward.weights)} (reward.weights)")


def check_micro_batch_size(cfg, dp: int) -> None:
    """``algo.mini_batches`` must divide the rows a data-parallel rank holds per step. Without
    packing, ``parallel.micro_batch_size`` rows must divide what a data-parallel
    rank holds: the step's rows (the old/reference log-prob forward needs equal micro-batches)
    and each update's share of them (else the update's micro-batches silently grow, and with
    them the activation memory the user sized)."""
    mbs, a = cfg.parallel.micro_batch_size, cfg.algo
    prompts = cfg.data.prompts_per_step
    if prompts % dp:
        return  # the dataset's error, which names prompts_per_step and dp
    rows = prompts // dp * a.group_size
    if rows % a.mini_batches:  # else found by the first update, after a whole rollout
        raise ValueError(f"algo.mini_batches={a.mini_batches} must divide the {rows} rows a "
                         f"data-parallel rank trains on per step (data.prompts_per_step "
                         f"{prompts} / dp {dp} x algo.group_size {a.group_size})")
    if not mbs or cfg.parallel.max_tokens_per_microbatch > 0:
        return  # packing sizes by tokens
    per_update = rows // a.mini_batches
    if rows % mbs or rows % a.mini_batches or per_update % mbs:
        raise ValueError(f"parallel.micro_batch_size={mbs} must divide the rows a data-parallel "
                         f"rank trains on: {rows} per step (data.prompts_per_step {prompts} / "
                         f"dp {dp} x algo.group_size {a.group_size}), {rows / a.mini_batches:g} "
                         f"per update (/ algo.mini_batches {a.mini_batches})")


def check_tokenizer_fits(tokenizer, vocab_size: int, key: str) -> None:
    """Every id ``tokenizer`` can produce has a row in a model of ``vocab_size`` (``key``)."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but {key} is "
                         f"{vocab_size}: token ids past it have no embedding row")


def run_tokenizer(cfg):
    """The model folder's tokenizer (``run.init_from``), or the character tokenizer.

    A folder without tokenizer files gets the character tokenizer only for a synthetic task
    (``data.path`` unset), with a warning; with a dataset file that is an error: its text would
    be encoded as characters into a model trained on another vocabulary."""
    init = cfg.run.init_from
    if init and Path(init).is_dir() and any((Path(init) / f).is_file() for f in
                                            ("tokenizer.json", "tokenizer_config.json")):
        return load_tokenizer(init)
    if init:
        if cfg.data.path is not None:
            raise ValueError(f"run.init_from={init} holds no tokenizer (tokenizer.json or "
                             f"tokenizer_config.json), and data.path={cfg.data.path} needs the "
                             f"model's own: copy its tokenizer files into that folder")
        log.warning("run.init_from=%s holds no tokenizer: the synthetic task data.task=%s "
                    "uses r1fast's character tokenizer", init, cfg.data.task)
    return CharTokenizer()


def prompt_messages(ex: dict, d) -> list[dict]:
    """The chat messages of an example's prompt: the template around the question (a
    conversation's last message), ``data.system_prompt`` first unless the row has its own."""
    template = PROMPT_TEMPLATE if d.template == "r1-zero" else d.template
    messages = [dict(m) for m in ex.get("messages", ())] or \
        [{"role": "user", "content": ex["question"]}]
    if template is not None:  # the earlier turns (a system message too) stay as they are
        messages[-1]["content"] = make_prompt(ex["question"], template)
    return with_system_prompt(messages, d.system_prompt)


def render_prompt(ex: dict, tokenizer, d) -> str:
    """An example's prompt text: :func:`prompt_messages` through the tokenizer's chat template,
    or the one message as plain text without one."""
    messages = prompt_messages(ex, d)
    if not (d.chat_template and tokenizer.has_chat_template):
        if len(messages) > 1:
            what = "is a chat conversation" if len(ex.get("messages", ())) > 1 else \
                f"needs data.system_prompt={d.system_prompt!r} in a chat"
            raise ValueError(f"example {ex.get('id')} {what}, but the tokenizer has no chat "
                             f"template (or data.chat_template is false)")
        return messages[0]["content"]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _warn_own_system_prompts(examples: list[dict], d) -> None:
    """Rows with their own system message keep it over ``data.system_prompt``: say how many."""
    own = sum(bool(ex.get("messages")) and ex["messages"][0]["role"] == "system"
              for ex in examples)
    if d.system_prompt and own:
        log.warning("%d of %d rows carry their own system message, which they keep instead "
                    "of data.system_prompt", own, len(examples))


def _training_examples(cfg, tokenizer) -> list[dict]:
    d = cfg.data
    if d.path is None:
        if not isinstance(tokenizer, CharTokenizer):
            raise ValueError(f"data.task={d.task!r} is a synthetic task for r1fast's character "
                             f"tokenizer, but run.init_from={cfg.run.init_from} has {tokenizer!r}; "
                             f"set data.path to a dataset file")
        return _synthetic_examples(d, tokenizer, d.num_train, "train")
    examples = _file_examples(d)
    if d.chat_template and not tokenizer.has_chat_template:
        log.warning("data.chat_template is true but %r has no chat template: the prompts are "
                    "plain text (set data.chat_template = false to say so)", tokenizer)
    for ex in examples:
        ex["prompt"] = render_prompt(ex, tokenizer, d)
    _warn_own_system_prompts(examples, d)
    return examples


def _synthetic_examples(d, tokenizer, n: int, split: str) -> list[dict]:
    """``n`` problems of the synthetic ``data.task``'s ``split`` (train and test are disjoint
    by problem key), in the task's own prompt unless ``data.template`` is set."""
    examples = generate_task(d.task, n, split=split, seed=d.seed, **d.task_options)
    if d.template is not None:
        for ex in examples:
            ex["prompt"] = render_prompt(ex, tokenizer, d)
    return examples


def held_out_examples(cfg, tokenizer) -> tuple[str, list[dict]] | None:
    """What the end of training evaluates, named, with rendered prompts: the first
    ``data.eval_max_problems`` rows of ``data.test_path``, or ``data.num_test`` problems of the
    synthetic task's test split; None when neither is asked for."""
    d = cfg.data
    if d.test_path is not None:
        examples, _ = load_examples(d.test_path, preset=d.preset, prompt_key=d.prompt_key,
                                    answer_key=d.answer_key)
        examples = examples[:d.eval_max_problems]
        for ex in examples:
            ex["prompt"] = render_prompt(ex, tokenizer, d)
        return str(d.test_path), examples
    if d.path is None and d.num_test:
        return f"{d.task}:test", _synthetic_examples(d, tokenizer, d.num_test, "test")
    return None


def _file_examples(d) -> list[dict]:
    """The rows of ``data.path``: rule rows in the preset's layout (bad ones skipped and
    counted), rows routed to the reward model with their prompt only, in file order."""
    rows, where = read_rows(d.path, origins=True)
    rule, model = split_rows(rows)
    examples, report = convert_rows([rows[i] for i in rule], str(d.path), preset=d.preset,
                                    prompt_key=d.prompt_key, answer_key=d.answer_key,
                                    where=[where[i] for i in rule]) if rule else ([], None)
    known = available_rewards()
    for ex in examples:  # row numbers of the whole file, not of the rule rows alone
        ex["row"] = rule[ex["row"]]
        # RoutedReward's names: a registered reward or a default route (the run's checker);
        # a typo would otherwise fail every call of the row, counted as a reward error
        if ex.get("reward") not in (*DEFAULT_ROUTES, *known):
            raise ValueError(f"{row_name(d.path, ex['id'])}: reward={ex['reward']!r} is not a "
                             f"reward; use one of {tuple(known)}, 'rule' (the run's checker) "
                             f"or reward_model")
    if report is not None:
        log.info("%s", report.summary() + (f" (of the {len(rule)} rule rows)" if model else ""))
    examples += [general_example(rows[i], i, where[i], str(d.path), d.preset, d.prompt_key)
                 for i in model]
    if model:
        log.info("%s: %d rows routed to the reward model", d.path, len(model))
    return sorted(examples, key=lambda ex: ex["row"])


def _prompts_that_fit(examples: list[dict], tokenizer, cfg, what: str = "prompts") -> list[dict]:
    """The prompts under ``data.max_prompt_tokens`` (the dropped ones counted in a WARNING);
    without that cap, a prompt longer than the context leaves next to ``rollout.max_new_tokens``
    is an error now rather than at the step (or the evaluation) that draws it. ``what`` names
    the examples in messages."""
    limit = cfg.data.max_prompt_tokens
    lengths = [len(tokenizer.encode(ex["prompt"], add_bos=True)) for ex in examples]
    if limit > 0:
        kept = [ex for ex, n in zip(examples, lengths) if n <= limit]
        if len(kept) < len(examples):
            log.warning("data.max_prompt_tokens=%d dropped %d of %d %s", limit,
                        len(examples) - len(kept), len(examples), what)
        if not kept:
            raise ValueError(f"data.max_prompt_tokens={limit} drops every one of the {what}")
        return kept
    from r1fast.rollout.sampler import check_prompt_room

    room = prompt_room(cfg)
    check_prompt_room(lengths, room, what=what,
                      names=[ex.get("id", i) for i, ex in enumerate(examples)],
                      limits=f"model.max_position_embeddings={cfg.model.max_position_embeddings}"
                             f" leaves beside rollout.max_new_tokens="
                             f"{cfg.rollout.max_new_tokens}",
                      fix=f"set data.max_prompt_tokens={room} to drop them")
    return examples


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskPrompts:
    """What :func:`read_prompts` read: everything of a task that does not need the model."""

    examples: list[dict]
    """The training prompts, rendered for the run's tokenizer, each under the length cap."""
    held_out: HeldOut | None
    """The held-out problems the run evaluates (:func:`held_out_examples`)."""


def read_prompts(cfg, tokenizer) -> TaskPrompts:
    """The ``[data]`` prompts of a :class:`~r1fast.train.config.TrainConfig`, read, rendered
    and checked. It needs no model or process group, so a trainer calls it before building
    the policy: a bad file is an error in seconds, not after the model is constructed."""
    d = cfg.data
    for key, path in (("data.path", d.path), ("data.test_path", d.test_path)):
        if path is not None and not Path(path).exists():  # before any training, not after
            raise ValueError(f"{key}={path} does not exist (a .jsonl/.json/.parquet file or a "
                             f"folder of them)")
    examples = _prompts_that_fit(_training_examples(cfg, tokenizer), tokenizer, cfg)
    routed = sum(row_source(ex) == "model" for ex in examples)
    if routed and cfg.reward.reward_model is None:
        raise ValueError(f"{routed} of {len(examples)} rows of data.path={d.path} have "
                         f"reward = 'reward_model' (or 'model'), which needs "
                         f"reward.reward_model = <reward-model folder>")
    held_out = held_out_examples(cfg, tokenizer)
    if held_out is not None:  # measured now, not when the first evaluation runs
        source, rows = held_out
        kept = _prompts_that_fit(rows, tokenizer, cfg, f"held-out prompts ({source})")
        held_out = HeldOut(source, kept, dropped=len(rows) - len(kept))
        _warn_trained_on(held_out, examples)
    opened = sum(opens_thought(ex["prompt"]) for ex in examples)
    if opened:
        log.info("%d of %d prompts end with <think> (the chat template opens the thought): "
                 "the rule rewards read each completion with it in front", opened, len(examples))
    return TaskPrompts(examples=examples, held_out=held_out)


def _warn_trained_on(held_out: HeldOut, examples: Sequence[dict]) -> None:
    """A WARNING when held-out prompts are also training prompts (the same file twice, or a
    dataset whose splits overlap): their scores then measure recall, not generalisation."""
    train = {ex["prompt"] for ex in examples}
    seen = sum(ex["prompt"] in train for ex in held_out.examples)
    if seen:
        log.warning("%d of the %d held-out prompts (%s) are also training prompts: their "
                    "evaluation measures what the run trained on", seen,
                    len(held_out.examples), held_out.source)


def build_task(cfg, reward: Callable | None = None, tokenizer=None,
               prompts: TaskPrompts | None = None) -> TaskData:
    """TaskData for a :class:`~r1fast.train.config.TrainConfig` (``reward`` replaces the
    recipe's reward parts, e.g. a custom function from the Python API; ``tokenizer`` defaults
    to :func:`run_tokenizer`; ``prompts``: what :func:`read_prompts` read, else read now)."""
    r = cfg.reward
    tokenizer = tokenizer or run_tokenizer(cfg)
    prompts = prompts or read_prompts(cfg, tokenizer)
    examples = prompts.examples
    task = None if cfg.data.path is not None else cfg.data.task
    from r1fast.train.run_reward_model import model_reward as load_model_reward

    model_reward = load_model_reward(cfg, examples)
    parts = (reward_parts(task, r.weights, language=r.language, model_reward=model_reward)
             if reward is None else [("custom", reward, 1.0)])
    runner_cfg = RunnerConfig(mode="inline" if r.workers == 0 else "auto",
                              num_workers=max(r.workers, 1), timeout_s=r.timeout_s,
                              cpu_time_s=r.cpu_time_s)
    return TaskData(examples, tokenizer, parts, cfg.data.prompts_per_step, cfg.data.seed,
                    runner_cfg, model_reward=model_reward, model_weight=r.reward_model_weight,
                    held_out=prompts.held_out)
