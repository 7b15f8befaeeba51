"""Training a Hugging Face checkpoint on a user's data files, end to end, offline.

The world is built with the real libraries (r1fast.data.tiny_hf): a byte-level BPE trained by
``tokenizers`` with a ChatML chat template, a random Qwen3-MoE saved by ``transformers``,
GSM8K-format JSONL and MATH-format parquet written by ``datasets``."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from r1fast.data import HFTokenizer, load_tokenizer  # noqa: E402
from r1fast.data.tiny_hf import build_tiny_hf  # noqa: E402
from r1fast.train.config import load_train_config  # noqa: E402
from r1fast.train.metrics import read_jsonl  # noqa: E402
from r1fast.typed_toml import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("reward_mean", "loss", "grad_norm", "kl", "entropy", "logp_mismatch", "response_length")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_tiny_hf(tmp_path_factory.mktemp("hf") / "hf_tiny", num_train=64, num_test=8)


def overrides(world, out, *extra):
    return [f"--run.init_from={world['model']}", f"--data.path={world['gsm8k_train']}",
            "--data.preset=gsm8k", "--data.template=r1-zero", f"--run.out_dir={out}",
            "--data.prompts_per_step=2", "--algo.group_size=4", "--rollout.max_new_tokens=8",
            "--reward.workers=0", "--run.progress=false", "--run.tensorboard=false",
            "--algo.kl_coef=0.01", "--optim.lr=0.003", *extra]


def digit_reward(completion: str, example: dict) -> float:
    """Varies within groups from the first step, so the update is not trivially zero."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def run(world, out, steps, **kw):
    from r1fast.train import GRPOTrainer

    cfg = load_train_config(None, overrides(world, out, f"--run.steps={steps}",
                                            "--run.save_every=1"))
    return GRPOTrainer(cfg, reward=digit_reward, **kw).fit()


def test_the_checkpoint_defines_the_model_and_the_tokenizer(world, tmp_path):
    cfg = load_train_config(None, overrides(world, tmp_path))
    hf = json.loads((world["model"] / "config.json").read_text())
    assert cfg.model.vocab_size == hf["vocab_size"] and cfg.model.num_experts == 8
    with pytest.raises(ConfigError, match=r"\[model\] disagrees with run.init_from=.*hidden_size: "
                                          r"\[model\] 32 vs checkpoint 64"):
        load_train_config(None, overrides(world, tmp_path, "--model.hidden_size=32"))
    from r1fast.train.task import build_task

    with pytest.raises(ValueError, match="synthetic task for r1fast's character tokenizer"):
        cfg2 = load_train_config(None, [f"--run.init_from={world['model']}", "--reward.workers=0"])
        build_task(cfg2)
    task = build_task(cfg)
    try:
        assert isinstance(task.tokenizer, HFTokenizer)
        prompt = task.next_prompts(2, 1, 0)[0]["prompt"]
        assert prompt.startswith("<|im_start|>user\nUser: What is ") and \
            prompt.endswith("<|im_start|>assistant\n")
    finally:
        task.close()


def test_cli_train_two_steps_then_export_loads_in_transformers(world, tmp_path):
    out = tmp_path / "grpo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "r1fast.cli", "train", str(ROOT / "recipes/hf_tiny.toml"),
           *overrides(world, out, "--run.steps=2", f"--data.test_path={world['gsm8k_test']}",
                      "--data.eval_k=2", "--data.eval_max_problems=3")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    (ev,) = read_jsonl(out / "eval.jsonl")
    assert ev["step"] == 2 and ev["num_problems"] == 3 and ev["k"] == 2
    assert isinstance(load_tokenizer(out / "tokenizer"), HFTokenizer)
    exported = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "r1fast.cli", "export", str(out), str(exported)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(exported))
    tok = transformers.AutoTokenizer.from_pretrained(str(exported))
    ids = tok(tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                      tokenize=False, add_generation_prompt=True),
              return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > ids.shape[1]
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"]


