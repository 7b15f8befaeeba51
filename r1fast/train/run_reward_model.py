"""The reward model of a GRPO run (``reward.reward_model``): loaded at the run's layout, given
each prompt as it was trained to read it, and the ways its scores can mislead said at the start.

- **Prompts** (``rm_prompt`` of each example): the example's messages through the reward
  model's own tokenizer and chat template, as reward-model training renders its pairs (the user
  turn alone, so without ``data.system_prompt``), followed by the thought the policy's prompt
  opened, so the completion reads as a whole answer.
- **Length**: a text longer than the reward model's ``max_length`` is scored on its end alone;
  a run whose prompts and ``rollout.max_new_tokens`` can exceed it is warned, and each step
  counts the cut texts (``reward_model_texts_cut``).
- **Scale**: Bradley-Terry fixes score differences only; where the raw score sets the size of
  the advantages (added to rule rewards in a row, or under drgrpo / rloo) the start warns, and
  ``reward.reward_model_normalize`` standardises it with the scale its training recorded.
"""
from __future__ import annotations

import dataclasses
import logging

from r1fast.rewards.extract import opens_thought
from r1fast.train.reward_routing import row_source
from r1fast.train.task import prompt_messages, render_prompt

log = logging.getLogger("r1fast.train")


def model_reward(cfg, examples: list[dict]):
    """The recipe's reward model (None without ``reward.reward_model``), after each example of
    ``examples`` it scores got its ``rm_prompt`` (see the module docstring); a reward model
    nothing uses is a WARNING."""
    from r1fast.train.batch import all_ranks_int
    from r1fast.train.reward_model_io import load_reward_model, read_meta

    r = cfg.reward
    if r.reward_model is None:  # rows routed to none are an error of read_prompts
        return None

    meta = read_meta(r.reward_model, "reward.reward_model")
    # the rows it scores: every row as a part of reward.weights, else those routed to it
    scored = examples if "reward_model" in r.weights else [
        ex for ex in examples if row_source(ex) == "model"]
    rm_tokenizer = _reward_model_prompts(cfg, scored, meta.get("chat_template"))
    _warn_of_cut_texts(cfg, scored, rm_tokenizer, meta.get("max_length"))
    _warn_of_raw_scores(cfg, meta)
    if not scored:
        log.warning("reward.reward_model=%s is loaded but unused: no row routes to it (reward "
                    "field 'reward_model') and reward.weights has no reward_model",
                    r.reward_model)
    return load_reward_model(r.reward_model, cfg.parallel, seed=cfg.run.seed,
                             batch_size=r.reward_model_batch_size, what="reward.reward_model",
                             sync=lambda n: all_ranks_int(n, "max"), prompt_key=RM_PROMPT,
                             normalize=r.reward_model_normalize)


RM_PROMPT = "rm_prompt"
"""The example field holding its prompt as the reward model reads it."""


def _reward_model_prompts(cfg, examples: list[dict], trained_chat: bool | None):
    """Each example's prompt as the reward model was trained to read it, in ``rm_prompt``: the
    same messages (``data.template`` around the question) through the reward model's own
    tokenizer and chat template (or none, as it was trained), without ``data.system_prompt``
    (reward-model training renders the user turn alone). The policy's prompt went to the
    reward model as it was: another tokenizer's markup, a system turn it never saw. When the
    policy's prompt opens the thought and the reward model's does not, the opened thought
    follows the reward model's prompt, so the completion reads as a whole answer. Returns the
    reward model's tokenizer."""
    from r1fast.data import load_tokenizer
    from r1fast.pipeline.sft_data import thought_opened_by

    d = cfg.data
    tokenizer = load_tokenizer(cfg.reward.reward_model)
    as_trained = dataclasses.replace(d, system_prompt=None, chat_template=bool(
        d.chat_template if trained_chat is None else trained_chat))
    changed = doubled = turns_left = 0
    own = d.path is None and d.template is None  # a synthetic task's own prompt, as written
    chat = as_trained.chat_template and tokenizer.has_chat_template
    for ex in examples:
        if own:
            text = ex["prompt"]
        elif chat:
            text = render_prompt(ex, tokenizer, as_trained)
        else:  # the user turn's text, as reward-model training reads a prompt without one
            messages = prompt_messages(ex, as_trained)
            text, turns_left = messages[-1]["content"], turns_left + (len(messages) > 1)
        opened = thought_opened_by(ex["prompt"])
        if opened and not opens_thought(text):
            text += opened
        doubled += opens_thought(text) and not opened
        changed += text != ex["prompt"]
        ex[RM_PROMPT] = text
    if changed:
        log.info("%d of %d prompts go to reward.reward_model=%s as it was trained to read them "
                 "(its tokenizer%s%s%s)", changed, len(examples), cfg.reward.reward_model,
                 "'s chat template" if chat else ", no chat template",
                 "; without data.system_prompt" if d.system_prompt else "",
                 f"; {turns_left} conversations as their last user turn" if turns_left else "")
    if doubled:
        log.warning("reward.reward_model=%s's chat template opens the thought but this run's "
                    "does not: %d completions reach it after a <think> of its prompt, then their "
                    "own", cfg.reward.reward_model, doubled)
    return tokenizer


def _warn_of_raw_scores(cfg, meta: dict) -> None:
    """A WARNING where the reward model's raw scores (arbitrary offset, a spread that grows with
    its training) set the size of the advantages: added to other rewards in one row
    (``reward_model`` among ``reward.weights``), or under an estimator that does not divide by
    the group's spread (drgrpo, rloo). Routed rows under grpo are scored by it alone and
    normalised per group: the scale cancels."""
    r = cfg.reward
    mixed = "reward_model" in r.weights and any(w for k, w in r.weights.items()
                                                 if k != "reward_model")
    estimator = cfg.algo.estimator
    if r.reward_model_normalize or not (mixed or estimator != "grpo"):
        return
    spread = (f"held-out scores {meta['score_mean']:.3g} +- {meta['score_std']:.3g}"
              if meta.get("score_std") is not None else "a scale it did not record")
    why = ("is added to the rule rewards of each row (reward.weights)" if mixed else
           f"sets the advantages' size under algo.estimator={estimator!r} (no division by the "
           f"group's spread)")
    log.warning("reward.reward_model=%s's raw score (%s) %s: set reward.reward_model_normalize "
                "= true to standardise it", r.reward_model, spread, why)


def _warn_of_cut_texts(cfg, examples: list[dict], tokenizer, max_length: int | None) -> None:
    """A WARNING when the longest prompts (by characters: the 64 longest are encoded) and
    ``rollout.max_new_tokens`` of completion (counted in the reward model's tokens, roughly)
    can exceed the reward model's ``max_length``: such texts lose their start."""
    if not max_length or not examples:
        return
    longest = sorted(examples, key=lambda ex: len(ex[RM_PROMPT]))[-64:]
    prompt = max(len(tokenizer.encode(ex[RM_PROMPT], add_bos=True)) for ex in longest)
    if prompt + cfg.rollout.max_new_tokens + 1 > max_length:  # + its eos
        log.warning("reward.reward_model=%s reads %d tokens, but the longest prompts take %d "
                    "and rollout.max_new_tokens=%d: longer texts are scored on their last %d "
                    "tokens, their start cut (counted each step in reward_model_texts_cut)",
                    cfg.reward.reward_model, max_length, prompt, cfg.rollout.max_new_tokens,
                    max_length)
