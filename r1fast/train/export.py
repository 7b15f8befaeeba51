"""``r1fast export RUN_OR_CHECKPOINT OUT_DIR``: a training checkpoint -> a Hugging Face folder.

The output is what ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``
load: safetensors in the HF family's names (``config.json``), ``generation_config.json`` with the
tokenizer's stop ids, the tokenizer files, and ``r1fast_config.json`` (the exact architecture).

``RUN_OR_CHECKPOINT`` is a GRPO or SFT run folder (``checkpoints/``: its newest complete
checkpoint is taken) or one ``checkpoints/step_N`` folder. The model is in megatron's
distributed-checkpoint format, so one process exports a checkpoint written at any layout (it
builds the model at one rank); under ``torchrun --nproc-per-node N`` (``scripts/launch.sh``)
the run's own parallel layout is used and each rank writes the tensors it owns
(:mod:`r1fast.policy.hf_save`): a model too large for one process exports this way.
Checkpoints of the older per-rank format export only at the layout that wrote them. The
tokenizer is the run's (``tokenizer/``), else the one of its ``run.init_from`` folder; MTP
layers (never trained) are copied from ``init_from``. ``OUT_DIR`` may not be the run folder or
hold it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tomllib
from pathlib import Path
from typing import Sequence

from r1fast import typed_toml
from r1fast.cli import ArgumentParser, log_to_stderr

log = logging.getLogger("r1fast.train")


def _resolve(src: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) of ``src``."""
    from r1fast.train.checkpoint import latest_checkpoint

    if not src.exists():
        raise ValueError(f"export: {src} does not exist (give a run folder or one of its "
                         f"checkpoints/step_* folders)")
    if (src / "meta.json").is_file():
        return src.parent.parent, src
    if not (src / "config.toml").is_file() and not (src / "checkpoints").is_dir():
        raise ValueError(f"export: {src} is neither a run folder (checkpoints/) nor a checkpoint "
                         f"folder (meta.json)")
    ckpt = latest_checkpoint(src / "checkpoints")
    if ckpt is None:
        raise ValueError(f"export: run folder {src} has no complete checkpoint")
    return src, ckpt


def _run_config(text: str):
    """The run's config from its checkpoint's TOML: a GRPO run's TrainConfig (``[run]`` table)
    or an SFT run's SFTConfig."""
    from r1fast.train.config import TrainConfig
    from r1fast.train.sft import SFTConfig

    data = tomllib.loads(text)
    return typed_toml.from_dict(TrainConfig if "run" in data else SFTConfig, data)


def _run_field(cfg, name: str):
    """``run.<name>`` of a GRPO TrainConfig, ``<name>`` of an SFTConfig."""
    return getattr(cfg.run if hasattr(cfg, "run") else cfg, name)


def _tokenizer(run_dir: Path, cfg):
    from r1fast.data import load_tokenizer
    from r1fast.train.task import run_tokenizer

    if (run_dir / "tokenizer").is_dir():
        return load_tokenizer(run_dir / "tokenizer")
    if hasattr(cfg, "run"):  # a GRPO run: the run's own rule (init_from's, else characters)
        log.warning("export: %s has no tokenizer/ folder (written by older runs); using the "
                    "tokenizer of run.init_from=%s", run_dir, cfg.run.init_from)
        return run_tokenizer(cfg)
    if cfg.init_from is None:
        raise ValueError(f"export: SFT run {run_dir} has no tokenizer/ folder (written by older "
                         f"runs) and its config has no init_from to take one from")
    log.warning("export: %s has no tokenizer/ folder (written by older runs); using the "
                "tokenizer of init_from=%s", run_dir, cfg.init_from)
    return load_tokenizer(cfg.init_from)


