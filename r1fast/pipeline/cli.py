"""``r1fast stage NAME ...``: each stage of the R1 pipeline alone, on the demo's task.

    r1fast stage pretrain --out runs/x/base --model tiny-moe --steps 500
    r1fast stage grpo --init runs/x/base/model --out runs/x/zero --run.steps=40
    r1fast stage grpo --init runs/x/cold/model --out runs/x/r1 --language en   # R1 stage 2
    r1fast stage grpo --init runs/x/base/model --out runs/x/g --recipe my_run.toml --steps 20
                                 # a recipe's [model], if it has one, must agree with --init
    r1fast stage sft --init runs/x/base/model --out runs/x/cold --cold-start 200
    r1fast stage rejection-sample --model runs/x/zero/model --out runs/x/rs.jsonl --k 4
    r1fast stage sft --init runs/x/base/model --out runs/x/rs_sft --data runs/x/rs.jsonl \\
        --mix general.jsonl --mix-ratio 0.25                                     # R1 stage 3
    r1fast stage sft --recipe recipes/sky_t1_sft.toml --sft.data=traces.jsonl   # TOML recipe
    r1fast stage distill --teacher runs/x/zero/model --out runs/x/student --student tiny-dense
    r1fast stage reward-model --init runs/x/rs_sft/model --data pairs.jsonl --test pairs_test.jsonl \
        --out runs/x/rm                                                         # R1 stage 4
    r1fast stage grpo --init runs/x/rs_sft/model --out runs/x/s4 --data.path=mixed.jsonl \
        --reward.reward_model=runs/x/rm/model --language en                    # R1 stage 4
    r1fast stage evaluate --model runs/x/zero/model --k 8

Problems are the demo's additions (:mod:`r1fast.pipeline.demo_task`; ``--num-train``,
``--num-test``, ``--seed``), or a user's dataset file with
``--problems FILE [--preset gsm8k|math|...]`` (prompts rendered with the model folder's tokenizer
and chat template as a run's ``[data]`` would: ``--template``, ``--no-chat-template``,
``--system-prompt``, ``--prompt-key`` / ``--answer-key`` mirror its keys; ``grpo`` takes
``--data.path=FILE --data.preset=...`` or a ``--recipe`` like ``r1fast train``). An option the
stage does not read is an error, never ignored. Models are folders written by a previous stage
or Hugging Face checkpoint folders; SFT datasets are ``{"prompt", "completion"}`` rows, TRL
conversations or ShareGPT (.jsonl / .json / .parquet:
:func:`~r1fast.pipeline.sft_data.read_sft_rows`). ``rejection-sample`` prints how many samples
each readability rule dropped and writes that summary next to its JSONL.

    r1fast stage grpo --init ckpt/Qwen3-tiny --out runs/q --data.path=gsm8k.jsonl --data.preset=gsm8k
    r1fast stage evaluate --model runs/q/model --problems gsm8k_test.jsonl --preset gsm8k --k 8
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Callable, Sequence

from r1fast.checks import check_range
from r1fast.cli import ArgumentParser
from r1fast.pipeline import stages
from r1fast.pipeline import demo_task
from r1fast.pipeline.demo import DemoConfig, dense_model, moe_model, pretrain_base, task_overrides
from r1fast.train.config import DEFAULT_LR as GRPO_LR, RunConfig

MODELS = {"tiny-moe": moe_model, "tiny-dense": dense_model}
DEFAULT_STEPS, DEFAULT_LR, PRETRAIN_LR = 200, 1e-3, 3e-3
DEFAULT_PROMPTS = 1024  # demo problems sampled by rejection-sample / distill
SAMPLING = ("k", "temperature", "top_p", "max_new_tokens")
FILTERS = ("keep", "language", "max_chars", "max_paragraph_chars", "min_language_share",
           "allow_code_blocks", "keep_truncated")
PROBLEMS = ("problems", "preset", "template", "chat_template", "system_prompt", "prompt_key",
            "answer_key")
#: the options (argparse dests) each stage reads; giving it any other one is an error, since
#: an option that is accepted and then ignored runs something other than what was asked
STAGE_OPTIONS: dict[str, frozenset[str]] = {name: frozenset(opts) for name, opts in {
    "pretrain": ("out", "model", "scripts", "steps", "lr", "long_share", "greek_share",
                 "greetings", "num_train", "seed", "data_seed"),
    "sft": ("out", "init", "data", "cold_start", "mix", "mix_ratio", "recipe", "steps", "lr",
            "num_train", "seed", "data_seed", "overwrite"),
    "grpo": ("out", "init", "recipe", "steps", "lr", "language", "num_train", "seed"),
    "rejection-sample": ("out", "model", "overwrite", "prompts", "num_train", "seed",
                         "data_seed", "keep_per_prompt", *SAMPLING,
                         *FILTERS, *PROBLEMS),
    "distill": ("out", "teacher", "student", "student_init", "data", "overwrite", "prompts",
                "num_train", "seed", "data_seed", "steps", "lr", "keep_per_prompt", *SAMPLING,
                *FILTERS, *PROBLEMS),
    "evaluate": ("model", "num_test", "seed", "data_seed", "language", *SAMPLING, *PROBLEMS),
}.items()}


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value
    return parse


def _number(lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
            why: str = "") -> Callable[[str], float]:
    """A float option in a range: a value the stage would refuse later (or, worse, run with)
    is refused while parsing, named by its flag."""
    if hi is None:  # no upper bound: still finite (nan and inf fail the check)
        hi, hi_open = math.inf, True

    def parse(text: str) -> float:
        try:
            value = float(text)
            check_range("value", value, lo, hi, lo_open=lo_open, hi_open=hi_open)
        except ValueError as e:
            msg = (str(e).removeprefix("value ") if "must" in str(e)
                   else f"must be a number, got {text!r}")
            raise argparse.ArgumentTypeError(msg + why) from None
        return value
    return parse


def _demo_share(key: str) -> Callable[[str], float]:
    """A DemoConfig field given as a flag, checked by DemoConfig itself (the same bounds as
    ``r1fast demo``'s)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
            DemoConfig(**{key: value})
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e) if "demo" in str(e)
                                             else f"must be a number, got {text!r}") from None
        return value
    return parse


