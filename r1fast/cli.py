"""The ``r1fast`` command line.

    r1fast demo                         the CPU demo (what `make demo` runs)
    r1fast train RECIPE [--a.b=v ...]   GRPO training from a TOML recipe with dotted overrides
    r1fast policy [--preset NAME]       build a policy, print its parameter count and a log-prob
    r1fast plan RECIPE [--gpu-mem GiB]  per-GPU memory plan of a recipe's layout
    r1fast export RUN OUT_DIR           a run's checkpoint as a Hugging Face folder
    r1fast stage NAME [...]             one stage of the R1 pipeline (pretrain, sft, grpo,
                                        rejection-sample, distill, reward-model, evaluate)

Each subcommand is a thin shell over the Python API it names; heavy imports happen inside the
subcommand so ``r1fast --help`` is instant. A bad config value, input file, checkpoint or
command-line usage is one line on stderr, ``r1fast: error: <message>``, and exit code 2 (1
for a run stopped by non-finite values); set ``R1FAST_DEBUG=1`` for the traceback.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Sequence


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line, as every other error of the CLI:
    ``r1fast: error: <prog>: <message> (see <prog> --help)`` and exit code 2 (argparse prints
    the whole usage block first). Every r1fast subcommand parses with it."""

    def error(self, message: str):
        msg = " ".join(message.split())
        self.exit(2, f"r1fast: error: {self.prog}: {msg} (see {self.prog} --help)\n")


def log_to_stderr(fmt: str) -> None:
    """INFO lines from the first process of a torchrun job, WARNINGs and errors from every
    one (the INFO lines came once per rank)."""
    import logging

    first = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if first else logging.WARNING, format=fmt)


def _demo(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from r1fast.pipeline.demo import main as demo_main

    return demo_main(list(rest))


def _train(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from r1fast.train.grpo import train_main

    if not os.path.exists(args.recipe) and any(r.endswith(".toml") for r in rest):
        # `r1fast train --run.steps 1 recipe.toml`: argparse took "1" for the recipe
        raise ValueError(f"r1fast train: the recipe comes first, then the overrides as "
                         f"--section.key=value (the recipe was read as {args.recipe!r})")
    return train_main(args.recipe, list(rest))


def _policy(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from r1fast.policy.__main__ import main as policy_main

    return policy_main(list(rest))


def _plan(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from r1fast.plan import plan_main

    return plan_main([args.recipe, *rest])


def _export(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from r1fast.train.export import export_main

    return export_main(list(rest))


def _stage(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from r1fast.pipeline.cli import main as stage_main

    return stage_main(list(rest))


def exit_on_sigterm() -> None:
    """SIGTERM (``kill``, ``timeout``) ends a single-process run as an exception would:
    ``finally`` blocks and exit handlers run (logs closed, megatron's checkpoint-writer Manager
    shut down), where the default action left that server running under init, holding the
    terminal's output open (helper-78). Exit status 143 as before. Not under torchrun: a
    Python handler runs only between bytecodes, so a rank blocked in a collective would outlive
    the signal until its timeout (helper-79); there the default action stays."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if single and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="r1fast", description="R1-style RL for MoE models")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the CPU demo", add_help=False)
    p.set_defaults(fn=_demo)
    p = sub.add_parser("train", help="GRPO training from a TOML recipe")
    p.add_argument("recipe", help="path to a TOML recipe, e.g. recipes/tiny.toml; overrides "
                   "follow as --section.key=value")
    p.set_defaults(fn=_train)
    p = sub.add_parser("policy", help="build a policy and print its size and a log-prob",
                       add_help=False)
    p.set_defaults(fn=_policy)
    p = sub.add_parser("plan", help="per-GPU memory plan of a recipe", add_help=False)
    p.add_argument("recipe", nargs="?", default="--help")
    p.set_defaults(fn=_plan)
    p = sub.add_parser("export", help="a training checkpoint -> a Hugging Face folder",
                       add_help=False)
    p.set_defaults(fn=_export)
    p = sub.add_parser("stage", help="one stage of the R1 pipeline", add_help=False)
    p.set_defaults(fn=_stage)
    args, rest = parser.parse_known_args(argv)
    exit_on_sigterm()
    try:
        return int(args.fn(args, rest) or 0)
    except (ValueError, FloatingPointError) as e:
        # a bad config, input or checkpoint (ValueError, ConfigError) exits 2 like argparse's
        # usage errors; a run stopped by non-finite values exits 1. One line each: the
        # traceback is for developers (R1FAST_DEBUG=1).
        if os.environ.get("R1FAST_DEBUG", "") not in ("", "0"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"r1fast: error: {msg}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, ValueError) else 1) from None


if __name__ == "__main__":
    sys.exit(main())
