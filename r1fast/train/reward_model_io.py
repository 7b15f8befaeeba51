"""A reward model on the megatron policy: its scalar head, batched scoring, and its folder.

R1's fourth stage scores general prompts with a learned reward model. r1fast's is the policy
architecture itself (any TP/PP/EP layout) plus a scalar head: the final-normed hidden state of
the LAST real token of ``prompt + response`` (the appended eos) times a weight ``[1, H]`` gives
one score. The head is replicated on every TP rank: the hidden states it reads are the same on
every TP rank (gathered over the sequence-parallel split), so every rank computes the same score
and delivers the full input-gradient the policy's heads must deliver, and its gradient needs no
TP reduction (megatron's grad norm counts a replicated parameter once, on TP rank 0).

Text -> tokens is :func:`encode_texts`, shared by training and scoring so both see the same
ids: ``tokenizer.encode(prompt + response, add_bos=True, add_eos=True)``, cut to its last
``max_length`` tokens (the end carries the answer and the token the head reads), right-padded.
A cut is never silent: scoring warns the first time and counts ``texts_cut``; training logs
``texts_cut`` per step.

A reward-model folder (``r1fast stage reward-model`` writes ``OUT/model``; a recipe's
``[reward] reward_model`` names it) is an ordinary model folder plus two files:

- ``model.safetensors``, ``config.json``, ``r1fast_config.json``, tokenizer files,
  ``generation_config.json``: the backbone (:func:`r1fast.train.policy_io.save_model`; it also
  loads as a policy);
- ``reward_head.safetensors``: ``score.weight`` [1, H];
- ``reward_model.json``: format, ``max_length``, the token ids the head reads, training
  summary (held-out accuracy). Written last: a folder without it is not a reward model.

:func:`export_sequence_classifier` writes the Hugging Face layout of the same model
(``XForSequenceClassification``, ``num_labels = 1``, the head as ``score.weight``), which
``AutoModelForSequenceClassification`` loads: transformers also scores the last non-pad token.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger("r1fast.train")

HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_model.json"
FORMAT = "r1fast-reward-model"
HEAD_KEY = "score.weight"


class RewardBackbone(torch.nn.Module):
    """What megatron DDP wraps for a trainable reward model: the GPT chunk (as ``module``:
    megatron's attribute lookups unwrap ``.module`` until they find e.g. ``set_input_tensor``
    or ``pre_process`` on the GPTModel) and, on the last pipeline stage, ``score`` [1, H]."""

    def __init__(self, gpt: torch.nn.Module, hidden_size: int, *, init_std: float, seed: int):
        super().__init__()
        self.module = gpt
        self.score: Optional[torch.nn.Linear] = None
        if gpt.post_process:
            ref = next(gpt.parameters())
            self.score = torch.nn.Linear(hidden_size, 1, bias=False, device=ref.device,
                                         dtype=ref.dtype)
            # its own generator: the same initial head on every rank, whatever megatron's
            # model-parallel RNG streams did to the global one
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                self.score.weight.copy_(torch.randn(1, hidden_size, generator=g) * init_std)


def head_scores(weight: torch.Tensor, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Scores [b] fp32 of hidden states [b, L, H] (the policy's head input) read at the last
    real token ``lengths - 1`` of each row, times the head ``weight`` [1, H]."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, lengths.to(hidden.device) - 1]  # [b, H]
    return F.linear(last.float(), weight.float())[:, 0]


def encode_texts(tokenizer, texts: Sequence[str], max_length: int
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(tokens [B, L] int64, lengths [B] int64, cut)``: each text with bos and eos, cut to its
    last ``max_length`` tokens, right-padded with the tokenizer's pad id (see the module
    docstring); ``cut`` counts the texts that lost their start (callers report it)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a token and the eos), got {max_length}")
    full = [tokenizer.encode(t, add_bos=True, add_eos=True) for t in texts]
    cut = sum(len(x) > max_length for x in full)
    ids = [x[-max_length:] for x in full]
    longest = max(len(x) for x in ids)
    tokens = torch.full((len(ids), longest), int(tokenizer.pad_id), dtype=torch.long)
    for row, seq in enumerate(ids):
        tokens[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return tokens, torch.tensor([len(x) for x in ids], dtype=torch.long), cut


class PolicyRewardModel:
    """``texts -> scores [B]`` (fp32, CPU) through a policy and a head: one forward-only pass
    of megatron's schedule per call, every score broadcast to every pipeline stage.

    Collective: every rank of the layout calls it together, the ranks of one model replica
    with the same texts. An empty list still runs a one-token forward (and returns no scores),
    so a rank with nothing to score keeps the expert all-to-all and the pipeline in step with
    ranks that have texts (see :class:`r1fast.rewards.reward_model.RewardModelReward`'s
    ``sync``)."""

    def __init__(self, policy, head_weight: Optional[torch.Tensor], tokenizer, max_length: int):
        if tokenizer.vocab_size > policy.model_cfg.vocab_size:
            raise ValueError(f"the reward model's tokenizer has {tokenizer.vocab_size} tokens but "
                             f"its model.vocab_size is {policy.model_cfg.vocab_size}")
        self.policy, self.head_weight = policy, head_weight
        self.tokenizer, self.max_length = tokenizer, int(max_length)
        self.texts_cut = 0
        """Texts scored so far that were longer than ``max_length`` (their start cut off)."""

    def scores(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Scores [B] of encoded rows (every rank receives them)."""
        out = self.policy._inference(  # the forward-only schedule + broadcast over PP
            tokens, lambda hidden, mb: (head_scores(self.head_weight, hidden, mb["lengths"]),),
            [(tokens.shape[0],)], tokens.shape[0], True, per_row={"lengths": lengths})
        return out[0].detach().float().cpu()

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        if not texts:  # an idle call: run the collectives, return nothing
            pad = int(self.tokenizer.pad_id)
            self.scores(torch.full((1, 1), pad, dtype=torch.long), torch.ones(1, dtype=torch.long))
            return torch.zeros(0)
        tokens, lengths, cut = encode_texts(self.tokenizer, texts, self.max_length)
        if cut and not self.texts_cut:
            log.warning("reward model: %d of %d texts are longer than its max_length=%d tokens "
                        "and are scored on their last %d tokens (the prompt's start is cut); "
                        "later cuts are counted in texts_cut", cut, len(texts),
                        self.max_length, self.max_length)
        self.texts_cut += cut
        return self.scores(tokens, lengths)


