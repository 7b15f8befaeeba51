"""``make demo``: the whole DeepSeek-R1 pipeline on a tiny MoE, on a CPU, in minutes.

Task: multi-digit addition, held-out test problems disjoint from training ones. A short
template asks for reasoning in ``<think>`` and the answer in ``\\boxed{}``; the reasoning is the
column-by-column sum ("5+4=9 7+3=10"). Stages (each a function of :mod:`r1fast.pipeline.stages`):

1. **base**: pre-train a tiny Qwen3-MoE-like model from scratch on a noisy corpus of worked
   problems (half of the final answers wrong): a mixed-quality imitator, like a web-trained base.
2. **R1-Zero**: GRPO straight from the base with rule rewards (accuracy + format).
3. **cold start + RL (R1)**: SFT of the base on a few hundred clean chains of thought, then GRPO.
4. **rejection sampling + SFT**: sample k answers per training prompt from the R1 model, keep
   the correct well-formed ones, fine-tune the base on them.
5. **distillation**: the R1 model answers training prompts; a dense student (pre-trained the
   same way as the base) is fine-tuned on its correct answers.

Every model is evaluated on the held-out problems: pass@1 from k samples at temperature 0.6 /
top-p 0.95, and cons@k (majority vote). The table, the RL curves (reward, accuracy, response
length) as PNG and all metrics JSONL land in the run folder named at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Sequence

from r1fast.data import generate_task, make_prompt
from r1fast.pipeline import stages
from r1fast.policy.config import ModelConfig

TEMPLATE = "Q: {question} Reason in <think></think>, answer in \\boxed{}.\nA: "


def column_sum_cot(a: int, b: int) -> str:
    """'5+4=9 7+3=10' for 75 + 34: one step per column, carries written as +1."""
    da, db = [int(c) for c in str(a)[::-1]], [int(c) for c in str(b)[::-1]]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        s = x + y + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={s}")
        carry = s // 10
    return " ".join(steps)


def demo_examples(n: int, split: str, seed: int, digits: int) -> list[dict]:
    exs = generate_task("arithmetic", n, split=split, seed=seed, min_digits=1,
                        max_digits=digits, ops=("+",))
    for ex in exs:
        ex["prompt"] = make_prompt(ex["question"], TEMPLATE)
        ex["solution_cot"] = column_sum_cot(ex["a"], ex["b"])
    return exs


@dataclasses.dataclass
class DemoConfig:
    out_dir: str = "runs/demo"
    """Run folder."""
    digits: int = 2
    """Most digits per operand."""
    num_train: int = 3000
    """Training problems."""
    num_test: int = 64
    """Held-out problems evaluated."""
    pretrain_steps: int = 500
    """Steps of base pre-training (MoE base and dense student base)."""
    pretrain_noise: float = 0.5
    """Share of wrong final answers in the pre-training corpus."""
    cold_start_examples: int = 200
    """Clean chains of thought in the cold-start set."""
    cold_start_steps: int = 60
    """SFT steps of the cold start."""
    rl_steps: int = 40
    """GRPO steps of each RL stage."""
    rl_prompts_per_step: int = 16
    """Prompts per GRPO step (8 samples each)."""
    rl_lr: float = 1e-4
    """GRPO learning rate (Adam: far below pre-training's, RL gradients are noisy)."""
    rs_prompts: int = 1024
    """Training prompts the R1 model answers for rejection sampling and distillation."""
    rs_k: int = 4
    """Samples per prompt when rejection sampling."""
    rs_temperature: float = 0.6
    """Sampling temperature of the teacher (low: fewer flawed chains behind right answers)."""
    sft_steps: int = 150
    """SFT steps on rejection-sampled / distillation data."""
    sft_lr: float = 3e-4
    """SFT learning rate on rejection-sampled / distillation data."""
    eval_k: int = 4
    """Samples per held-out problem (pass@1 from k, cons@k)."""
    max_new_tokens: int = 40
    """Completion length limit."""
    seed: int = 0


def moe_model() -> ModelConfig:
    return ModelConfig.preset("tiny-moe").replace(vocab_size=104, max_position_embeddings=160)


def dense_model() -> ModelConfig:
    return ModelConfig.preset("tiny-dense").replace(vocab_size=104, max_position_embeddings=160)


def task_overrides(digits: int, num_train: int, seed: int) -> list[str]:
    """The GRPO trainer draws its own prompts: the demo's task, problem space and template."""
    return ["--data.task=arithmetic", f"--data.num_train={num_train}", f"--data.seed={seed}",
            '--data.task_options={min_digits = 1, max_digits = %d, ops = ["+"]}' % digits,
            "--data.template=" + json.dumps(TEMPLATE)]


def rl_overrides(cfg: DemoConfig) -> list[str]:
    return [f"--run.steps={cfg.rl_steps}", "--run.progress=false", "--run.tensorboard=false",
            f"--data.prompts_per_step={cfg.rl_prompts_per_step}", "--algo.group_size=8",
            f"--rollout.max_new_tokens={cfg.max_new_tokens}", "--rollout.temperature=1.0",
            f"--optim.lr={cfg.rl_lr}",
            # no KL penalty (as DAPO and Dr.GRPO): 40 steps stay close to the start anyway
            "--algo.kl_coef=0.0", "--reward.workers=0",
            # packed micro-batches: rows end to end, no padding FLOPs
            "--parallel.max_tokens_per_microbatch=512",
            *task_overrides(cfg.digits, cfg.num_train, cfg.seed)]


class Demo:
    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.root = Path(cfg.out_dir)
        self.train = demo_examples(cfg.num_train, "train", cfg.seed, cfg.digits)
        self.test = demo_examples(cfg.num_test, "test", cfg.seed, cfg.digits)
        self.rows: list[dict] = []
        self.curves: dict[str, list[dict]] = {}
        self.t0 = time.time()

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:6.0f}s] {msg}", flush=True)

    def evaluate(self, stage: str, model_dir: Path) -> None:
        c = self.cfg
        r = stages.evaluate(model_dir, self.test, k=c.eval_k, max_new_tokens=c.max_new_tokens,
                            seed=c.seed)
        r.update(stage=stage, model=str(model_dir))
        self.rows.append(r)
        self.log(f"{stage:<28} pass@1 {r['pass_at_1']:.3f}  cons@{c.eval_k} {r['cons_at_k']:.3f}  "
                 f"format {r['format_rate']:.2f}")

    def rl(self, name: str, init: Path) -> Path:
        model, rows = stages.grpo(init, self.root / name, overrides=rl_overrides(self.cfg))
        self.curves[name] = rows
        return model

    def run(self) -> Path:
        c = self.cfg
        self.log(f"R1 pipeline demo: {len(self.train)} train / {len(self.test)} held-out "
                 f"addition problems, run folder {self.root}")
        base = stages.pretrain(self.train, self.root / "base", moe_model(),
                               steps=c.pretrain_steps, noise=c.pretrain_noise, seed=c.seed)
        self.evaluate("base (pre-trained MoE)", base)
        zero = self.rl("r1_zero", base)
        self.evaluate("R1-Zero (GRPO from base)", zero)
        cold = stages.sft(stages.cold_start_data(self.train[:c.cold_start_examples]),
                          self.root / "cold_start", init_from=base, steps=c.cold_start_steps)
        self.evaluate("cold-start SFT", cold)
        r1 = self.rl("r1", cold)
        self.evaluate("R1 (cold start + GRPO)", r1)
        # R1 step 3: the RL model answers many training prompts; its correct, well-formed
        # answers are the SFT set of the next model and the distillation set of the student
        prompts = self.train[-c.rs_prompts:]
        rs_path, rs_stats = stages.rejection_sample(r1, prompts, self.root / "rs_data.jsonl",
                                                    k=c.rs_k, temperature=c.rs_temperature,
                                                    max_new_tokens=c.max_new_tokens)
        self.log(f"rejection sampling kept {rs_stats['kept']} of {rs_stats['samples']} samples")
        rs = stages.sft(stages.read_jsonl(rs_path), self.root / "rs_sft", init_from=base,
                        steps=c.sft_steps, lr=c.sft_lr)
        self.evaluate("rejection-sampling SFT", rs)
        student_base = stages.pretrain(self.train, self.root / "student_base", dense_model(),
                                       steps=c.pretrain_steps, noise=c.pretrain_noise,
                                       seed=c.seed)
        self.evaluate("dense student base", student_base)
        student, _ = stages.distill(r1, prompts, self.root / "student", student_init=student_base,
                                    teacher_data=rs_path, steps=c.sft_steps, lr=c.sft_lr)
        self.evaluate("distilled dense student", student)
        self.finish()
        return self.root

    def finish(self) -> None:
        stages.write_jsonl(self.rows, self.root / "eval.jsonl")
        table = format_table(self.rows, self.cfg.eval_k)
        (self.root / "results.md").write_text(table + "\n")
        plot_curves(self.curves, self.root)
        print(table)
        self.log(f"done: run folder {self.root} (results.md, eval.jsonl, rl_curves.png, "
                 f"*/metrics.jsonl)")


def format_table(rows: Sequence[dict], k: int) -> str:
    lines = [f"| stage | pass@1 (k={k}) | cons@{k} | format |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['pass_at_1']:.3f} | {r['cons_at_k']:.3f} | "
                     f"{r['format_rate']:.2f} |")
    return "\n".join(lines)


def plot_curves(curves: dict[str, list[dict]], out: Path) -> Path | None:
    """Reward, accuracy and response length per RL step, one line per RL stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("reward_mean", "reward"), ("accuracy", "accuracy"),
            ("response_length", "response length (tokens)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, label) in zip(axes, keys):
        for name, rows in curves.items():
            ax.plot([r["step"] for r in rows], [r.get(key, float("nan")) for r in rows],
                    label=name)
        ax.set_xlabel("GRPO step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path = out / "rl_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    from r1fast.typed_toml import load

    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(prog="r1fast demo", description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="DemoConfig fields as --field=value")
    args, rest = ap.parse_known_args(argv)
    cfg = load(DemoConfig, None, [*args.overrides, *rest])
    Demo(cfg).run()
    return 0
