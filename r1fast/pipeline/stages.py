"""The stages of the DeepSeek-R1 pipeline, as functions from model folders and datasets to new
model folders and datasets. Each runs alone (Python API or ``r1fast stage NAME``) and hands its
artifacts to the next by path:

- :func:`pretrain`  (synthetic demo only) a tiny base model from scratch on a noisy corpus;
- :func:`grpo`      RL with rule rewards (R1-Zero when started from a base model);
- :func:`sft`       supervised fine-tuning (cold start, rejection-sampled data, distillation);
- :func:`rejection_sample`  k samples per prompt, keep the correct and readable ones (JSONL),
  every dropped sample counted by reason (:mod:`r1fast.pipeline.filters`);
- :func:`distill`   a teacher writes answers, a dense student is fine-tuned on them;
- :func:`reward_model`  a reward model (scalar head, Bradley-Terry) trained on preference
  pairs, for stage 4's general prompts;
- :func:`evaluate`  pass@1 from k samples and cons@k (see :mod:`r1fast.pipeline.evaluate`).

Every model folder holds Hugging Face safetensors, ``config.json`` / ``r1fast_config.json`` and
its tokenizer; a Hugging Face checkpoint folder works as a starting point, with its tokenizer and
chat template. :func:`load_problems` reads a user's dataset file (see :mod:`r1fast.data.files`)
with prompts rendered for a model folder's tokenizer.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any, Sequence

from r1fast.data import CharTokenizer, load_tokenizer, sft_target
from r1fast.pipeline.filters import RejectionFilterConfig
from r1fast.atomic import write_text_atomic
from r1fast.policy.config import ModelConfig, ParallelConfig
from r1fast.policy.hf_checkpoint import load_model_config
from r1fast.policy.optim import OptimConfig
from r1fast.rollout.sampler import SamplingConfig

log = logging.getLogger("r1fast.pipeline")


def write_jsonl(rows: Sequence[dict], path: str | Path) -> Path:
    """Atomically write ``rows`` as JSON lines."""
    return write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------------- supervised

def warmup_steps(out_dir: str | Path, steps: int, overwrite: bool) -> int:
    """The stage helpers' warmup: a tenth of the run, at most 10 steps; a run that resumes in
    ``out_dir`` keeps its checkpoint's (a rerun with more steps would otherwise change the
    schedule, which the resume refuses as an optimizer setting that cannot apply)."""
    kept = None if overwrite else checkpoint_warmup(out_dir)
    return min(10, steps // 10) if kept is None else kept


def checkpoint_warmup(out_dir: str | Path) -> int | None:
    """``optim.warmup_steps`` of the checkpoint a run in ``out_dir`` would resume from, None
    without one."""
    import tomllib

    from r1fast.train.checkpoint import latest_checkpoint, read_meta

    last = latest_checkpoint(Path(out_dir) / "checkpoints")
    saved = read_meta(last).get("config") if last is not None else None
    kept = tomllib.loads(saved).get("optim", {}).get("warmup_steps") if saved else None
    return None if kept is None else int(kept)


def sft(examples: Sequence[dict], out_dir: str | Path, *, init_from: str | Path | None = None,
        model: ModelConfig | None = None, steps: int = 100, batch_size: int = 32,
        lr: float = 1e-3, loss_on_prompt: bool = False, seed: int = 0,
        parallel: ParallelConfig | None = None, progress: bool = False,
        tokenizer=None, overwrite: bool = False, chat_template: bool = True,
        drop_long: bool = False) -> Path:
    """Fine-tune ``init_from`` (or a fresh ``model``) on ``{"prompt", "completion"}`` rows;
    returns the model folder ``out_dir/model``. The tokenizer is ``init_from``'s, else
    ``tokenizer`` (e.g. a teacher's), else the character tokenizer; with a chat template (and
    ``chat_template``) prompts are rendered in it and answers end its turn
    (:func:`~r1fast.pipeline.sft_data.render_prompts`). A rerun into ``out_dir``
    resumes its run; ``overwrite`` starts over from step 0 instead (the old run's files move
    to ``out_dir/previous_<time>/``). A row longer than the model's positions is an error,
    or with ``drop_long`` is dropped (a teacher's long answers), counted in a warning and in
    ``out_dir/data_summary.json`` (``rows``, ``dropped_too_long``, ``trained_rows``)."""
    from r1fast.pipeline.sft_data import drop_long_rows, render_prompts
    from r1fast.train.sft import SFTConfig, SFTTrainer

    if (init_from is None) == (model is None):
        raise ValueError("give exactly one of init_from (a model folder) or model (a config)")
    cfg = SFTConfig(model=model or load_model_config(str(init_from)),
                    parallel=parallel or ParallelConfig(),
                    optim=OptimConfig(lr=lr, warmup_steps=warmup_steps(out_dir, steps, overwrite),
                                      lr_decay_style="cosine", min_lr=lr / 10),
                    steps=steps, batch_size=batch_size, loss_on_prompt=loss_on_prompt,
                    init_from=None if init_from is None else str(init_from),
                    out_dir=str(out_dir), seed=seed, progress=progress, resume=not overwrite,
                    overwrite=overwrite)
    if init_from:
        tokenizer = load_tokenizer(init_from)
    tokenizer = tokenizer or CharTokenizer()
    # a chat model is trained as it is prompted: the chat template around each prompt, the
    # template's end of turn after each answer (rows sampled in another format rendered again)
    rows = render_prompts(examples, tokenizer, chat_template=chat_template)
    dropped = 0
    if drop_long:
        rows, dropped = drop_long_rows(rows, tokenizer, cfg.model.max_position_embeddings)
    trainer = SFTTrainer(cfg, rows, tokenizer)  # moves an overwritten run's files aside first
    summary = {"rows": len(rows) + dropped, "dropped_too_long": dropped, "trained_rows": len(rows)}
    if trainer.engine.is_logger:  # one writer under torchrun (the temporary file is shared)
        write_text_atomic(Path(out_dir) / "data_summary.json", json.dumps(summary, indent=1) + "\n")
    return trainer.fit()


def pretraining_corpus(examples: Sequence[dict], noise: float, seed: int = 0) -> list[dict]:
    """The demo's stand-in for web text: worked problems in the answer format, where a fraction
    ``noise`` of the final answers is wrong (a base model is a mixed-quality imitator)."""
    rng = random.Random(seed)
    rows = []
    for ex in examples:
        answer = ex["answer"]
        if rng.random() < noise and answer.lstrip("-").isdigit():
            answer = str(int(answer) + rng.choice([-10, -2, -1, 1, 2, 10]))
        rows.append({"prompt": ex["prompt"], "completion": sft_target(ex["solution_cot"], answer)})
    return rows


def pretrain(examples: Sequence[dict], out_dir: str | Path, model: ModelConfig, *,
             noise: float = 0.3, steps: int = 300, batch_size: int = 32, lr: float = 3e-3,
             seed: int = 0, **kw) -> Path:
    """A tiny base model from scratch on a noisy corpus of worked problems (all tokens)."""
    corpus = pretraining_corpus(examples, noise, seed)
    return sft(corpus, out_dir, model=model, steps=steps, batch_size=batch_size, lr=lr,
               loss_on_prompt=True, seed=seed, **kw)


def mix_sft_data(rows: Sequence[dict], mix: str | Path | Sequence[dict], ratio: float,
                 seed: int = 0) -> tuple[list[dict], dict]:
    """R1 stage 3's data: ``rows`` (reasoning) with non-reasoning rows (a JSONL path or a
    list) making up ``ratio`` of the result, deterministically from ``seed``; returns (rows,
    counts). See :mod:`r1fast.pipeline.sft_data`."""
    from r1fast.pipeline.sft_data import mix_non_reasoning, read_sft_rows

    extra = read_sft_rows(mix) if isinstance(mix, (str, Path)) else list(mix)
    return mix_non_reasoning(rows, extra, ratio, seed)


def cold_start_data(examples: Sequence[dict]) -> list[dict]:
    """Clean, readable chains of thought ending in the boxed answer (R1's cold start)."""
    return [{"prompt": ex["prompt"], "completion": sft_target(ex["solution_cot"], ex["answer"])}
            for ex in examples]


# ---------------------------------------------------------------------------- RL

def grpo(init_from: str | Path, out_dir: str | Path, *, overrides: Sequence[str] = (),
         recipe: str | Path | None = None,
         language: str | None = None) -> tuple[Path, list[dict]]:
    """GRPO from the model folder ``init_from`` (its architecture and tokenizer); returns
    (``out_dir/model``, metrics rows). ``language`` (R1 stage 2): add the language-consistency
    reward toward that language (``reward.language``; weight 1.0 unless the recipe's
    ``reward.weights.language`` says otherwise), logged as ``reward/language``."""
    from r1fast.train.config import load_train_config
    from r1fast.train.grpo import GRPOTrainer

    extra = [] if language is None else [f"--reward.language={language}"]
    cfg = load_train_config(recipe, [*overrides, *extra, f"--run.init_from={init_from}",
                                     f"--run.out_dir={out_dir}"])
    trainer = GRPOTrainer(cfg)
    rows = trainer.fit()
    return trainer.engine.save_model(trainer.task.tokenizer, Path(out_dir) / "model"), rows


# ---------------------------------------------------------------------------- sampling stages

def load_problems(path: str | Path, model_dir: str | Path, *, preset: str | None = None,
                  prompt_key: str | None = None, answer_key: str | None = None,
                  template: str | None = None, chat_template: bool = True,
                  system_prompt: str | None = None) -> list[dict]:
    """Problems of a dataset file, each with its ``prompt`` rendered for ``model_dir``'s
    tokenizer (template, then chat template), ready for the sampling stages; ``chat_rendered``
    says whether the chat template was applied (rejection sampling then closes each kept
    answer's turn as the template does)."""
    from r1fast.data.files import load_examples
    from r1fast.train.config import DataConfig
    from r1fast.train.task import prompt_messages, render_prompt

    data = DataConfig(template=template, chat_template=chat_template,
                      system_prompt=system_prompt)
    tokenizer = load_tokenizer(model_dir)
    examples, _ = load_examples(path, preset=preset, prompt_key=prompt_key,
                                answer_key=answer_key)
    for ex in examples:
        ex["prompt"] = render_prompt(ex, tokenizer, data)
        ex["prompt_messages"] = prompt_messages(ex, data)  # to render it again elsewhere
        ex["chat_rendered"] = bool(chat_template and tokenizer.has_chat_template)
    return examples


def rejection_sample(model_dir: str | Path, examples: Sequence[dict], out_path: str | Path, *,
                     k: int = 8, temperature: float = 1.0, top_p: float = 1.0,
                     max_new_tokens: int = 64, seed: int = 0,
                     keep_per_prompt: int | None = None, keep: str = "correct",
                     filters: RejectionFilterConfig | None = None,
                     overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    """Sample ``k`` answers per prompt and keep those that pass ``filters`` (default: R1's
    rules, :class:`~r1fast.pipeline.filters.RejectionFilterConfig`; or the preset ``keep``:
    "correct", "well_formed" or "all"), at most ``keep_per_prompt`` per prompt, as
    ``{"prompt", "completion", "id", "prompt_rendered"}`` JSONL rows (``prompt_rendered``: the
    prompt is the exact text the model was given, chat template included, so an SFT recipe
    does not template it again; answers to ``chat_rendered`` prompts end with the template's
    end of turn, ``completion_ends_turn``). The summary (kept, rejected count per reason) is also
    written next to them as ``<out>.summary.json``. An existing ``out_path`` is an error
    unless ``overwrite``; keeping no sample is an error (the summary is still written).
    Returns (path, summary)."""
    if filters is None:
        filters = RejectionFilterConfig.for_keep(keep)
    elif keep != "correct":
        raise ValueError(f"give keep ({keep!r}) or filters, not both")
    path = Path(out_path)
    if path.is_dir():
        raise ValueError(f"rejection sampling output {path} is a folder; give a .jsonl path")
    if path.exists() and not overwrite:
        raise ValueError(f"rejection sampling output {path} already exists; give a new path or "
                         f"overwrite=True (--overwrite) to replace it")
    from r1fast.pipeline.evaluate import checker
    from r1fast.pipeline.filters import filter_samples, resolve_checkers
    from r1fast.pipeline.generation import load_model, sample_with_flags

    checkers: dict[str, Any] = {}
    resolve_checkers(examples, lambda ex: checker(ex, checkers), filters)  # before sampling
    policy, tok = load_model(model_dir)
    cfg = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    samples = sample_with_flags(policy, tok, [ex["prompt"] for ex in examples], k, cfg,
                                seed=seed)
    rows, summary = filter_samples(examples, samples.texts, lambda ex: checker(ex, checkers),
                                   filters, keep_per_prompt, truncated=samples.truncated)
    summary["sampling"] = sampling_record(model_dir, examples, k=k, temperature=temperature,
                                          top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    summary["keep_per_prompt"] = keep_per_prompt
    summary_path = path.with_suffix(".summary.json")
    summary["summary_path"] = str(summary_path)
    write_text_atomic(summary_path, json.dumps(summary, indent=1) + "\n")
    if not rows:
        dropped = {r: n for r, n in summary["rejected"].items() if n}
        raise ValueError(f"rejection sampling kept none of {summary['samples']} samples "
                         f"(dropped: {dropped}); nothing written to {path}, counts in "
                         f"{summary_path}")
    return write_jsonl(sampled_rows(rows, examples, tok), path), summary


def sampling_record(model_dir, examples: Sequence[dict], **settings) -> dict[str, Any]:
    """What a rejection-sampling summary records of how its rows were drawn: the model, the
    settings and a hash of the prompts (a rerun that would draw the same reuses them)."""
    prompts = hashlib.sha256(json.dumps([ex["prompt"] for ex in examples]).encode())
    return {"model": str(model_dir), **settings, "prompts_sha256": prompts.hexdigest()}


def _reusable_teacher_data(path: Path, sampling: dict, filters: RejectionFilterConfig,
                           keep_per_prompt: int | None) -> bool:
    """Whether ``path`` (a distillation's earlier teacher data) was drawn exactly as this run
    would draw it (its summary's sampling record and rules); another draw there is an error."""
    if not path.exists():
        return False
    summary_path = path.with_suffix(".summary.json")
    stored = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    want = json.loads(json.dumps({"sampling": sampling, "rules": dataclasses.asdict(filters),
                                  "keep_per_prompt": keep_per_prompt}))
    differ = [k for k in want if stored.get(k) != want[k]]
    if differ:
        raise ValueError(f"{path} holds teacher data drawn with other {' and '.join(differ)} "
                         f"(see {summary_path}); give --overwrite (overwrite=True) to sample "
                         f"again, or --data {path} (teacher_data=) to train on it as it is")
    log.info("%s was drawn with these settings: reused (not sampled again)", path)
    return True


def sampled_rows(rows: Sequence[dict], examples: Sequence[dict], tok) -> list[dict]:
    """Kept samples as SFT rows: the prompt as the model saw it (``prompt_rendered``), an
    answer to a chat-templated prompt closing its turn as the template does (SFT's target),
    and what another tokenizer needs to render the row again: the prompt's ``messages``, the
    bare ``response`` and the ``prompt_format`` it was sampled in
    (:func:`~r1fast.pipeline.sft_data.render_prompts`)."""
    from r1fast.pipeline.sft_data import (chat_turn_end, end_turn, prompt_format,
                                          thought_opened_by)

    by_prompt = {ex["prompt"]: ex for ex in examples}
    chat = any(ex.get("chat_rendered") is True for ex in examples)
    closing = chat_turn_end(tok) if chat else ("", False)
    formats = {True: prompt_format(tok) if chat else "plain", False: "plain"}
    out = []
    for r in rows:
        ex = by_prompt[r["prompt"]]
        rendered = ex.get("chat_rendered") is True
        messages = ex.get("prompt_messages") or (
            None if rendered else [{"role": "user", "content": ex["prompt"]}])
        row = end_turn(r, *closing) if rendered else dict(r)
        out.append({**row, "prompt_rendered": True, "prompt_format": formats[rendered],
                    # the thought its prompt opened, so a template that does not open it
                    # renders a well-formed answer
                    "response": thought_opened_by(r["prompt"]) + r["completion"],
                    **({"messages": messages} if messages else {})})
    return out


def distill(teacher_dir: str | Path, examples: Sequence[dict], out_dir: str | Path, *,
            student: ModelConfig | None = None, student_init: str | Path | None = None,
            k: int = 4, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 64,
            steps: int = 200, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
            keep: str = "correct", filters: RejectionFilterConfig | None = None,
            keep_per_prompt: int | None = None,
            teacher_data: str | Path | None = None,
            overwrite: bool = False) -> tuple[Path, dict]:
    """The teacher answers ``examples`` (k samples each, kept by ``filters`` or the preset
    ``keep``, correct ones by default, as R1's 800k distillation set was; written to
    ``out_dir/teacher_data.jsonl``, replaced only with ``overwrite``), then a dense student
    (``student_init`` folder or a fresh ``student`` config) is fine-tuned on them (from step 0
    with ``overwrite``, else resuming a run in ``out_dir``).
    ``teacher_data``: a JSONL the teacher already wrote (e.g. by :func:`rejection_sample`),
    used instead of generating again. Returns (student folder, data stats)."""
    from r1fast.pipeline.sft_data import read_sft_rows

    if (student_init is None) == (student is None):
        raise ValueError("give exactly one of student_init (a model folder) or student (a "
                         "config)")
    out_dir = Path(out_dir)
    if filters is not None and keep != "correct":
        raise ValueError(f"give keep ({keep!r}) or filters, not both")
    filters = filters or RejectionFilterConfig.for_keep(keep)
    drawn = out_dir / "teacher_data.jsonl"  # a rerun resumes: it reuses its own draw
    if teacher_data is None and not overwrite and _reusable_teacher_data(
            drawn, sampling_record(teacher_dir, examples, k=k, temperature=temperature,
                                   top_p=top_p, max_new_tokens=max_new_tokens, seed=seed),
            filters, keep_per_prompt):
        teacher_data = drawn
    if teacher_data is not None:
        data_path, stats = Path(teacher_data), {"reused": str(teacher_data)}
    else:
        data_path, stats = rejection_sample(teacher_dir, examples, drawn, k=k,
                                            temperature=temperature, top_p=top_p,
                                            max_new_tokens=max_new_tokens, seed=seed,
                                            keep_per_prompt=keep_per_prompt, filters=filters,
                                            overwrite=overwrite)
    rows = read_sft_rows(data_path)
    # a fresh student speaks the teacher's tokenizer (its prompts and answers are in it)
    tokenizer = None if student_init else load_tokenizer(teacher_dir)
    if student is not None and tokenizer.vocab_size > student.vocab_size:
        wide = -(-tokenizer.vocab_size // 8) * 8  # every token a row, a multiple of 8
        log.warning("distill: the student's model.vocab_size=%d cannot hold the teacher's "
                    "tokenizer (%d tokens): the fresh student gets vocab_size=%d (or give "
                    "student_init / --student-init, a model with its own tokenizer)",
                    student.vocab_size, tokenizer.vocab_size, wide)
        student = student.replace(vocab_size=wide)
    # an answer the teacher could write may not fit a smaller student's context
    model = sft(rows, out_dir, init_from=student_init, model=student, steps=steps,
                batch_size=batch_size, lr=lr, seed=seed, overwrite=overwrite,
                tokenizer=tokenizer, drop_long=True)
    counts = json.loads((Path(out_dir) / "data_summary.json").read_text())
    return model, {**stats, "dropped_too_long": counts["dropped_too_long"],
                   "trained_rows": counts["trained_rows"]}


def reward_model(init_from: str | Path, pairs: str | Path, out_dir: str | Path, *,
                 test: str | Path | None = None, steps: int = 100, batch_size: int = 16,
                 lr: float = 1e-4, seed: int = 0,
                 parallel: ParallelConfig | None = None) -> tuple[Path, dict]:
    """R1 stage 4's reward model: ``init_from``'s backbone with a scalar head, trained with the
    Bradley-Terry loss on ``{"prompt", "chosen", "rejected"}`` pairs (a JSONL path); held-out
    accuracy on ``test`` before and after. Returns (the reward-model folder that ``[reward]
    reward_model`` names, summary)."""
    from r1fast.train.reward_model import RewardModelTrainConfig, RewardModelTrainer

    cfg = RewardModelTrainConfig(init_from=str(init_from), data=str(pairs),
                                 test=None if test is None else str(test),
                                 out_dir=str(out_dir), parallel=parallel or ParallelConfig(),
                                 optim=OptimConfig(lr=lr, warmup_steps=warmup_steps(
                                     out_dir, steps, overwrite=False)),
                                 steps=steps, batch_size=batch_size, seed=seed)
    summary = RewardModelTrainer(cfg).fit()
    return Path(summary["model"]), summary


def evaluate(model_dir: str | Path, examples: Sequence[dict], *, k: int = 8,
             temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int = 64,
             seed: int = 0, language: str = "en") -> dict[str, Any]:
    """pass@1 (from k samples) and cons@k of a model folder on held-out examples, each with
    its standard error over problems, and the chain of thought's mixing of languages other
    than ``language``."""
    from r1fast.pipeline.evaluate import evaluate_model

    return evaluate_model(model_dir, examples, k=k, temperature=temperature, top_p=top_p,
                          max_new_tokens=max_new_tokens, seed=seed,
                          language=language).as_dict()