def _language(text: str) -> str:
    from r1fast.rewards.language import LANGUAGE_SCRIPTS

    if text != "none" and text not in LANGUAGE_SCRIPTS:
        raise argparse.ArgumentTypeError(f"must be one of {sorted(LANGUAGE_SCRIPTS)} or 'none', "
                                         f"got {text!r}")
    return text


def _override_keys(overrides: Sequence[str]) -> dict[str, str]:
    """key -> value text of each ``--section.key=value`` (or ``--section.key value``)."""
    out, i = {}, 0
    while i < len(overrides):
        key, eq, value = overrides[i].removeprefix("--").partition("=")
        if not eq and i + 1 < len(overrides):
            value, i = overrides[i + 1], i + 1
        out[key], i = value.strip("\"'"), i + 1
    return out


def _parser(probe: bool = False) -> argparse.ArgumentParser:
    """The stage command line; ``probe``: every default suppressed, so that parsing names
    exactly the options the user wrote."""
    def default(value):
        return argparse.SUPPRESS if probe else value

    ap = ArgumentParser(prog="r1fast stage", description=__doc__.splitlines()[0],
                        argument_default=argparse.SUPPRESS if probe else None,
                        epilog="reward-model has options of its own (--data, --test, "
                               "--batch-size, --save-every, ...): r1fast stage reward-model "
                               "--help")
    ap.add_argument("name", choices=(*STAGES, "reward-model"))
    ap.add_argument("--out", help="output folder (a .jsonl path for rejection-sample)")
    ap.add_argument("--init", help="model folder to start from (sft, grpo)")
    ap.add_argument("--model", help="preset for pretrain (tiny-moe, tiny-dense) or the model "
                    "folder to sample/evaluate")
    ap.add_argument("--scripts", nargs="+", help="pretrain: the character tokenizer also "
                    "writes these scripts (default: greek, the demo corpus's second language; "
                    "cyrillic)")
    ap.add_argument("--teacher", help="teacher model folder (distill)")
    ap.add_argument("--student", choices=tuple(MODELS),
                    help="student preset (distill; default tiny-dense)")
    ap.add_argument("--student-init", help="student model folder to fine-tune (distill)")
    ap.add_argument("--data", help="SFT rows: prompt/completion, TRL messages or ShareGPT "
                    "(sft; distill: the teacher's answers, already sampled)")
    ap.add_argument("--cold-start", type=_at_least(1), help="sft on N clean chains of thought")
    ap.add_argument("--mix", help="sft: non-reasoning SFT rows to mix in")
    ap.add_argument("--mix-ratio", type=_number(0, 1, lo_open=True, hi_open=True, why=(
                    " (with --mix, a share > 0, as sft.mix_ratio with sft.mix)")),
                    help="sft: share of the SFT set from --mix (R1: 0.25)")
    ap.add_argument("--recipe", help="sft, grpo: a TOML recipe (e.g. recipes/sky_t1_sft.toml); "
                    "override its keys as --section.KEY=VALUE")
    # grpo sets run.steps / optim.lr only when given (else the recipe's, else the trainer's)
    ap.add_argument("--steps", type=_at_least(1), help=f"optimizer steps (default "
                    f"{DEFAULT_STEPS}; grpo: sets run.steps, default the recipe's, else "
                    f"{RunConfig.steps})")
    ap.add_argument("--lr", type=_number(0, lo_open=True), help=f"learning rate (default "
                    f"{DEFAULT_LR:g}, pretrain {PRETRAIN_LR:g}; grpo: sets optim.lr, default the "
                    f"recipe's, else {GRPO_LR:g})")
    ap.add_argument("--long-share", type=_demo_share("long_share"),
                    default=default(DemoConfig.long_share),
                    help="pretrain: share of corpus answers that reason column by column")
    ap.add_argument("--greek-share", type=_demo_share("greek_share"),
                    default=default(DemoConfig.greek_share),
                    help="pretrain: chance that a connective of a corpus chain is Greek")
    ap.add_argument("--greetings", type=_at_least(0),
                    default=default(DemoConfig.pretrain_greetings),
                    help="pretrain: greeting rows (half warm, half poor) in the corpus")
    ap.add_argument("--k", type=_at_least(1), default=default(4), help="samples per prompt")
    ap.add_argument("--temperature", type=_number(0), default=default(0.6))
    ap.add_argument("--top-p", type=_number(0, 1, lo_open=True), help="nucleus sampling "
                    "(default: evaluate 0.95, as R1's report; rejection-sample, distill 1.0)")
    ap.add_argument("--keep-per-prompt", type=_at_least(1), help="rejection-sample, distill: "
                    "at most N kept answers per prompt (default: every distinct one, up to --k)")
    ap.add_argument("--prompts", type=_at_least(1), help=f"problems to sample (default: the "
                    f"last {DEFAULT_PROMPTS} demo problems or all of them if fewer, or every "
                    f"row of --problems; its first N)")
    ap.add_argument("--num-train", type=_at_least(1), default=default(3000))
    ap.add_argument("--num-test", type=_at_least(1), default=default(DemoConfig.num_test))
    ap.add_argument("--seed", type=_at_least(0), default=default(0),
                    help="seed of sampling and training")
    ap.add_argument("--data-seed", type=int, default=default(0), help="seed of the demo's "
                    "problem sets: the same problems whatever --seed, so runs that differ in "
                    "--seed differ in sampling only")
    ap.add_argument("--max-new-tokens", type=_at_least(1),
                    default=default(DemoConfig.max_new_tokens))
    ap.add_argument("--problems", help="dataset file/folder of problems (rejection-sample, "
                    "distill, evaluate) instead of the demo's additions")
    ap.add_argument("--preset", help="column layout of --problems (gsm8k, math, dapo, ...)")
    ap.add_argument("--template", help="prompt template for --problems ({question}, or r1-zero)")
    ap.add_argument("--chat-template", action=argparse.BooleanOptionalAction,
                    default=default(True), help="--problems: render the prompts with the "
                    "model's chat template (--no-chat-template: plain text, as a run trained "
                    "with data.chat_template = false)")
    ap.add_argument("--system-prompt", help="--problems: a system message before each prompt "
                    "(chat template only), as a run's data.system_prompt")
    ap.add_argument("--prompt-key", help="--problems: column of the prompt (without --preset)")
    ap.add_argument("--answer-key", help="--problems: column of the answer (without --preset)")
    ap.add_argument("--language", type=_language, help="grpo: add the language-consistency "
                    "reward toward this language (en, zh, el, ...); rejection-sample, distill: "
                    "the thought's language ('none': no language rule; default en); evaluate: "
                    "the language that language mixing is measured against (default en)")
    ap.add_argument("--keep", default=default("correct"),
                    choices=("correct", "well_formed", "all"),
                    help="rejection-sample, distill: rule preset (all = only drop empty answers and "
                    "duplicates)")
    ap.add_argument("--max-chars", type=_at_least(1),
                    help="rejection-sample: drop longer completions")
    ap.add_argument("--max-paragraph-chars", type=_at_least(0),
                    help="rejection-sample: longest paragraph kept (default 2000; 0: no limit)")
    ap.add_argument("--min-language-share", type=_number(0, 1),
                    help="rejection-sample: least share of thought words in --language (0.95)")
    ap.add_argument("--allow-code-blocks", action="store_true",
                    help="rejection-sample: keep completions with fenced code blocks")
    ap.add_argument("--keep-truncated", action="store_true",
                    help="rejection-sample: keep completions cut at --max-new-tokens (SFT "
                         "then ends them with the eos)")
    ap.add_argument("--overwrite", action="store_true",
                    help="rejection-sample, distill: replace an existing output JSONL; sft, "
                         "distill: train from step 0 in an --out that holds a run (its files "
                         "move to previous_<time>/; without it a rerun resumes)")
    return ap


