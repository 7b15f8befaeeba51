"""``make demo``: the whole DeepSeek-R1 recipe on a tiny MoE, on a CPU, in about 7 minutes.

It reproduces the report's findings in miniature.

The task (:mod:`r1fast.pipeline.demo_task`) is addition where the quick answer is a trap and
the column-by-column chain is right, written by a base corpus that mixes English and Greek.
Every stage is a function of :mod:`r1fast.pipeline.stages`:

1. **base**: pre-train a tiny Qwen3-MoE-like model from scratch on that corpus.
2. **R1-Zero**: GRPO from the base with rule rewards (accuracy + format). Finding: held-out
   pass@1 rises *and* responses grow longer; language mixing grows with them.
3. **R1, stages 1-2**: cold-start SFT on a few hundred clean English chains, then GRPO with the
   language-consistency reward added to accuracy. Finding: pass@1 >= R1-Zero's, and far less
   language mixing than RL without the reward.
4. **R1, stage 3**: rejection sampling from the R1 model (every drop counted by reason), mixed
   with non-reasoning rows (greetings), SFT of the base.
5. **R1, stage 4**: a reward model trained on preference pairs (held-out accuracy reported),
   then GRPO on a mixed set where additions get rule rewards and greetings the reward model;
   both reward streams are logged, and the share of warm greetings to held-out names is
   measured before and after.
6. **Distillation vs RL**: a dense student, pre-trained on a corpus with fewer worked chains
   (``student_long_share``: a small model that has read less reasoning), is fine-tuned on the
   R1 model's rejection-sampled answers; the same student is trained with GRPO instead, for
   at least the same compute. Finding: distillation wins. (When the student read the MoE
   base's corpus, it sampled long chains often enough that GRPO alone matched distillation:
   0.979 vs 0.976 pass@1, measured on an earlier version of this demo.)

Every model is evaluated on held-out problems (operand-swapped twins of training problems
excluded): pass@1 from k samples at T=0.6 / top-p 0.95, cons@k, language mixing, each with its
standard error. The run folder gets results.md (table + findings), eval.jsonl, summary.json,
rl_*.png and every stage's folder.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Sequence

from r1fast.atomic import write_text_atomic
from r1fast.cli import ArgumentParser
from r1fast.data import CharTokenizer
from r1fast.pipeline import demo_report as report
from r1fast.pipeline import demo_task as task
from r1fast.pipeline import stages
from r1fast.pipeline.filters import RejectionFilterConfig
from r1fast.policy.config import ModelConfig
from r1fast.train.metrics import read_jsonl

log = logging.getLogger("r1fast.pipeline")


@dataclasses.dataclass(kw_only=True)
class DemoConfig:
    out_dir: str = "runs/demo"
    """Run folder."""
    seed: int = 0
    """Seed of the data, every stage's initialisation and every sampling stream."""
    num_train: int = 3000
    """Training problems (1-2 digit additions)."""
    num_test: int = 200
    """Held-out problems evaluated."""
    long_share: float = 0.5
    """Share of base-corpus answers that reason column by column (the rest answer quickly)."""
    greek_share: float = 0.5
    """Probability that a connective of a base-corpus chain is Greek."""
    student_long_share: float = 0.25
    """``long_share`` of the dense student's base corpus: a small model pre-trained on less
    reasoning text, so GRPO alone rarely samples the long chains distillation teaches."""
    pretrain_greetings: int = 500
    """Greeting rows (half warm, half poor) in both base corpora."""
    pretrain_steps: int = 800
    """Steps of base pre-training (MoE base and dense student base), batch 32."""
    cold_start_examples: int = 200
    """Clean English chains in the cold-start set."""
    cold_start_steps: int = 60
    """SFT steps of the cold start."""
    rl_steps: int = 30
    """GRPO steps of R1-Zero and of R1's reasoning RL."""
    rl_prompts_per_step: int = 16
    """Prompts per GRPO step."""
    group_size: int = 8
    """Samples per prompt in GRPO."""
    rl_lr: float = 1e-4
    """GRPO learning rate (Adam: far below pre-training's, RL gradients are noisy)."""
    rs_prompts: int = 1024
    """Training prompts the R1 model answers for rejection sampling and distillation."""
    rs_k: int = 4
    """Samples per prompt when rejection sampling."""
    rs_temperature: float = 0.6
    """Sampling temperature of the teacher."""
    rs_keep: str = "correct"
    """Rejection-sampling rule preset (r1fast.pipeline.filters): "correct" (R1's rules:
    correct, well-formed, one language, deduplicated), "well_formed" or "all"."""
    rs_keep_truncated: bool = False
    """Keep rejection samples cut at ``max_new_tokens`` (every preset drops them: SFT would end
    them with the eos); for miniature runs whose few tokens cut nearly every answer."""
    general_sft_share: float = 0.2
    """Share of non-reasoning rows (greetings) in stage 3's SFT set."""
    general_good_share: float = 0.3
    """Share of those greetings that are warm (what stage 4 improves)."""
    sft_steps: int = 150
    """SFT steps on rejection-sampled / distillation data."""
    sft_lr: float = 3e-4
    """SFT learning rate on rejection-sampled data (stage 3)."""
    distill_lr: float = 1e-3
    """SFT learning rate of the dense student on the teacher's answers."""
    rm_pairs: int = 512
    """Preference pairs the reward model trains on."""
    rm_test_pairs: int = 200
    """Held-out preference pairs (names never seen in training)."""
    rm_steps: int = 60
    """Reward-model optimizer steps."""
    rm_lr: float = 3e-3
    """Reward-model learning rate."""
    stage4_steps: int = 20
    """GRPO steps of stage 4."""
    stage4_general_share: float = 0.5
    """Share of general (reward-model) prompts in stage 4's data."""
    eval_k: int = 8
    """Samples per held-out problem (pass@1 from k, cons@k)."""
    greeting_names: int = 100
    """Held-out names whose greetings are sampled (eval_k each) before and after stage 4."""
    max_new_tokens: int = 64
    """Completion length limit."""
    overwrite: bool = False
    """Delete a run folder that already holds files (with a warning) and run again; without
    it such a folder is an error, so an earlier run is never mixed into or lost."""

    def __post_init__(self):
        # checked at load: a bad size used to fail at the end of a 15-minute run
        for key, low, why in _DEMO_MINIMUMS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"demo {key} must be an integer >= {low}{why}, got {value!r}")
        for key in ("cold_start_examples", "rs_prompts"):
            if getattr(self, key) > self.num_train:
                raise ValueError(f"demo {key} ({getattr(self, key)}) must be <= num_train "
                                 f"({self.num_train}): they are drawn from the training problems")
        for key in ("long_share", "greek_share", "student_long_share", "general_good_share",
                    "general_sft_share", "stage4_general_share"):
            value, high = getattr(self, key), key in ("general_sft_share", "stage4_general_share")
            if not 0 <= value <= 1 or (high and value == 1):
                raise ValueError(f"demo {key} must be in [0, 1{')' if high else ']'} (a share), "
                                 f"got {value!r}")
        for key in ("rl_lr", "sft_lr", "distill_lr", "rm_lr", "rs_temperature"):
            if not getattr(self, key) > 0:
                raise ValueError(f"demo {key} must be > 0, got {getattr(self, key)!r}")
        if self.rs_keep not in ("correct", "well_formed", "all"):
            raise ValueError(f"demo rs_keep must be one of 'correct', 'well_formed', 'all', got "
                             f"{self.rs_keep!r}")