def export_layout(run, sharded: bool, layout: dict[str, int] | None, world: int, ckpt):
    """The ParallelConfig an export of checkpoint ``ckpt`` builds its model at, from the run's
    (``run``): one process reads a distributed (``sharded``) checkpoint at any layout; under
    torchrun the run's TP/PP/EP (or ``layout``) over the ``world`` processes at hand, whatever
    the run's pinned ``world_size`` was (a 16-GPU run exported on 8 was refused, with advice
    export could not take)."""
    from r1fast.policy.config import ParallelConfig

    if layout and not sharded:
        raise ValueError(f"export: {ckpt} is a single-file checkpoint (an older format), read "
                         f"at the run's own layout only; drop --tp/--pp/--ep")
    if world == 1 and sharded and not layout:
        return ParallelConfig(world_size=1)  # any layout reshards into one process
    layout = dict(layout or {})
    if layout.get("tp", run.tp) != run.tp:  # the run's choice was for its own TP
        layout.setdefault("sequence_parallel", None)
    if layout.get("pp", run.pp) != run.pp:  # the run's stage split was for its own PP
        layout.update(pp_first_stage_layers=None, pp_last_stage_layers=None)
    return dataclasses.replace(run, world_size=None, **layout)


def export_checkpoint(src: str | Path, out: str | Path, overwrite: bool = False,
                      layout: dict[str, int] | None = None) -> Path:
    """Write the policy of checkpoint ``src`` as an HF folder ``out`` (collective); an
    existing non-empty ``out`` is replaced only with ``overwrite``. Under torchrun the model is
    built at the run's TP/PP/EP over the processes at hand, or at ``layout`` (``{"tp": 2,
    ...}``): a distributed checkpoint reads at any layout."""
    from r1fast.policy import build_policy
    from r1fast.policy.dist_ckpt import load_sharded
    from r1fast.train.checkpoint import load_checkpoint
    from r1fast.train.policy_io import keep_mtp_of_init, load_model_state, save_model

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"export: {out} already exists and is not empty; it would be "
                         f"replaced whole (pass --overwrite to allow that)")
    run_dir, ckpt = _resolve(Path(src).resolve())  # a relative step_N still finds its run
    target = out.resolve()
    if run_dir.is_relative_to(target) or ckpt.is_relative_to(target):
        raise ValueError(f"export: out_dir {out} is or holds the run being exported ({run_dir});"
                         f" replacing it would delete the run's checkpoints; choose another "
                         f"folder (e.g. {run_dir / 'hf'})")
    meta = json.loads((ckpt / "meta.json").read_text())
    if "reward_data" in meta:
        raise ValueError(f"export: {ckpt} is a reward-model checkpoint (export writes policies); "
                         f"run `r1fast stage reward-model` again with --out {run_dir} and the "
                         f"same settings: it resumes there and writes {run_dir / 'model'}")
    text = meta.get("config") or (run_dir / "config.toml").read_text()
    cfg = _run_config(text)
    parallel = export_layout(cfg.parallel, (ckpt / "policy").is_dir(), layout,
                             int(os.environ.get("WORLD_SIZE", "1")), ckpt)
    policy = build_policy(cfg.model, parallel, trainable=False, seed=_run_field(cfg, "seed"))
    state, _ = load_checkpoint(ckpt)
    if state is None or "model" not in state:
        load_sharded(policy, None, ckpt / "policy")
    else:
        load_model_state(policy, state["model"])
    keep_mtp_of_init(policy, _run_field(cfg, "init_from"), "export")
    path = save_model(policy, _tokenizer(run_dir, cfg), out)
    log.info("exported %s (step %s) to %s", ckpt, meta.get("step"), path)
    return path


def export_main(argv: Sequence[str]) -> int:
    ap = ArgumentParser(prog="r1fast export", description=__doc__.splitlines()[0])
    ap.add_argument("source", help="run folder or checkpoints/step_N folder")
    ap.add_argument("out_dir", help="the Hugging Face folder to write (new or empty)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing out_dir, whatever it holds")
    for name in ("tp", "pp", "ep"):
        ap.add_argument(f"--{name}", type=int, help=f"under torchrun: {name.upper()} size to "
                        f"build the model at (default: the run's; any layout reads the "
                        f"checkpoint, and the processes at hand need not be the run's)")
    args = ap.parse_args(list(argv))
    log_to_stderr("%(message)s")
    layout = {k: getattr(args, k) for k in ("tp", "pp", "ep") if getattr(args, k) is not None}
    export_checkpoint(args.source, args.out_dir, overwrite=args.overwrite,
                      layout=layout)  # logs where
    return 0