def _given(argv: Sequence[str]) -> frozenset[str]:
    """The options (dests) written on the command line, told apart from defaulted ones."""
    return frozenset(vars(_parser(probe=True).parse_known_args(argv)[0]))


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


class _Run:
    """One parsed command line; each stage is a method returning what it prints."""

    def __init__(self, ap: argparse.ArgumentParser, args: argparse.Namespace,
                 overrides: list[str], given: frozenset[str]):
        self.ap, self.args, self.overrides, self.given = ap, args, overrides, given
        self.steps = DEFAULT_STEPS if args.steps is None else args.steps
        self.lr = DEFAULT_LR if args.lr is None else args.lr

    @property
    def train(self) -> list[dict]:
        a = self.args
        return demo_task.problems(a.num_train, "train", a.data_seed)

    def unused(self, *dests: str, why: str) -> None:
        """An error when one of ``dests`` was given: in this case the stage does not read it."""
        given = [_flag(d) for d in dests if d in self.given]
        if given:
            self.ap.error(f"stage {self.args.name} does not use {', '.join(given)} {why}")

    def problems(self, model_dir: str, demo: Callable[[], list[dict]]) -> list[dict]:
        """The ``--problems`` file's rows, else ``demo()`` (generated only then)."""
        if self.args.problems is None:
            self.unused("preset", "template", "chat_template", "system_prompt", "prompt_key",
                        "answer_key", why="without --problems (they describe its rows)")
            self.demo_task_fits(model_dir, "--problems FILE")
            return demo()
        self.unused("num_train", "num_test", "data_seed",
                    why="with --problems (its rows are the problems)")
        a = self.args
        return stages.load_problems(a.problems, model_dir, preset=a.preset, template=a.template,
                                    chat_template=a.chat_template, system_prompt=a.system_prompt,
                                    prompt_key=a.prompt_key, answer_key=a.answer_key)

    def sampled_problems(self, model_dir: str) -> list[dict]:
        """What rejection-sample / distill answer: ``--prompts`` of the demo's training
        problems (the last ones: a cold start trains on the first) or of ``--problems``."""
        rows = self.problems(model_dir, lambda: self.train)
        n = self.args.prompts
        if n is None:  # not asked for: up to the default, never an error
            n = min(DEFAULT_PROMPTS, len(rows)) if self.args.problems is None else len(rows)
        if n > len(rows):
            where = ("--problems " + self.args.problems if self.args.problems
                     else "the demo's --num-train")
            self.ap.error(f"--prompts {n} is more than the {len(rows)} problems of {where}")
        return rows[:n] if self.args.problems else rows[-n:]

    def demo_task_fits(self, model_dir: str, instead: str) -> None:
        """The demo's problems are raw ``Q: ... A:`` text for r1fast's character tokenizer: a
        model with another tokenizer (a Hugging Face chat model) would be prompted without its
        chat template, silently; that is an error naming what to give ``instead``."""
        from r1fast.data import CharTokenizer, load_tokenizer

        tokenizer = load_tokenizer(model_dir)
        if not isinstance(tokenizer, CharTokenizer):
            self.ap.error(f"the demo's problems are written for r1fast's character tokenizer, "
                          f"but {model_dir} has {tokenizer!r}; give {instead}")

    def need(self, *names: str) -> None:
        missing = [_flag(n) for n in names if getattr(self.args, n) is None]
        if missing:
            self.ap.error(f"stage {self.args.name} needs " + ", ".join(missing))

    def filters(self):
        import dataclasses

        from r1fast.pipeline.filters import RejectionFilterConfig

        a = self.args
        rules = {k: v for k, v in (("max_chars", a.max_chars),
                                   ("max_paragraph_chars", a.max_paragraph_chars),
                                   ("min_language_share", a.min_language_share)) if v is not None}
        if a.language is not None:
            rules["language"] = None if a.language == "none" else a.language
        if a.allow_code_blocks:
            rules["reject_code_blocks"] = False
        if a.keep_truncated:
            rules["reject_truncated"] = False
        return dataclasses.replace(RejectionFilterConfig.for_keep(a.keep), **rules)

    def pretrain(self) -> object:
        a = self.args
        self.need("out", "model")
        if a.model not in MODELS:
            self.ap.error(f"--model must be one of {tuple(MODELS)} for pretrain, got {a.model!r}")
        tokenizer = None
        if a.scripts:
            from r1fast.data import CharTokenizer
            tokenizer = CharTokenizer.with_scripts(*a.scripts)
        return pretrain_base(self.train, a.out, MODELS[a.model](), steps=self.steps,
                             lr=PRETRAIN_LR if a.lr is None else a.lr,
                             long_share=a.long_share, greek_share=a.greek_share, seed=a.seed,
                             greetings=a.greetings, tokenizer=tokenizer)

    def sft(self) -> object:
        a = self.args
        if a.recipe is not None:
            return self.sft_recipe()
        self.need("out", "init")
        if (a.data is None) == (a.cold_start is None):
            self.ap.error("sft needs exactly one of --data FILE.jsonl or --cold-start N")
        if (a.mix is None) != (a.mix_ratio is None):
            self.ap.error("--mix FILE and --mix-ratio R go together")
        if a.data is not None:
            from r1fast.pipeline.sft_data import read_sft_rows

            self.unused("num_train", "data_seed",
                        why="with --data (they make --cold-start's demo problems)")
            rows = read_sft_rows(a.data)
        else:
            if a.cold_start > a.num_train:
                self.ap.error(f"--cold-start {a.cold_start} is more than --num-train "
                              f"{a.num_train} demo problems")
            self.demo_task_fits(a.init, "--data FILE.jsonl")
            rows = stages.cold_start_data(self.train[:a.cold_start])
        if a.mix is not None:
            rows, counts = stages.mix_sft_data(rows, a.mix, a.mix_ratio, a.seed)
            print(json.dumps({"mix": counts}))
        return stages.sft(rows, a.out, init_from=a.init, steps=self.steps, lr=self.lr,
                          seed=a.seed, overwrite=a.overwrite)

    def sft_recipe(self) -> object:
        from r1fast.pipeline.sft_recipe import load_sft_recipe, run_sft_recipe

        given = sorted(_flag(d) for d in self.given - {"name", "recipe"})
        if given:
            self.ap.error(f"with --recipe, set {', '.join(given)} in the recipe or as "
                          f"--sft.KEY=VALUE (e.g. --sft.data=FILE, --optim.lr=1e-5, --sft.seed=1)")
        out, summary = run_sft_recipe(load_sft_recipe(self.args.recipe, self.overrides))
        print(json.dumps(summary))
        return out

    def grpo(self) -> object:
        a = self.args
        self.need("out", "init")
        if a.language == "none":
            self.ap.error("grpo --language: 'none' is for rejection-sample and distill; "
                          "omit --language for no language reward")
        written = _override_keys(self.overrides)
        # the demo task's options (arithmetic's digits, its template) fit no other data.task
        own_data = (a.recipe is not None or "data.path" in written
                    or written.get("data.task", "arithmetic") != "arithmetic")
        if own_data:
            self.unused("num_train", why="with --recipe, --data.path or another --data.task "
                                         "(the demo task's size)")
        flags = [f"--{key}={getattr(a, dest)}" for dest, key in (
            ("steps", "run.steps"), ("lr", "optim.lr"), ("seed", "run.seed"),
            ("seed", "data.seed")) if dest in self.given]
        # keys the stage writes after the user's overrides: an override of one would be dropped
        sets = {"run.steps": "steps", "optim.lr": "lr", "run.seed": "seed", "data.seed": "seed",
                "run.init_from": "init", "run.out_dir": "out", "reward.language": "language",
                "data.num_train": "num_train"}
        clash = [f"--{key} set twice: by {_flag(dest)} and as an override"
                 for key, dest in sets.items() if key in written and dest in self.given]
        if clash:
            self.ap.error("; ".join(clash) + "; give one")
        task = [] if own_data else task_overrides(a.num_train)
        out, _ = stages.grpo(a.init, a.out, recipe=a.recipe,
                             overrides=[*task, *flags, *self.overrides], language=a.language)
        return out

    def rejection_sample(self) -> object:
        from r1fast.pipeline.filters import format_summary

        a = self.args
        self.need("out", "model")
        out, summary = stages.rejection_sample(a.model, self.sampled_problems(a.model), a.out,
                                               k=a.k, temperature=a.temperature,
                                               top_p=1.0 if a.top_p is None else a.top_p,
                                               max_new_tokens=a.max_new_tokens, seed=a.seed,
                                               keep_per_prompt=a.keep_per_prompt,
                                               filters=self.filters(), overwrite=a.overwrite)
        print(format_summary(summary))
        print(json.dumps(summary))
        return out

    def distill(self) -> object:
        a = self.args
        self.need("out", "teacher")
        if a.student_init is not None:
            self.unused("student", why="with --student-init (that folder is the student)")
        if a.data is not None:
            self.unused("prompts", "num_train", "keep_per_prompt", *SAMPLING, *FILTERS,
                        *PROBLEMS, why="with --data (the teacher's answers are read from it)")
            problems, filters = [], None
        else:
            problems, filters = self.sampled_problems(a.teacher), self.filters()
        student = None if a.student_init else MODELS[a.student or "tiny-dense"]()
        out, stats = stages.distill(
            a.teacher, problems, a.out, student=student, student_init=a.student_init, k=a.k,
            temperature=a.temperature, top_p=1.0 if a.top_p is None else a.top_p,
            keep_per_prompt=a.keep_per_prompt, max_new_tokens=a.max_new_tokens, steps=self.steps,
            lr=self.lr, seed=a.seed, filters=filters, teacher_data=a.data,
            overwrite=a.overwrite)
        print(json.dumps(stats))
        return out

    def evaluate(self) -> None:
        a = self.args
        self.need("model")
        if a.language == "none":
            self.ap.error("evaluate --language: 'none' has no meaning here (it measures mixing "
                          "against one language); give a code such as en, zh, el")
        test = self.problems(a.model, lambda: demo_task.problems(a.num_test, "test",
                                                                 a.data_seed))
        result = stages.evaluate(a.model, test, k=a.k, temperature=a.temperature,
                                 top_p=0.95 if a.top_p is None else a.top_p,
                                 max_new_tokens=a.max_new_tokens, seed=a.seed,
                                 language=a.language or "en")
        if a.problems is None:
            result["data_seed"] = a.data_seed
        print(json.dumps(result))


