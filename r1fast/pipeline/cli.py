"""``r1fast stage NAME ...``: each stage of the R1 pipeline alone, on the demo's task.

    r1fast stage pretrain --out runs/x/base --model tiny-moe --steps 500
    r1fast stage grpo --init runs/x/base/model --out runs/x/zero --run.steps=40
    r1fast stage grpo --init runs/x/cold/model --out runs/x/r1 --language en   # R1 stage 2
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
and chat template; ``grpo`` takes ``--data.path=FILE --data.preset=...`` like ``r1fast train``).
Models are folders written by a previous stage or Hugging Face checkpoint folders; SFT datasets
are JSONL of ``{"prompt", "completion"}``. ``rejection-sample`` prints how many samples each
readability rule dropped and writes that summary next to its JSONL.

    r1fast stage grpo --init ckpt/Qwen3-tiny --out runs/q --data.path=gsm8k.jsonl --data.preset=gsm8k
    r1fast stage evaluate --model runs/q/model --problems gsm8k_test.jsonl --preset gsm8k --k 8
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Sequence

from r1fast.cli import ArgumentParser
from r1fast.pipeline import stages
from r1fast.pipeline import demo_task
from r1fast.pipeline.demo import DemoConfig, dense_model, moe_model, pretrain_base, task_overrides

MODELS = {"tiny-moe": moe_model, "tiny-dense": dense_model}
DEFAULT_STEPS, DEFAULT_LR = 200, 1e-3


def _parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="r1fast stage", description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=(*STAGES, "reward-model"))
    ap.add_argument("--out", help="output folder (a .jsonl path for rejection-sample)")
    ap.add_argument("--init", help="model folder to start from (sft, grpo)")
    ap.add_argument("--model", help="preset for pretrain (tiny-moe, tiny-dense) or the model "
                    "folder to sample/evaluate")
    ap.add_argument("--scripts", nargs="+", help="pretrain: the character tokenizer also "
                    "writes these scripts (default: greek, the demo corpus's second language; "
                    "cyrillic)")
    ap.add_argument("--teacher", help="teacher model folder (distill)")
    ap.add_argument("--student", default="tiny-dense", help="student preset (distill)")
    ap.add_argument("--student-init", help="student model folder to fine-tune (distill)")
    ap.add_argument("--data", help="JSONL of prompt/completion rows (sft, distill)")
    ap.add_argument("--cold-start", type=int, help="sft on N clean chains of thought")
    ap.add_argument("--mix", help="sft: JSONL of non-reasoning prompt/completion rows to mix in")
    ap.add_argument("--mix-ratio", type=float, help="sft: share of the SFT set from --mix "
                    "(R1: 0.25)")
    ap.add_argument("--recipe", help="sft: a TOML recipe (e.g. recipes/sky_t1_sft.toml); "
                    "override its keys as --sft.KEY=VALUE")
    ap.add_argument("--steps", type=int, help=f"optimizer steps (default {DEFAULT_STEPS})")
    ap.add_argument("--lr", type=float, help=f"learning rate (default {DEFAULT_LR})")
    ap.add_argument("--long-share", type=float, default=DemoConfig.long_share,
                    help="pretrain: share of corpus answers that reason column by column")
    ap.add_argument("--greek-share", type=float, default=DemoConfig.greek_share,
                    help="pretrain: chance that a connective of a corpus chain is Greek")
    ap.add_argument("--greetings", type=int, default=DemoConfig.pretrain_greetings,
                    help="pretrain: greeting rows (half warm, half poor) in the corpus")
    ap.add_argument("--k", type=int, default=4, help="samples per prompt")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--prompts", type=int, default=1024, help="training prompts to sample")
    ap.add_argument("--num-train", type=int, default=3000)
    ap.add_argument("--num-test", type=int, default=DemoConfig.num_test)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=DemoConfig.max_new_tokens)
    ap.add_argument("--problems", help="dataset file/folder of problems (rejection-sample, "
                    "distill, evaluate) instead of the demo's additions")
    ap.add_argument("--preset", help="column layout of --problems (gsm8k, math, dapo, ...)")
    ap.add_argument("--template", help="prompt template for --problems ({question}, or r1-zero)")
    ap.add_argument("--language", help="grpo: add the language-consistency reward toward this "
                    "language (en, zh, el, ...); rejection-sample: the thought's language "
                    "('none': no language rule; default en)")
    ap.add_argument("--keep", default="correct", choices=("correct", "well_formed", "all"),
                    help="rejection-sample: rule preset (all = only drop duplicates)")
    ap.add_argument("--max-chars", type=int, help="rejection-sample: drop longer completions")
    ap.add_argument("--max-paragraph-chars", type=int,
                    help="rejection-sample: longest paragraph kept (default 2000; 0: no limit)")
    ap.add_argument("--min-language-share", type=float,
                    help="rejection-sample: least share of thought words in --language (0.95)")
    ap.add_argument("--allow-code-blocks", action="store_true",
                    help="rejection-sample: keep completions with fenced code blocks")
    return ap


class _Run:
    """One parsed command line; each stage is a method returning what it prints."""

    def __init__(self, ap: argparse.ArgumentParser, args: argparse.Namespace,
                 overrides: list[str]):
        self.ap, self.args, self.overrides = ap, args, overrides
        self.steps = DEFAULT_STEPS if args.steps is None else args.steps
        self.lr = DEFAULT_LR if args.lr is None else args.lr

    @property
    def train(self) -> list[dict]:
        a = self.args
        return demo_task.problems(a.num_train, "train", a.seed)

    def problems(self, model_dir: str, demo: list[dict]) -> list[dict]:
        if self.args.problems is None:
            return demo
        return stages.load_problems(self.args.problems, model_dir, preset=self.args.preset,
                                    template=self.args.template)

    def need(self, *names: str) -> None:
        missing = [n for n in names if getattr(self.args, n.replace("-", "_")) is None]
        if missing:
            self.ap.error(f"stage {self.args.name} needs " + ", ".join("--" + n for n in missing))

    def pretrain(self) -> object:
        a = self.args
        self.need("out")
        if a.model not in MODELS:
            self.ap.error(f"--model must be one of {tuple(MODELS)} for pretrain")
        tokenizer = None
        if a.scripts:
            from r1fast.data import CharTokenizer
            tokenizer = CharTokenizer.with_scripts(*a.scripts)
        return pretrain_base(self.train, a.out, MODELS[a.model](), steps=self.steps,
                             long_share=a.long_share, greek_share=a.greek_share, seed=a.seed,
                             greetings=a.greetings, tokenizer=tokenizer)

    def sft(self) -> object:
        a = self.args
        if a.recipe is not None:
            return self.sft_recipe()
        self.need("out", "init")
        if (a.data is None) == (a.cold_start is None):
            self.ap.error("sft needs exactly one of --data FILE.jsonl or --cold-start N")
        rows = (stages.read_jsonl(a.data) if a.data
                else stages.cold_start_data(self.train[:a.cold_start]))
        if (a.mix is None) != (a.mix_ratio is None):
            self.ap.error("--mix FILE and --mix-ratio R go together")
        if a.mix is not None:
            rows, counts = stages.mix_sft_data(rows, a.mix, a.mix_ratio, a.seed)
            print(json.dumps({"mix": counts}))
        return stages.sft(rows, a.out, init_from=a.init, steps=self.steps, lr=self.lr,
                          seed=a.seed)

    def sft_recipe(self) -> object:
        from r1fast.pipeline.sft_recipe import load_sft_recipe, run_sft_recipe

        a = self.args
        given = [f"--{n.replace('_', '-')}" for n in ("out", "init", "data", "cold_start", "mix",
                                                      "mix_ratio", "steps", "lr")
                 if getattr(a, n) is not None]
        if given:
            self.ap.error(f"with --recipe, set {', '.join(given)} in the recipe or as "
                          f"--sft.KEY=VALUE (e.g. --sft.data=FILE, --optim.lr=1e-5)")
        out, summary = run_sft_recipe(load_sft_recipe(a.recipe, self.overrides))
        print(json.dumps(summary))
        return out

    def grpo(self) -> object:
        a = self.args
        self.need("out", "init")
        user_data = any(o.startswith("--data.path") for o in self.overrides)
        task = [] if user_data else task_overrides(a.num_train, a.seed)
        out, _ = stages.grpo(a.init, a.out, overrides=[*task, *self.overrides],
                             language=a.language)
        return out

    def rejection_sample(self) -> object:
        import dataclasses

        from r1fast.pipeline.filters import RejectionFilterConfig, format_summary

        a = self.args
        self.need("out", "model")
        rules = {k: v for k, v in (("max_chars", a.max_chars),
                                   ("max_paragraph_chars", a.max_paragraph_chars),
                                   ("min_language_share", a.min_language_share)) if v is not None}
        if a.language is not None:
            rules["language"] = None if a.language == "none" else a.language
        if a.allow_code_blocks:
            rules["reject_code_blocks"] = False
        filters = dataclasses.replace(RejectionFilterConfig.for_keep(a.keep), **rules)
        rows = self.problems(a.model, self.train)[-a.prompts:]
        out, summary = stages.rejection_sample(a.model, rows, a.out, k=a.k,
                                               temperature=a.temperature,
                                               max_new_tokens=a.max_new_tokens, seed=a.seed,
                                               filters=filters)
        print(format_summary(summary))
        print(json.dumps(summary))
        return out

    def distill(self) -> object:
        a = self.args
        self.need("out", "teacher")
        out, stats = stages.distill(
            a.teacher, self.problems(a.teacher, self.train)[-a.prompts:], a.out,
            student=None if a.student_init else MODELS[a.student](),
            student_init=a.student_init, k=a.k, temperature=a.temperature,
            max_new_tokens=a.max_new_tokens, steps=self.steps, lr=self.lr, seed=a.seed,
            teacher_data=a.data)
        print(json.dumps(stats))
        return out

    def evaluate(self) -> None:
        a = self.args
        self.need("model")
        test = self.problems(a.model, demo_task.problems(a.num_test, "test", a.seed))
        print(json.dumps(stages.evaluate(a.model, test, k=a.k, temperature=a.temperature,
                                         max_new_tokens=a.max_new_tokens, seed=a.seed)))


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
    args, overrides = ap.parse_known_args(argv)
    if overrides and (args.name not in TAKES_OVERRIDES
                      or (args.name == "sft" and args.recipe is None)):
        ap.error(f"unrecognized arguments for stage {args.name}: {' '.join(overrides)}")
    if args.language is not None and args.name not in ("grpo", "rejection-sample"):
        ap.error("--language is for grpo (reward) and rejection-sample (filter)")
    out = STAGES[args.name](_Run(ap, args, overrides))
    if out is not None:
        print(out)
    return 0