# ------------------------------------------------------------------------------------------
# The folder
# ------------------------------------------------------------------------------------------

def _head_on_rank0(policy, head_weight: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The head [1, H] on global rank 0 (it lives on the last pipeline stage); collective."""
    import torch.distributed as dist

    if policy.info.pp == 1:
        return head_weight
    from megatron.core import parallel_state as ps

    buf = (head_weight.detach().float().contiguous() if head_weight is not None else
           torch.empty(1, policy.model_cfg.hidden_size, device=policy.device))
    dist.broadcast(buf, src=ps.get_pipeline_model_parallel_last_rank(), group=policy.pp_group)
    return buf


def save_reward_model(policy, head_weight: Optional[torch.Tensor], tokenizer, path: str | Path,
                      *, max_length: int, summary: Optional[dict] = None) -> Path:
    """Write the reward-model folder ``path`` (see the module docstring). Collective; rank 0
    writes; ``reward_model.json`` last."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from r1fast.train.policy_io import save_model

    path = save_model(policy, tokenizer, path)
    head = _head_on_rank0(policy, head_weight)
    if policy.info.rank == 0:
        if not bool(torch.isfinite(head).all()):
            raise FloatingPointError(f"save_reward_model: the head holds NaN/Inf; {path} has "
                                     f"the backbone but no head")
        save_file({HEAD_KEY: head.detach().float().cpu().contiguous()}, str(path / HEAD_FILE))
        meta = {"format": FORMAT, "version": 1, "max_length": int(max_length),
                "hidden_size": int(policy.model_cfg.hidden_size),
                "reads": "last token of tokenizer.encode(prompt + response, add_bos, add_eos)",
                "pad_id": int(tokenizer.pad_id), "eos_id": int(tokenizer.eos_id),
                **(summary or {})}
        (path / META_FILE).write_text(json.dumps(meta, indent=1))
    if dist.is_initialized():
        dist.barrier()
    return path


def read_meta(path: str | Path, what: str = "reward model") -> dict:
    """``reward_model.json`` of folder ``path``; a one-line error when it is not one."""
    file = Path(path) / META_FILE
    if not file.is_file():
        raise ValueError(f"{what} {path} is not a reward-model folder (no {META_FILE}); "
                         f"train one with `r1fast stage reward-model` and name its model/ folder")
    meta = json.loads(file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{what} {file}: format must be {FORMAT!r}, got {meta.get('format')!r}")
    return meta


def check_reward_model_folder(path: str | Path, what: str = "reward model") -> dict:
    """The meta of reward-model folder ``path`` once its files are there: ``reward_model.json``,
    the model's config and the score head. Cheap (no weights read), so a run checks it before
    it builds its own model; a one-line error naming ``what`` otherwise."""
    from r1fast.policy.hf_checkpoint import load_model_config

    meta = read_meta(path, what)
    try:
        load_model_config(str(path))
    except ValueError as e:
        raise ValueError(f"{what} {path}: {e}") from None
    if not (Path(path) / HEAD_FILE).is_file():
        raise ValueError(f"{what} {path}: {HEAD_FILE} (the score head) is missing")
    return meta


def load_head(path: str | Path, hidden_size: int) -> torch.Tensor:
    """``score.weight`` [1, H] fp32 of a reward-model folder."""
    from safetensors.torch import load_file

    file = Path(path) / HEAD_FILE
    if not file.is_file():
        raise ValueError(f"reward model {path}: {HEAD_FILE} is missing")
    w = load_file(str(file)).get(HEAD_KEY)
    if w is None or tuple(w.shape) != (1, hidden_size):
        raise ValueError(f"reward model {file}: {HEAD_KEY} must have shape [1, {hidden_size}], "
                         f"got {None if w is None else list(w.shape)}")
    return w.float()


def score_scale(meta: dict, path, what: str = "reward model") -> tuple[float, float]:
    """``(scale, bias)`` that standardise a reward model's scores with the mean and standard
    deviation its training recorded (``score_mean`` / ``score_std`` of reward_model.json):
    Bradley-Terry fixes score differences only, so the raw scores have an arbitrary offset and
    a spread that grows with training. An error for a folder without them."""
    mean, std = meta.get("score_mean"), meta.get("score_std")
    if mean is None or std is None:
        raise ValueError(f"{what} {path} records no score scale (score_mean / score_std in "
                         f"{META_FILE}: an older r1fast trained it), so its scores cannot be "
                         f"standardised; train it again, or use its raw scores "
                         f"(reward.reward_model_normalize = false)")
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(f"{what} {path}: score_std must be finite and > 0 to standardise its "
                         f"scores, got mean {mean}, std {std}")
    return 1.0 / std, -mean / std


def load_reward_model(path: str | Path, parallel=None, *, seed: int = 0, batch_size: int = 16,
                      sync: Optional[Callable[[int], int]] = None, what: str = "reward model",
                      prompt_key: str = "prompt", normalize: bool = False):
    """The reward-model folder ``path`` as a :class:`~r1fast.rewards.reward_model.RewardModelReward`
    (``example[prompt_key] + completion`` scored in batches of ``batch_size`` texts, in this
    process), built at ``parallel`` (the run's layout: megatron holds one layout per process).
    ``sync``: see RewardModelReward (pass :func:`r1fast.train.batch.all_ranks_int`'s max when
    several processes score different numbers of texts). ``normalize``: standardised scores,
    ``(score - score_mean) / score_std`` of its training's record (:func:`score_scale`)."""
    from r1fast.data import load_tokenizer
    from r1fast.policy import build_policy
    from r1fast.policy.config import ParallelConfig
    from r1fast.policy.hf_checkpoint import load_model_config
    from r1fast.rewards.reward_model import RewardModelConfig, RewardModelReward
    from r1fast.train.policy_io import load_model_state

    meta = check_reward_model_folder(path, what)
    model_cfg = load_model_config(str(path))
    policy = build_policy(model_cfg, parallel or ParallelConfig(), seed=seed, trainable=False)
    load_model_state(policy, str(path))
    head = load_head(path, model_cfg.hidden_size).to(policy.device)
    scorer = PolicyRewardModel(policy, head if policy.gpt.post_process else None,
                               load_tokenizer(path), meta["max_length"])
    scale, bias = score_scale(meta, path, what) if normalize else (1.0, 0.0)
    config = RewardModelConfig(batch_size=batch_size, max_length=meta["max_length"],
                               prompt_key=prompt_key, scale=scale, bias=bias)
    reward = RewardModelReward(scorer, config=config, sync=sync)
    reward.source = str(path)
    return reward


# ------------------------------------------------------------------------------------------
# Hugging Face export
# ------------------------------------------------------------------------------------------

def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if f.name != HEAD_FILE:
            out.update(load_file(str(f)))
    return out


def tokenizer_appends_eos(folder: Path) -> None:
    """Make the Hugging Face tokenizer in ``folder`` end every text with its eos, as r1fast's
    scoring does (:func:`encode_texts`): transformers' classifier scores the last non-pad
    token, and ``AutoTokenizer(text)`` of a Qwen/Llama tokenizer ends at the text's last token,
    so a user scoring the export the usual way would read another token than the head learned
    on (a WARNING instead where transformers cannot load or change the tokenizer)."""
    from tokenizers.processors import Sequence as Processors, TemplateProcessing
    from transformers import AutoTokenizer

    from r1fast.data.hf_tokenizer import is_char_tokenizer_folder

    if is_char_tokenizer_folder(folder):
        log.warning("reward model export %s: its tokenizer is r1fast's character tokenizer, "
                    "which transformers cannot load: score it with ids that end in the eos, as "
                    "r1fast does", folder)
        return
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    eos, probe = tok.eos_token, "a"
    if tok(probe)["input_ids"][-1:] == [tok.eos_token_id]:
        return
    if not tok.is_fast:
        log.warning("reward model export %s: its slow tokenizer does not end texts with the eos "
                    "%r; append it before scoring", folder, eos)
        return
    backend = tok.backend_tokenizer
    add_eos = TemplateProcessing(single=f"$A {eos}", pair=f"$A $B:1 {eos}:1",
                                 special_tokens=[(eos, tok.eos_token_id)])
    backend.post_processor = add_eos if backend.post_processor is None else \
        Processors([backend.post_processor, add_eos])
    tok.save_pretrained(str(folder))
    again = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)(probe)["input_ids"]
    if again[-1:] != [tok.eos_token_id]:
        raise ValueError(f"reward model export {folder}: the tokenizer still does not end texts "
                         f"with the eos ({again})")
    log.info("reward model export %s: its tokenizer now ends every text with %r, the token "
             "the score is read at", folder, eos)


def export_sequence_classifier(src: str | Path, out: str | Path) -> Optional[Path]:
    """Write reward-model folder ``src`` as a Hugging Face sequence classifier ``out``
    (``config.json`` with ``XForSequenceClassification``, ``num_labels = 1`` and the pad id;
    ``model.safetensors`` with the backbone, without ``lm_head``, and ``score.weight``; the
    tokenizer files). Returns None, with a WARNING, when the backbone has no HF family (no
    ``config.json``). Reads the whole model into memory; call on one process."""
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    meta = read_meta(src)
    if not (src / "config.json").is_file():
        log.warning("reward model %s has no config.json (no Hugging Face family for its "
                    "architecture): not exported as a sequence classifier", src)
        return None
    if meta["pad_id"] == meta["eos_id"]:
        log.warning("reward model %s: pad id == eos id (%d), so transformers' classifier reads "
                    "the token before the eos, not the eos r1fast scores", src, meta["pad_id"])
    cfg = json.loads((src / "config.json").read_text())
    arch = cfg.get("architectures", ["?"])[0]
    if not arch.endswith("ForCausalLM"):
        raise ValueError(f"export_sequence_classifier: {src}/config.json architecture {arch!r} "
                         f"is not a *ForCausalLM")
    cfg.update(architectures=[arch[:-len("ForCausalLM")] + "ForSequenceClassification"],
               num_labels=1, pad_token_id=meta["pad_id"], id2label={"0": "LABEL_0"},
               label2id={"LABEL_0": 0})
    state = {k: v for k, v in _read_safetensors(src).items() if k != "lm_head.weight"}
    state[HEAD_KEY] = load_head(src, meta["hidden_size"])
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    skip = {"config.json", "r1fast_config.json", "model.safetensors.index.json"}
    for f in src.iterdir():  # tokenizer files, generation_config.json, reward_model.json
        if f.is_file() and f.suffix != ".safetensors" and f.name not in skip:
            shutil.copy2(f, tmp / f.name)
    tokenizer_appends_eos(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