#: (field, least value, why) of DemoConfig's integer fields
_DEMO_MINIMUMS = (
    ("num_train", 1, ""), ("num_test", 2, " (a standard error needs two problems)"),
    ("pretrain_greetings", 0, ""), ("pretrain_steps", 1, ""), ("cold_start_examples", 1, ""),
    ("cold_start_steps", 1, ""),
    ("rl_steps", 2, " (the length finding compares the first and last steps)"),
    ("rl_prompts_per_step", 1, ""), ("group_size", 2, " (GRPO's group)"), ("rs_prompts", 1, ""),
    ("rs_k", 1, ""), ("sft_steps", 1, ""), ("rm_pairs", 1, ""), ("rm_test_pairs", 1, ""),
    ("rm_steps", 1, ""), ("stage4_steps", 1, ""), ("eval_k", 1, ""),
    ("greeting_names", 2, " (a standard error needs two names)"), ("max_new_tokens", 1, ""),
)


def moe_model() -> ModelConfig:
    return ModelConfig.preset("tiny-moe").replace(vocab_size=168, max_position_embeddings=192)


def dense_model() -> ModelConfig:
    return ModelConfig.preset("tiny-dense").replace(vocab_size=168, max_position_embeddings=192)


def demo_tokenizer() -> CharTokenizer:
    return CharTokenizer.with_scripts(*task.SCRIPTS)


