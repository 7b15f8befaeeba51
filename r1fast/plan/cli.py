"""``r1fast plan RECIPE``: will this recipe fit the GPUs? A per-GPU memory plan, instantly.

    r1fast plan recipes/qwen3_30b_a3b.toml                       # 80 GiB GPUs, recipe's world
    r1fast plan recipes/qwen3_30b_a3b.toml --gpu-mem 140         # H200
    r1fast plan recipes/deepseek_v3.toml --recompute full --gpus 256
    r1fast plan recipes/tiny.toml --override parallel.tp=2 --parallel.ep=2 --gpus 4

Overrides use the trainer's dotted syntax (``--override parallel.ep=4`` or ``--parallel.ep=4``),
so a plan describes exactly the run ``r1fast train`` would start. The numbers come from
:func:`r1fast.plan.memory.plan_memory` (the formulas and assumptions are documented there);
``--json`` prints them for scripts. An impossible layout (experts not divisible by ep, a
world size that is not a multiple of tp*pp ...) is an error naming what does not divide.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Sequence

from r1fast.cli import ArgumentParser
from r1fast.plan.memory import (DECODERS, SPECS, GiB, RECOMPUTE_MODES, MemoryPlan, StagePlan,
                                plan_memory)
from r1fast.rollout.sampler import sample_rows_per_chunk

__all__ = ["plan_main", "format_plan"]


def _gib(n: float) -> str:
    """Bytes in GiB, or MiB/KiB when small (so tiny recipes do not print 0.00)."""
    if n >= 0.1 * GiB or n == 0:
        return f"{n / GiB:.2f} GiB"
    if n >= 0.1 * 1024 ** 2:
        return f"{n / 1024 ** 2:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def _rows(plan: MemoryPlan, cfg) -> list[tuple[str, str, str]]:
    """(component, detail, memory) rows of the worst stage; a component starting with "="
    is a sub-total."""
    w: StagePlan = plan.worst
    m = cfg.model
    opt = plan.options
    dist_opt = cfg.optim.use_distributed_optimizer
    experts = f"experts /EDP {plan.expert_dp}" if plan.ep > 1 else f"experts /DP {plan.dp}"
    shard = (f"dense /DP {plan.dp}, {experts}" if dist_opt
             else "not sharded (distributed optimizer off)")
    rows = [
        (f"parameters ({plan.params_dtype})",
         f"{_count(w.dense_params)} dense + {_count(w.expert_params)} expert on this rank",
         _gib(w.param_bytes)),
        ("gradients (fp32 main_grad)", "megatron DDP grad_reduce_in_fp32, unsharded",
         _gib(w.grad_bytes)),
    ]
    if w.master_bytes:
        rows.append(("optimizer: fp32 master weights", shard, _gib(w.master_bytes)))
    rows.append(("optimizer: Adam m, v (fp32)", shard, _gib(w.adam_bytes)))
    if w.reference_bytes:
        rows.append((f"reference policy ({plan.params_dtype})",
                     f"frozen copy for the KL term (algo.kl = {cfg.algo.objective.kl}, "
                     f"kl_coef = {cfg.algo.objective.kl_coef})",
                     _gib(w.reference_bytes)))
    rows.append(("= resident state", "", _gib(w.resident_bytes)))
    per = ", ".join(f"{k} {_gib(v)}" for k, v in w.activation_bytes.items())
    rows.append((f"activations (recompute {opt.recompute}, x{w.in_flight})",
                 f"per micro-batch: {per}", _gib(w.activations_total)))
    if w.logprob_fused_bytes or w.logprob_unfused_bytes:
        name = (f"fused r1fast kernel, {cfg.algo.logprob_head}" if cfg.algo.use_fused_kernels
                else "full logits")
        other = (f"full fp32 logits [T, V/tp] would need {_gib(w.logprob_unfused_bytes)}"
                 if cfg.algo.use_fused_kernels
                 else f"the fused kernel would need {_gib(w.logprob_fused_bytes)}")
        rows.append((f"log-prob head ({name})", other, _gib(w.logprob_bytes)))
    rows.append((f"= training peak (+{opt.reserve_gib:g} GiB reserve)", "", _gib(w.train_peak)))
    layers = w.layers[1] - w.layers[0]
    if opt.decoder == "kv-cache":
        per_token = (f"MLA latent ({m.kv_lora_rank} + {m.qk_rope_head_dim})" if m.is_mla
                     else f"{m.kv_heads // plan.tp} kv heads/tp x {m.kv_channels}")
        rows.append(("rollout KV cache",
                     f"{plan.rollout_seqs} seqs x {plan.seq_len} tok x {layers} layers x "
                     f"{per_token}", _gib(w.kv_cache_bytes)))
    rows.append(("rollout sampling logits (fp32)",
                 "[B, V] per step" if opt.decoder == "kv-cache"
                 else "[B, L, V]: prefix-recomputing decoder", _gib(w.rollout_logits_bytes)))
    if opt.decoder == "kv-cache":
        rows.append(("rollout decode step (transient)", f"one token per row over {plan.seq_len}"
                     " cached slots; the peak counts the largest transient", _gib(w.decode_bytes)))
    if w.sampling_bytes:
        chunk = min(plan.rollout_seqs, sample_rows_per_chunk(m.vocab_size))
        rows.append(("rollout sampler (transient)", f"fp64 CDFs of {chunk} rows at a time; "
                     "the peak counts the largest transient", _gib(w.sampling_bytes)))
    if opt.decoder == "kv-cache":
        sliced = w.prefill_tokens < plan.rollout_seqs * plan.prompt_len
        rows.append(("rollout prefill (transient)",
                     f"one layer over {w.prefill_tokens} prompt tokens"
                     + (" per slice" if sliced else " (all prompts at once)"),
                     _gib(w.prefill_bytes)))
    rows.append((f"= rollout peak (+{opt.reserve_gib:g} GiB reserve)", "", _gib(w.rollout_peak)))
    if w.save_bytes:
        rows.append(("checkpoint save (transient)", "the optimizer state all-gathered over DP "
                     "on the GPU, one buffer at a time", _gib(w.save_bytes)))
        rows.append((f"= save peak (+{opt.reserve_gib:g} GiB reserve)", "", _gib(w.save_peak)))
    room = plan.gpu_mem_bytes - w.peak
    rows.append(("PEAK", f"fits {opt.gpu_mem_gib:g} GiB: {'yes' if plan.fits else 'NO'} "
                 f"({'margin' if room >= 0 else 'short by'} {_gib(abs(room))})", _gib(w.peak)))
    return rows


def format_plan(plan: MemoryPlan, cfg, title: str = "", use_rich: bool | None = None) -> str:
    """The report as text (rich tables when ``rich`` is installed, plain columns otherwise)."""
    m = cfg.model
    moe = f", {m.num_experts} experts top-{m.moe_router_topk}" if m.is_moe else ", dense"
    head = [
        f"model   {_count(plan.total_params)} params ({_count(plan.active_params)} active), "
        f"{plan.params_dtype}, {m.num_layers} layers{moe}",
        f"layout  world {plan.world_size} = tp {plan.tp} x pp {plan.pp} x dp {plan.dp}; "
        f"ep {plan.ep}, expert-dp {plan.expert_dp}; sequence parallel "
        f"{'on' if plan.sequence_parallel else 'off'}",
        f"rollout {plan.rollout_seqs} seqs per DP rank x {plan.seq_len} tokens "
        f"({plan.prompt_len} prompt + {cfg.rollout.max_new_tokens} new)",
        f"update  {cfg.algo.mini_batches} mini-batch(es) x {plan.micro_batches} micro-batch(es) "
        + (f"packed to {plan.micro_batch_tokens} tokens (parallel.max_tokens_per_microbatch; "
           f"worst case: every row {plan.seq_len} tokens)" if plan.packed else
           f"of {plan.micro_batch_seqs} seq(s) = {plan.micro_batch_tokens} tokens"),
    ]
    w = plan.worst
    table_title = (f"per-GPU memory, worst pipeline stage {w.stage} "
                   f"(layers {w.layers[0]}-{w.layers[1] - 1})")
    rows = _rows(plan, cfg)
    stage_rows = [(str(s.stage), f"{s.layers[0]}-{s.layers[1] - 1}",
                   _count(s.dense_params + s.expert_params), _gib(s.train_peak),
                   _gib(s.rollout_peak), _gib(s.save_peak)) for s in plan.stages] \
        if plan.pp > 1 else []
    tail = [f"note: {n}" for n in plan.notes]
    if use_rich is None:
        try:
            import rich  # noqa: F401
            use_rich = True
        except ImportError:
            use_rich = False
    if use_rich:
        return _render_rich(title, head, table_title, rows, stage_rows, tail)
    return _render_plain(title, head, table_title, rows, stage_rows, tail)


def _render_plain(title, head, table_title, rows, stage_rows, tail) -> str:
    out = [title] if title else []
    out += head + ["", table_title]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    out.append(f"{'component':<{w0}}  {'detail':<{w1}}  {'memory':>10}")
    for a, b, c in rows:
        out.append(f"{a:<{w0}}  {b:<{w1}}  {c:>10}")
    if stage_rows:
        out += ["", "per pipeline stage:",
                f"{'stage':>5}  {'layers':>7}  {'params/rank':>11}  {'train peak':>11}  "
                f"{'rollout peak':>12}  {'save peak':>10}"]
        out += [f"{a:>5}  {b:>7}  {c:>11}  {d:>11}  {e:>12}  {f:>10}"
                for a, b, c, d, e, f in stage_rows]
    return "\n".join(out + tail)


def _render_rich(title, head, table_title, rows, stage_rows, tail) -> str:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text  # cells as Text: "[B, V]" must not be read as rich markup

    console = Console(width=160, record=True, file=_Null(), color_system=None)
    if title:
        console.print(title, markup=False)
    for line in head:
        console.print(line, markup=False)
    table = Table(title=table_title, title_justify="left")
    table.add_column("component")
    table.add_column("detail")
    table.add_column("memory", justify="right", no_wrap=True)
    for a, b, c in rows:
        table.add_row(Text(a), Text(b), Text(c), end_section=a.startswith("="))
    console.print(table)
    if stage_rows:
        st = Table(title="per pipeline stage", title_justify="left")
        for name in ("stage", "layers", "params/rank", "train peak", "rollout peak",
                     "save peak"):
            st.add_column(name, justify="right")
        for r in stage_rows:
            st.add_row(*(Text(x) for x in r))
        console.print(st)
    for line in tail:
        console.print(line, markup=False, soft_wrap=True)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines())


class _Null:
    """A write sink: rich records the text, which export_text returns."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        return None


