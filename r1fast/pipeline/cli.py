"""``r1fast stage NAME ...``: each stage of the R1 pipeline alone, on the demo's task.

    r1fast stage pretrain --out runs/x/base --model tiny-moe --steps 500
    r1fast stage grpo --init runs/x/base/model --out runs/x/zero --run.steps=40
    r1fast stage sft --init runs/x/base/model --out runs/x/cold --cold-start 200
    r1fast stage rejection-sample --model runs/x/zero/model --out runs/x/rs.jsonl --k 4
    r1fast stage sft --init runs/x/base/model --out runs/x/rs_sft --data runs/x/rs.jsonl
    r1fast stage distill --teacher runs/x/zero/model --out runs/x/student --student tiny-dense
    r1fast stage evaluate --model runs/x/zero/model --k 4

Problems are the demo's additions (``--digits``, ``--seed``), or a user's dataset file with
``--problems FILE [--preset gsm8k|math|...]`` (prompts rendered with the model folder's tokenizer
and chat template; ``grpo`` takes ``--data.path=FILE --data.preset=...`` like ``r1fast train``).
Models are folders written by a previous stage or Hugging Face checkpoint folders; SFT datasets
are JSONL of ``{"prompt", "completion"}``.

    r1fast stage grpo --init ckpt/Qwen3-tiny --out runs/q --data.path=gsm8k.jsonl --data.preset=gsm8k
    r1fast stage evaluate --model runs/q/model --problems gsm8k_test.jsonl --preset gsm8k --k 8
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from r1fast.pipeline import stages
from r1fast.pipeline.demo import demo_examples, dense_model, moe_model, task_overrides

MODELS = {"tiny-moe": moe_model, "tiny-dense": dense_model}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="r1fast stage", description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=("pretrain", "sft", "grpo", "rejection-sample", "distill",
                                     "evaluate", "reward-model"))
    ap.add_argument("--out", help="output folder (a .jsonl path for rejection-sample)")
    ap.add_argument("--init", help="model folder to start from (sft, grpo)")
    ap.add_argument("--model", help="preset for pretrain (tiny-moe, tiny-dense) or the model "
                    "folder to sample/evaluate")
    ap.add_argument("--teacher", help="teacher model folder (distill)")
    ap.add_argument("--student", default="tiny-dense", help="student preset (distill)")
    ap.add_argument("--student-init", help="student model folder to fine-tune (distill)")
    ap.add_argument("--data", help="JSONL of prompt/completion rows (sft, distill)")
    ap.add_argument("--cold-start", type=int, help="sft on N clean chains of thought")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--noise", type=float, default=0.5, help="wrong answers in pretraining")
    ap.add_argument("--k", type=int, default=4, help="samples per prompt")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--prompts", type=int, default=1024, help="training prompts to sample")
    ap.add_argument("--num-train", type=int, default=3000)
    ap.add_argument("--num-test", type=int, default=64)
    ap.add_argument("--digits", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--problems", help="dataset file/folder of problems (rejection-sample, "
                    "distill, evaluate) instead of the demo's additions")
    ap.add_argument("--preset", help="column layout of --problems (gsm8k, math, dapo, ...)")
    ap.add_argument("--template", help="prompt template for --problems ({question}, or r1-zero)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    rest = list(sys.argv[1:] if argv is None else argv)
    if rest[:1] == ["reward-model"]:  # its own options (--data pairs, --test ...)
        from r1fast.train.reward_model import stage_main

        return stage_main(rest[1:])
    ap = _parser()
    args, overrides = ap.parse_known_args(argv)
    train = demo_examples(args.num_train, "train", args.seed, args.digits)

    def problems(model_dir: str, demo: list[dict]) -> list[dict]:
        if args.problems is None:
            return demo
        return stages.load_problems(args.problems, model_dir, preset=args.preset,
                                    template=args.template)

    def need(*names: str) -> None:
        missing = [n for n in names if getattr(args, n.replace("-", "_")) is None]
        if missing:
            ap.error(f"stage {args.name} needs " + ", ".join("--" + n for n in missing))

    if args.name == "pretrain":
        need("out")
        if args.model not in MODELS:
            ap.error(f"--model must be one of {tuple(MODELS)} for pretrain")
        out = stages.pretrain(train, args.out, MODELS[args.model](), steps=args.steps,
                              noise=args.noise, seed=args.seed)
    elif args.name == "sft":
        need("out", "init")
        if (args.data is None) == (args.cold_start is None):
            ap.error("sft needs exactly one of --data FILE.jsonl or --cold-start N")
        rows = (stages.read_jsonl(args.data) if args.data
                else stages.cold_start_data(train[:args.cold_start]))
        out = stages.sft(rows, args.out, init_from=args.init, steps=args.steps, lr=args.lr,
                         seed=args.seed)
    elif args.name == "grpo":
        need("out", "init")
        user_data = any(o.startswith("--data.path") for o in overrides)
        task = [] if user_data else task_overrides(args.digits, args.num_train, args.seed)
        out, _ = stages.grpo(args.init, args.out, overrides=[*task, *overrides])
    elif args.name == "rejection-sample":
        need("out", "model")
        rows = problems(args.model, train)[-args.prompts:]
        out, stats = stages.rejection_sample(args.model, rows, args.out, k=args.k,
                                             temperature=args.temperature,
                                             max_new_tokens=args.max_new_tokens, seed=args.seed)
        print(json.dumps(stats))
    elif args.name == "distill":
        need("out", "teacher")
        out, stats = stages.distill(
            args.teacher, problems(args.teacher, train)[-args.prompts:], args.out,
            student=None if args.student_init else MODELS[args.student](),
            student_init=args.student_init, k=args.k, temperature=args.temperature,
            max_new_tokens=args.max_new_tokens, steps=args.steps, lr=args.lr, seed=args.seed,
            teacher_data=args.data)
        print(json.dumps(stats))
    else:
        need("model")
        test = problems(args.model, demo_examples(args.num_test, "test", args.seed, args.digits))
        print(json.dumps(stages.evaluate(args.model, test, k=args.k, temperature=args.temperature,
                                         max_new_tokens=args.max_new_tokens, seed=args.seed)))
        return 0
    print(out)
    return 0