def pretrain_base(examples: Sequence[dict], out_dir: str | Path, model: ModelConfig, *,
                  steps: int, long_share: float, greek_share: float, seed: int,
                  greetings: int = 0, tokenizer: CharTokenizer | None = None,
                  lr: float = 3e-3) -> Path:
    """A base model from scratch on the demo's corpus (every token trained, prompt included)
    plus ``greetings`` greeting rows of mixed quality (a web-trained base has seen some); the
    character tokenizer writes the demo's second script unless ``tokenizer`` is given."""
    corpus = task.base_corpus(examples, long_share, greek_share, seed)
    if greetings:
        corpus += task.general_sft_rows(greetings, 0.5, seed + 2)
        random.Random(seed).shuffle(corpus)
    tokenizer = tokenizer or demo_tokenizer()
    if tokenizer.vocab_size > model.vocab_size:  # room for the letters, a multiple of 8
        model = model.replace(vocab_size=-(-tokenizer.vocab_size // 8) * 8)
    return stages.sft(corpus, out_dir, model=model, steps=steps, batch_size=32, lr=lr,
                      loss_on_prompt=True, seed=seed, tokenizer=tokenizer)


def task_overrides(num_train: int, seed: int | None = None) -> list[str]:
    """The GRPO trainer draws its own prompts: the demo's problem space and template (and
    ``data.seed`` unless None)."""
    return ["--data.task=arithmetic", f"--data.num_train={num_train}",
            *([] if seed is None else [f"--data.seed={seed}"]),
            '--data.task_options={min_digits = 1, max_digits = 2, ops = ["+"]}',
            "--data.template=" + json.dumps(task.TEMPLATE)]


def rl_overrides(cfg: DemoConfig, steps: int, weights: str) -> list[str]:
    return [f"--run.steps={steps}", "--run.progress=false", "--run.tensorboard=false",
            f"--run.seed={cfg.seed}",
            f"--data.prompts_per_step={cfg.rl_prompts_per_step}",
            f"--algo.group_size={cfg.group_size}",
            f"--rollout.max_new_tokens={cfg.max_new_tokens}", "--rollout.temperature=1.0",
            f"--optim.lr={cfg.rl_lr}",
            # no KL penalty (as DAPO and Dr.GRPO): a few dozen steps stay close to the start
            "--algo.kl_coef=0.0", "--reward.workers=0",
            "--parallel.max_tokens_per_microbatch=1024",  # packed rows, no padding FLOPs
            "--reward.weights={%s}" % weights]


# rule rewards; language at weight 0 is computed and logged (reward/language) but not paid
ZERO_WEIGHTS = "accuracy = 1.0, format = 0.1, language = 0.0"
R1_WEIGHTS = "accuracy = 1.0, format = 0.1, language = 1.0"  # stage 2: accuracy + language


class Demo:
    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.root = Path(cfg.out_dir)
        self.train = task.problems(cfg.num_train, "train", cfg.seed)
        self.test = task.problems(cfg.num_test, "test", cfg.seed)
        self.rows: list[dict] = []
        self.curves: dict[str, list[dict]] = {}
        self.summary: dict = {"config": dataclasses.asdict(cfg)}
        self.t0 = time.time()

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:6.0f}s] {msg}", flush=True)

    def evaluate(self, stage: str, model_dir: Path) -> dict:
        c = self.cfg
        r = stages.evaluate(model_dir, self.test, k=c.eval_k, max_new_tokens=c.max_new_tokens,
                            seed=c.seed)
        r.update(stage=stage, model=str(model_dir))
        self.rows.append(r)
        self.log(f"{stage:<34} pass@1 {r['pass_at_1']:.3f}±{r['pass_at_1_se']:.3f}  "
                 f"cons@{c.eval_k} {r['cons_at_k']:.3f}  mixing {r['language_mixing']:.3f}  "
                 f"length {r['mean_length']:.1f}")
        return r

    def rl(self, name: str, init: Path, steps: int, weights: str,
           extra: Sequence[str] = ()) -> Path:
        overrides = [*rl_overrides(self.cfg, steps, weights), *extra]
        if not any(o.startswith("--data.path=") for o in extra):
            overrides += task_overrides(self.cfg.num_train, self.cfg.seed)
        model, rows = stages.grpo(init, self.root / name, overrides=overrides)
        self.curves[name] = rows
        return model

    def pretrain(self, name: str, model: ModelConfig, long_share: float) -> Path:
        c = self.cfg
        return pretrain_base(self.train, self.root / name, model, steps=c.pretrain_steps,
                             long_share=long_share, greek_share=c.greek_share, seed=c.seed,
                             greetings=c.pretrain_greetings)

    def run(self) -> Path:
        c = self.cfg
        clear_run_folder(self.root, c.overwrite)
        self.log(f"R1 recipe demo: {len(self.train)} train / {len(self.test)} held-out "
                 f"additions, run folder {self.root}")
        base = self.pretrain("base", moe_model(), c.long_share)
        ev = {"base": self.evaluate("base (pre-trained MoE)", base)}
        zero = self.rl("r1_zero", base, c.rl_steps, ZERO_WEIGHTS)
        ev["zero"] = self.evaluate("R1-Zero (GRPO from base)", zero)
        cold = stages.sft(stages.cold_start_data(self.train[:c.cold_start_examples]),
                          self.root / "cold_start", init_from=base, steps=c.cold_start_steps,
                          seed=c.seed)
        ev["cold"] = self.evaluate("cold-start SFT", cold)
        r1 = self.rl("r1", cold, c.rl_steps, R1_WEIGHTS)
        ev["r1"] = self.evaluate("R1 (cold start + RL + language)", r1)
        rs_data, rs = self.stage3(r1, base)
        ev["rs"] = self.evaluate("stage 3: rejection-sampling SFT", rs)
        greet = {"before": self.greetings(rs)}
        final = self.stage4(rs)
        ev["final"] = self.evaluate("stage 4: RL, rules + reward model", final)
        greet["after"] = self.greetings(final)
        self.summary["greetings"] = greet
        self.log(f"warm greetings to held-out names: stage 3 {greet['before']['rate']:.3f} -> "
                 f"stage 4 {greet['after']['rate']:.3f}")
        ev.update(self.distillation_vs_rl(r1, rs_data))
        self.finish(ev)
        return self.root

    def stage3(self, r1: Path, base: Path) -> tuple[Path, Path]:
        """Rejection sampling from R1 plus non-reasoning rows, SFT of the base."""
        c = self.cfg
        prompts = self.train[-c.rs_prompts:]
        rules = dataclasses.replace(RejectionFilterConfig.for_keep(c.rs_keep),
                                    reject_truncated=not c.rs_keep_truncated)
        rs_path, rs_stats = stages.rejection_sample(r1, prompts, self.root / "rs_data.jsonl",
                                                    k=c.rs_k, temperature=c.rs_temperature,
                                                    max_new_tokens=c.max_new_tokens,
                                                    seed=c.seed, filters=rules)
        general = task.general_sft_rows(2 * c.rs_prompts, c.general_good_share, c.seed)
        # R1's non-reasoning SFT data, in miniature (also a file for `r1fast stage sft --mix`)
        stages.write_jsonl(general, self.root / "general_sft.jsonl")
        mixed, counts = stages.mix_sft_data(read_jsonl(rs_path), general,
                                            c.general_sft_share, c.seed)
        self.summary["rejection_sampling"] = rs_stats
        self.summary["stage3_mix"] = counts
        self.log(f"rejection sampling kept {rs_stats['kept']} of {rs_stats['samples']} "
                 f"samples (dropped: {rs_stats.get('rejected', {})}); SFT set "
                 f"{counts['reasoning']} reasoning + {counts['non_reasoning']} greetings")
        rs = stages.sft(mixed, self.root / "rs_sft", init_from=base, steps=c.sft_steps,
                        lr=c.sft_lr, seed=c.seed)
        return rs_path, rs

    def greetings(self, model_dir: Path) -> dict:
        """Share of warm greetings (eval_k samples per held-out name, T=0.6), with its
        standard error over names."""
        from r1fast.pipeline.evaluate import standard_error
        from r1fast.pipeline.generation import load_model, sample
        from r1fast.rollout.sampler import SamplingConfig

        c = self.cfg
        names = task.names(c.greeting_names, "test", c.seed)
        policy, tok = load_model(model_dir)
        outs = sample(policy, tok, [task.general_prompt(n) for n in names], c.eval_k,
                      SamplingConfig(temperature=0.6, top_p=0.95, max_new_tokens=40), seed=c.seed)
        per_name = [sum(task.is_warm_greeting(o) for o in replies) / len(replies)
                    for replies in outs]
        return {"rate": sum(per_name) / len(per_name), "rate_se": standard_error(per_name),
                "names": len(names), "k": c.eval_k, "example": outs[0][0]}

    def stage4(self, rs: Path) -> Path:
        """A reward model on preference pairs, then GRPO with rules for additions and the
        reward model for greetings."""
        c = self.cfg
        pairs = stages.write_jsonl(task.preference_pairs(c.rm_pairs, "train", c.seed),
                                   self.root / "rm_pairs.jsonl")
        test = stages.write_jsonl(task.preference_pairs(c.rm_test_pairs, "test", c.seed),
                                  self.root / "rm_pairs_test.jsonl")
        rm, rm_summary = stages.reward_model(rs, pairs, self.root / "reward_model", test=test,
                                             steps=c.rm_steps, batch_size=32, lr=c.rm_lr,
                                             seed=c.seed)
        self.summary["reward_model"] = rm_summary
        self.log(f"reward model: held-out pair accuracy {rm_summary['heldout_accuracy_before']:.3f}"
                 f" -> {rm_summary['heldout_accuracy']:.3f} ({rm_summary['test_pairs']} pairs)")
        n_general = round(c.stage4_general_share * c.num_train / (1 - c.stage4_general_share))
        rows = [{"prompt": ex["prompt"], "answer": ex["answer"], "reward": "math_accuracy"}
                for ex in self.train] + task.general_rl_rows(n_general, c.seed)
        data = stages.write_jsonl(rows, self.root / "stage4_data.jsonl")
        return self.rl("stage4", rs, c.stage4_steps, R1_WEIGHTS,
                       [f"--data.path={data}", "--data.chat_template=false",
                        f"--reward.reward_model={rm}"])

    def distillation_vs_rl(self, r1: Path, rs_data: Path) -> dict:
        """The dense student: distilled from R1's answers vs GRPO for the same compute."""
        c = self.cfg
        student_base = self.pretrain("student_base", dense_model(), c.student_long_share)
        ev = {"student_base": self.evaluate("dense student base", student_base)}
        # the teacher's answers are the rejection-sampled set stage 3 already wrote
        distilled, _ = stages.distill(r1, [], self.root / "student_distilled",
                                      student_init=student_base, teacher_data=rs_data,
                                      steps=c.sft_steps, lr=c.distill_lr, seed=c.seed)
        ev["distilled"] = self.evaluate("dense student, distilled from R1", distilled)
        budget = self.compute_budget(rs_data, student_base)
        rl_student = self.rl("student_grpo", student_base, budget["grpo_steps"], ZERO_WEIGHTS)
        ev["student_rl"] = self.evaluate("dense student, GRPO (same compute)", rl_student)
        rows_per_step = c.rl_prompts_per_step * c.group_size
        budget["grpo_measured"] = sum(rows_per_step * (budget["prompt_tokens"] +
                                                       r["response_length"]) * 5
                                      for r in self.curves["student_grpo"])
        self.summary["compute"] = budget
        self.log(f"student compute (forward-token equivalents): distillation "
                 f"{budget['distill']:.3g}, GRPO {budget['grpo_measured']:.3g} "
                 f"({budget['grpo_steps']} steps, "
                 f"{budget['grpo_measured'] / budget['distill']:.2f}x distillation's)")
        return ev

    def compute_budget(self, rs_data: Path, student_base: Path) -> dict:
        """Student compute of distillation (SFT steps x batch x tokens x 3: forward + backward)
        and the GRPO steps that match it (per row: generation 1 + old log-probs 1 + update 3
        forward-token equivalents over prompt + response). The response length is measured
        on 64 samples of the student base at the RL temperature; responses grow during RL, so
        the measured GRPO compute (reported after the run) ends at or above the budget."""
        from r1fast.pipeline.generation import load_model, sample
        from r1fast.rollout.sampler import SamplingConfig

        c = self.cfg
        policy, tok = load_model(student_base)
        rows = read_jsonl(rs_data)
        sft_tokens = sum(len(tok.encode(r["prompt"] + r["completion"])) + 2
                         for r in rows) / len(rows)
        prompts = [ex["prompt"] for ex in self.train[:64]]
        prompt_tokens = sum(len(tok.encode(p)) + 1 for p in prompts) / len(prompts)
        outs = sample(policy, tok, prompts, 1, SamplingConfig(
            temperature=1.0, max_new_tokens=c.max_new_tokens), seed=c.seed)
        response = sum(len(tok.encode(o[0])) + 1 for o in outs) / len(outs)
        distill = c.sft_steps * 32 * sft_tokens * 3
        per_step = c.rl_prompts_per_step * c.group_size * (prompt_tokens + response) * 5
        return {"distill": distill, "grpo_steps": max(1, math.ceil(distill / per_step)),
                "prompt_tokens": prompt_tokens, "response_tokens_at_start": response,
                "sft_row_tokens": sft_tokens}

    def finish(self, ev: dict) -> None:
        findings = [
            report.finding("R1-Zero: pass@1 above the base", *report.gain(ev["zero"], ev["base"])),
            rl_length_finding(self.curves["r1_zero"]),
            report.finding("R1: pass@1 not below R1-Zero", *report.gain(ev["r1"], ev["zero"]),
                           claim="not_below"),
            report.finding("R1: less language mixing than R1-Zero (RL without the reward)",
                           *report.gain(ev["zero"], ev["r1"], "language_mixing")),
            report.finding("distilled student above the GRPO student",
                           *report.gain(ev["distilled"], ev["student_rl"])),
            report.finding("stage 4: more warm greetings to held-out names",
                           *report.gain(self.summary["greetings"]["after"],
                                        self.summary["greetings"]["before"], "rate")),
        ]
        s4 = self.curves["stage4"]
        self.summary["stage4_streams"] = {
            src: report.start_end(s4, f"reward/source_{src}") for src in ("rule", "model")}
        self.summary.update(findings=findings, eval=self.rows,
                            seconds=round(time.time() - self.t0, 1))
        stages.write_jsonl(self.rows, self.root / "eval.jsonl")
        write_text_atomic(self.root / "summary.json",
                                 json.dumps(self.summary, indent=1) + "\n")
        text = "\n\n".join([report.format_table(self.rows), report.format_findings(findings),
                            self.stage4_text()])
        write_text_atomic(self.root / "results.md", text + "\n")
        report.plot_curves(self.curves, self.root)
        print(text)
        self.log(f"done: run folder {self.root} (results.md, eval.jsonl, summary.json, rl_*.png, "
                 f"*/metrics.jsonl)")

    def stage4_text(self) -> str:
        rm = self.summary["reward_model"]
        streams, greet = self.summary["stage4_streams"], self.summary["greetings"]
        return (f"Stage 4: reward model held-out pair accuracy {rm['heldout_accuracy']:.3f} ± "
                f"{rm['heldout_accuracy_se']:.3f} ({rm['test_pairs']} pairs; "
                f"{rm['heldout_accuracy_before']:.3f} before "
                f"training). GRPO reward per source, first -> last 5 steps: rule rows "
                f"{streams['rule'][0]:.3f} -> {streams['rule'][1]:.3f}, reward-model rows "
                f"{streams['model'][0]:.3f} -> {streams['model'][1]:.3f}. Warm greetings to "
                f"{greet['before']['names']} held-out names ({greet['before']['k']} samples "
                f"each): {greet['before']['rate']:.3f} ± {greet['before']['rate_se']:.3f} after "
                f"stage 3, {greet['after']['rate']:.3f} ± {greet['after']['rate_se']:.3f} after "
                f"stage 4.")