def _plan_dict(plan: MemoryPlan) -> dict:
    d = dataclasses.asdict(plan)
    d["worst_stage"] = plan.worst.stage
    del d["worst"]
    for st, obj in zip(d["stages"], plan.stages):
        st["resident_bytes"] = obj.resident_bytes
        st["peak"] = obj.peak
    return d


def what_fits(cfg, plan: MemoryPlan, **options) -> list[dict]:
    """For a plan that does not fit: per GPU count (this one, then 2x and 4x), the cheapest
    activation recompute that fits, as ``{"world_size", "recompute", "peak"}`` (the first
    two found); ``options`` as :func:`plan_memory` took them, less world size and recompute.
    A layout the trainer refuses at a GPU count is ``{"world_size", "refused": reason}``."""
    found: list[dict] = []
    for world in (plan.world_size, 2 * plan.world_size, 4 * plan.world_size):
        for recompute in RECOMPUTE_MODES:  # cheapest first
            if (world, recompute) == (plan.world_size, plan.options.recompute):
                continue
            try:
                other = plan_memory(cfg, world, plan.options.gpu_mem_gib,
                                    recompute=recompute, **options)
            except ValueError as e:  # the same for every recompute at this GPU count
                found.append({"world_size": world, "refused": str(e)})
                break
            if other.fits:
                found.append({"world_size": world, "recompute": recompute,
                              "peak": other.worst.peak})
                break
        if sum("peak" in f for f in found) == 2:
            break
    return found