#: stage name -> the _Run method that runs it (what it returns is printed: a path)
STAGES: dict[str, Callable[[_Run], object]] = {
    "pretrain": _Run.pretrain, "sft": _Run.sft, "grpo": _Run.grpo,
    "rejection-sample": _Run.rejection_sample, "distill": _Run.distill,
    "evaluate": _Run.evaluate,
}
#: stages whose unknown --section.key=value arguments are config overrides
TAKES_OVERRIDES = ("grpo", "sft")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    rest = list(sys.argv[1:] if argv is None else argv)
    if rest[:1] == ["reward-model"]:  # its own options (--data pairs, --test ...)
        from r1fast.train.reward_model import stage_main

        return stage_main(rest[1:])
    ap = _parser()
    args, overrides = ap.parse_known_args(rest)
    if args.name == "reward-model":
        ap.error("write reward-model first, before its options: r1fast stage reward-model "
                 "--init DIR --data PAIRS.jsonl --out DIR ... (it has options of its own)")
    if overrides and (args.name not in TAKES_OVERRIDES
                      or (args.name == "sft" and args.recipe is None)):
        ap.error(f"unrecognized arguments for stage {args.name}: {' '.join(overrides)}")
    given = _given(rest)
    unused = sorted(_flag(d) for d in given - STAGE_OPTIONS[args.name] - {"name"})
    if unused:
        reads = ", ".join(sorted(_flag(d) for d in STAGE_OPTIONS[args.name]))
        hint = ("; a GRPO run starts over with --run.resume=false --run.overwrite=true"
                if args.name == "grpo" and "--overwrite" in unused else "")
        ap.error(f"stage {args.name} does not use {', '.join(unused)}; it reads {reads}{hint}")
    out = STAGES[args.name](_Run(ap, args, overrides, given))
    if out is not None:
        print(out)
    return 0