def clear_run_folder(root: Path, overwrite: bool) -> None:
    """An error if ``root`` already holds files, unless ``overwrite`` (then it is deleted,
    loudly): the stages would otherwise resume or refuse one by one, mixing two runs."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"demo out_dir {root} is a file, not a folder")
    held = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    if not held:
        return
    if not overwrite:
        raise ValueError(f"demo out_dir {root} already holds a run ({', '.join(held[:4])}"
                         f"{', ...' if len(held) > 4 else ''}); give --out_dir=NEW, or "
                         f"--overwrite=true to delete it and run again (make demo "
                         f"DEMO_ARGS=--overwrite=true)")
    log.warning("demo overwrite=true: deleting the earlier run in %s (%d entries)", root,
                len(held))
    shutil.rmtree(root)


def rl_length_finding(rows: Sequence[dict]) -> dict:
    """Response length of the first vs the last 5 R1-Zero steps, with the standard error of
    the difference of the two 5-step means."""
    import statistics

    vals = [r["response_length"] for r in rows]
    head, tail = vals[:5], vals[-5:]
    se = (statistics.variance(head) / len(head) + statistics.variance(tail) / len(tail)) ** 0.5
    return report.finding("R1-Zero: responses grow during RL (tokens, first vs last 5 steps)",
                          sum(tail) / len(tail) - sum(head) / len(head), se)


def main(argv: Sequence[str] | None = None) -> int:
    from r1fast.typed_toml import load

    logging.basicConfig(level=logging.WARNING)
    ap = ArgumentParser(prog="r1fast demo", description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="DemoConfig fields as --field=value")
    args, rest = ap.parse_known_args(argv)
    cfg = load(DemoConfig, None, [*args.overrides, *rest])
    Demo(cfg).run()
    return 0