def _fits_lines(found: list[dict], plan: MemoryPlan, recipe_recompute: str) -> list[str]:
    """What a run needs for each of :func:`what_fits`' layouts, as plan flags and overrides."""
    if plan.fits:
        return []
    gib = plan.options.gpu_mem_gib
    lines = [f"at {f['world_size']} GPUs the layout is refused: {f['refused']}"
             for f in found if "refused" in f]
    fits = [f for f in found if "peak" in f]
    if not fits:
        return lines + [f"nothing else planned at up to {4 * plan.world_size} GPUs (this "
                        f"layout's tp/pp/ep, more data parallelism) fits {gib:g} GiB with any "
                        f"recompute"]
    for f in fits:
        flags = [f"--gpus {f['world_size']}"] if f["world_size"] != plan.world_size else []
        if f["recompute"] != recipe_recompute:
            flags.append(f"--override parallel.recompute={f['recompute']}")
        how = " ".join(flags) if flags else "the run's own settings (no --recompute what-if)"
        margin = plan.gpu_mem_bytes - f["peak"]  # the mode is named: a what-if may differ
        lines.append(f"fits {gib:g} GiB with {how}: {f['peak'] / GiB:.1f} GiB (recompute "
                     f"{f['recompute']}, margin {margin / GiB:.1f} GiB)")
    return lines + ["(a run takes --parallel.world_size=N for --gpus N, and the same overrides)"]


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="r1fast plan",
                                description="per-GPU memory plan of a GRPO recipe")
    p.add_argument("recipe", help="TOML recipe, e.g. recipes/qwen3_30b_a3b.toml")
    p.add_argument("--gpu-mem", type=float, default=80.0, metavar="GiB",
                   help="memory of one GPU in GiB (default 80; an H200 shows ~140)")
    p.add_argument("--gpus", "--world-size", dest="world_size", type=int, default=None,
                   help="GPUs in the job (default: parallel.world_size of the recipe, else "
                        "tp*pp*dp with --dp, else the smallest valid world)")
    p.add_argument("--dp", type=int, default=None,
                   help="data-parallel size; the world is tp*pp*dp (ignored with --gpus)")
    p.add_argument("--recompute", choices=RECOMPUTE_MODES, default=None,
                   help="activation recompute counted in the total (default: the recipe's "
                        "parallel.recompute; another value is a what-if, said on stderr; "
                        "all three are shown)")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="prompt tokens per sequence (default data.max_prompt_tokens, else 512, "
                        "at most max_position_embeddings - max_new_tokens)")
    p.add_argument("--decoder", choices=DECODERS, default=None,
                   help="rollout memory model (default: the recipe's rollout.decoder; another "
                        "value is a what-if, said on stderr, and an error when the recipe or an "
                        "override sets rollout.decoder)")
    p.add_argument("--spec", choices=SPECS, default="te",
                   help="layers the activations are counted for: te (Transformer Engine, flash "
                        "attention; GPU default) or local (megatron local layers, as on CPU)")
    p.add_argument("--reserve", type=float, default=2.0, metavar="GiB",
                   help="runtime reserve added to each peak (default 2)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override, e.g. parallel.ep=4 (repeatable); bare --a.b=v works too")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--check", action="store_true",
                   help="exit with status 1 when the plan does not fit")
    p.add_argument("--plain", action="store_true", help="plain text instead of rich tables")
    return p


