"""GRPO learns on real-tokenizer data (slow: a few minutes on 2 CPU cores).

The task is a JSONL of "Repeat the number N." prompts whose answer is N in ``\\boxed{}``, run
through the tiny Qwen3-MoE / byte-level BPE / ChatML world of r1fast.data.tiny_hf. A short SFT
on a noisy version (half the answers wrong) gives a base that is right about a fifth of the
time and still varies within a group (GRPO needs that); GRPO with the math-accuracy reward
(math-verify against the row's answer) then raises the mean reward. The statistics are over
``PROMPTS`` x ``GROUP`` samples per step, seed 0."""
import json
import random
import statistics

import pytest

pytest.importorskip("transformers")

STEPS, PROMPTS, GROUP = 60, 16, 8


@pytest.mark.slow
def test_grpo_raises_the_reward_on_a_jsonl_task(tmp_path):
    from r1fast.data import load_tokenizer
    from r1fast.data.files import load_examples
    from r1fast.data.tiny_hf import build_tiny_hf
    from r1fast.pipeline import stages
    from r1fast.train import GRPOTrainer, load_train_config
    from r1fast.train.config import DataConfig
    from r1fast.train.task import render_prompt

    world = build_tiny_hf(tmp_path / "world", num_train=64, num_test=8, seed=0)
    rng = random.Random(1)
    rows = [{"question": f"Repeat the number {n}.", "answer": str(n)}
            for n in rng.sample(range(10, 100), 90)]
    data = tmp_path / "repeat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(world["model"])
    examples, _ = load_examples(data, prompt_key="question", answer_key="answer")
    noisy = [{"prompt": render_prompt(e, tok, DataConfig()),
              "completion": "\\boxed{%s}<|im_end|>" % (e["answer"] if rng.random() < 0.5
                                                      else rng.randint(10, 99))}
             for e in examples]
    base = stages.sft(noisy, tmp_path / "base", init_from=world["model"], steps=120,
                      batch_size=32, lr=3e-3)
    cfg = load_train_config(None, [
        f"--run.init_from={base}", f"--data.path={data}", "--data.prompt_key=question",
        "--data.answer_key=answer", f"--run.out_dir={tmp_path / 'rl'}", f"--run.steps={STEPS}",
        "--run.progress=false", "--run.tensorboard=false", f"--data.prompts_per_step={PROMPTS}",
        f"--algo.group_size={GROUP}", "--rollout.max_new_tokens=8", "--reward.workers=0",
        "--algo.kl_coef=0.0", "--optim.lr=5e-4", "--reward.weights={accuracy = 1.0}",
        "--parallel.max_tokens_per_microbatch=512"])
    rewards = [r["reward_mean"] for r in GRPOTrainer(cfg).fit()]
    k = STEPS // 4
    first, last = rewards[:k], rewards[-k:]
    se = (statistics.pvariance(first) / k + statistics.pvariance(last) / k) ** 0.5
    gain = statistics.mean(last) - statistics.mean(first)
    print(f"mean reward first {k} steps {statistics.mean(first):.3f}, last {k} "
          f"{statistics.mean(last):.3f}, gain {gain:.3f} (SE {se:.3f}, "
          f"{PROMPTS * GROUP} samples/step, seed 0)")
    assert gain > max(0.05, 3 * se), (gain, se, rewards)