def test_resume_is_exact(world, tmp_path):
    whole = run(world, tmp_path / "whole", 2)
    run(world, tmp_path / "resumed", 1)
    resumed = run(world, tmp_path / "resumed", 2)
    assert len(resumed) == 1 and whole[0]["reward_mean"] >= 0
    # data.test_path was not set: no evaluation; with it, the end of training evaluates
    assert not (tmp_path / "whole/eval.jsonl").exists()
    for k in KEYS:
        assert whole[1][k] == resumed[0][k], (k, whole[1][k], resumed[0][k])
    assert any(r["grad_norm"] > 0 for r in whole)


def test_logprobs_equal_transformers_on_chat_prompts(world):
    from r1fast.policy import ParallelConfig, build_policy, load_hf_checkpoint
    from r1fast.policy.hf_checkpoint import load_model_config

    tok = load_tokenizer(world["model"])
    policy = build_policy(load_model_config(str(world["model"])), ParallelConfig(),
                          trainable=False)
    load_hf_checkpoint(policy, str(world["model"]))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(world["model"]),
                                                           dtype=torch.float32).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": q}]) + a
             for q, a in (("What is 12 + 30?", "<think>12 plus 30</think> \\boxed{42}"),
                          ("What is 7 + 8?", "\\boxed{15}<|im_end|>"))]
    rows = [tok.encode(t) for t in texts]
    n = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_id] * (n - len(r)) for r in rows])  # right padding
    with torch.no_grad():
        ours = policy.logprobs(ids[:, :-1], ids[:, 1:])
        logits = hf(input_ids=ids).logits[:, :-1].double()
    theirs = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    valid = torch.tensor([[j < len(r) - 1 for j in range(n - 1)] for r in rows])
    err = (ours.double() - theirs)[valid].abs().max().item()
    assert err < 1e-5, err


def test_every_stage_runs_on_the_hf_folder(world, tmp_path):
    import dataclasses

    from r1fast.pipeline import stages
    from r1fast.pipeline.demo import dense_model
    from r1fast.train.metrics import read_jsonl as rows_of

    problems = stages.load_problems(world["gsm8k_test"], world["model"], preset="gsm8k",
                                    template="r1-zero")
    assert problems[0]["prompt"].startswith("<|im_start|>user")
    math_problems = stages.load_problems(world["math_train"], world["model"], preset="math")
    assert math_problems[0]["answer"].isdigit()
    from r1fast.pipeline.filters import RejectionFilterConfig

    # 6 new tokens cut every answer of this tiny model: keep the cut ones for the hand-off
    everything = dataclasses.replace(RejectionFilterConfig.for_keep("all"), reject_truncated=False)
    data, stats = stages.rejection_sample(world["model"], problems[:4], tmp_path / "rs.jsonl",
                                          k=2, max_new_tokens=6, filters=everything)
    assert stats["kept"] > 0 and len(rows_of(data)) == stats["kept"]
    # answers to chat prompts close the turn as the template does (no eos added by SFT)
    assert all(r["completion"].endswith("<|im_end|>\n") and r["completion_ends_turn"]
               for r in rows_of(data))
    sft_model = stages.sft(rows_of(data), tmp_path / "sft", init_from=world["model"], steps=2,
                           batch_size=4)
    assert isinstance(load_tokenizer(sft_model), HFTokenizer)
    student = dataclasses.replace(dense_model(), vocab_size=json.loads(
        (world["model"] / "config.json").read_text())["vocab_size"])
    student_dir, _ = stages.distill(world["model"], problems[:4], tmp_path / "student",
                                    student=student, steps=2, batch_size=4, teacher_data=data)
    assert isinstance(load_tokenizer(student_dir), HFTokenizer)
    result = stages.evaluate(sft_model, problems[:4], k=2, max_new_tokens=6)
    assert result["num_problems"] == 4 and result["k"] == 2
    assert 0.0 <= result["no_answer_rate"] <= 1.0 and 0.0 <= result["pass_at_1"] <= 1.0