def _say_where_the_model_comes_from(cfg, has_model_table: bool) -> None:
    """A run starts from ``run.init_from``'s architecture; a plan made where that folder is not
    plans the recipe's [model] table instead (said on stderr), and without one there is no
    model to plan (an error, not the tiny default's plan)."""
    from r1fast.train.config import is_model_folder

    init = cfg.run.init_from
    if not init or is_model_folder(init):
        return
    if not has_model_table:
        raise ValueError(f"run.init_from={init} holds no config.json or r1fast_config.json here, "
                         f"and the recipe has no [model] table: nothing says which model to "
                         f"plan; point run.init_from at the checkpoint folder (its config.json "
                         f"is enough) or write [model]")
    print(f"r1fast plan: note: run.init_from={init} is not a model folder here: planning the "
          f"recipe's [model] table (the run checks it against the checkpoint's config.json)",
          file=sys.stderr)


def _check_flags(args: argparse.Namespace, cfg) -> None:
    """Bad flag values as one-line errors naming the flag the user typed (PlanOptions would
    name its own fields, which are not what was typed)."""
    for flag, value in (("--gpu-mem", args.gpu_mem), ("--reserve", args.reserve)):
        lo_ok = value > 0 if flag == "--gpu-mem" else value >= 0
        if not (math.isfinite(value) and lo_ok):  # inf would overflow int(GiB * value)
            allowed = "a finite number > 0" if flag == "--gpu-mem" else "a finite number >= 0"
            raise ValueError(f"{flag} must be {allowed} (GiB), got {value:g}")
    if args.world_size is not None and args.world_size < 1:
        raise ValueError(f"--gpus must be >= 1, got {args.world_size}")
    if args.prompt_len is not None:
        # prompt + new tokens must fit the positions the model was built for (as the trainer's
        # data.max_prompt_tokens check); a longer plan describes a run that cannot happen
        most = cfg.model.max_position_embeddings - cfg.rollout.max_new_tokens
        if not 1 <= args.prompt_len <= most:
            raise ValueError(f"--prompt-len must be in [1, {most}] (model.max_position_embeddings "
                             f"{cfg.model.max_position_embeddings} - rollout.max_new_tokens "
                             f"{cfg.rollout.max_new_tokens}), got {args.prompt_len}")


def _decoder(args: argparse.Namespace, cfg, raw: dict) -> str:
    """The rollout decoder to plan: the run's ``rollout.decoder`` unless ``--decoder`` says
    otherwise; ``--decoder`` against a decoder the recipe or an override sets is an error."""
    run = cfg.rollout.decoder.replace("_", "-")  # the config says kv_cache, the planner kv-cache
    if args.decoder is None or args.decoder == run:
        return run
    if "decoder" in (raw.get("rollout") or {}):
        raise ValueError(f"--decoder {args.decoder} contradicts rollout.decoder="
                         f"{cfg.rollout.decoder} of the recipe/overrides: give one of them")
    print(f"r1fast plan: note: --decoder {args.decoder} is a what-if: the recipe runs with "
          f"rollout.decoder={cfg.rollout.decoder} (set it, e.g. --override rollout.decoder="
          f"{args.decoder.replace('-', '_')}, to run what this plans)", file=sys.stderr)
    return args.decoder


def _on_a_gpu(cfg):
    """``cfg`` with its "auto" experts settings as a GPU resolves them (the grouped kernels):
    the local spec alone would plan them as on a CPU (megatron's per-expert loop)."""
    def grouped(obj):
        return dataclasses.replace(obj, experts="grouped") if obj.experts == "auto" else obj

    return dataclasses.replace(cfg, parallel=grouped(cfg.parallel), rollout=grouped(cfg.rollout))


def _without_te(local: MemoryPlan) -> str:
    """The note that the default plan counts Transformer Engine's layers, with the peak of the
    layers r1fast builds where Transformer Engine is absent (it is not a dependency)."""
    from r1fast.megatron_compat import te_absent

    here = " (not installed on this machine)" if te_absent() else ""
    return (f"activations are counted for Transformer Engine's layers (--spec te: flash "
            f"attention, fused norms). r1fast does not install Transformer Engine{here}; on "
            f"GPUs without it, it builds megatron's local layers (unpacked rows keep [s, s] "
            f"attention scores; MLA's attention keeps fp32 scores per head): peak "
            f"{local.worst.peak / GiB:.1f} GiB, {'fits' if local.fits else 'does NOT fit'} "
            f"(--spec local)")


def plan_main(argv: Sequence[str]) -> int:
    """Entry of ``r1fast plan``: 0 (1 with ``--check`` when it does not fit), 2 on a bad
    recipe, option or layout."""
    from r1fast.typed_toml import ConfigError, read
    from r1fast.train.config import load_train_config

    parser = _parser()
    args, rest = parser.parse_known_args(list(argv))
    overrides = [o if o.startswith("--") else f"--{o}" for o in args.override] + list(rest)
    try:
        cfg = load_train_config(args.recipe, overrides)
        raw = read(args.recipe, overrides)
        _say_where_the_model_comes_from(cfg, "model" in raw)
        _check_flags(args, cfg)
        world = args.world_size
        if world is None and args.dp is not None:
            if args.dp < 1:
                raise ValueError(f"--dp must be >= 1, got {args.dp}")
            world = cfg.parallel.tp * cfg.parallel.pp * args.dp
        recompute = cfg.parallel.recompute if args.recompute is None else args.recompute
        if recompute != cfg.parallel.recompute:  # a plan of a run the recipe would not make
            print(f"r1fast plan: note: --recompute {recompute} is a what-if: the recipe runs "
                  f"with parallel.recompute={cfg.parallel.recompute} (set it, e.g. "
                  f"--override parallel.recompute={recompute}, to run what this plans)",
                  file=sys.stderr)
        options = dict(prompt_len=args.prompt_len, spec=args.spec,
                       decoder=_decoder(args, cfg, raw), reserve_gib=args.reserve)
        plan = plan_memory(cfg, world, args.gpu_mem, recompute=recompute, **options)
        if args.spec == "te":  # the layers a GPU without Transformer Engine runs
            local = plan_memory(_on_a_gpu(cfg), world, args.gpu_mem, recompute=recompute,
                                **{**options, "spec": "local"})
            plan.notes.append(_without_te(local))
    except (ConfigError, ValueError) as e:
        print(f"r1fast plan: error: {e}", file=sys.stderr)
        return 2
    found = [] if plan.fits else what_fits(cfg, plan, **options)
    if args.json:
        print(json.dumps({**_plan_dict(plan), "fits_with": found}, indent=1))
    else:
        title = f"r1fast plan {args.recipe}" + (f" {' '.join(overrides)}" if overrides else "")
        print(format_plan(plan, cfg, title=title, use_rich=False if args.plain else None))
        for line in _fits_lines(found, plan, cfg.parallel.recompute):
            print(line)
    return 1 if args.check and not plan.fits else 0


if __name__ == "__main__":
    sys.exit(plan_main(sys.argv[1:]))
