"""Synthetic reasoning tasks, the R1-Zero prompt template, a character tokenizer and a
resumable prompt dataset.

``generate_task("countdown", 1000, split="train", seed=0)`` makes examples with a prompt, a
ground truth, a cold-start chain of thought and the name of the reward that checks them;
``sft_target(cot, answer)`` builds the SFT completion; :class:`CharTokenizer` (alias
``Tokenizer``) is the vocabulary saved with checkpoints; :class:`PromptDataset` feeds the
trainer batches and checkpoints its position; :class:`RowStream` draws SFT rows without
replacement.
"""
from r1fast.data.dataset import PromptDataset, RowStream
from r1fast.data.tasks import (TASKS, ArithmeticConfig, CountdownConfig, generate_arithmetic,
                               generate_countdown, generate_task, split_of)
from r1fast.data.template import PROMPT_TEMPLATE, make_prompt, sft_example, sft_target
from r1fast.data.hf_tokenizer import HFTokenizer, load_tokenizer
from r1fast.data.tokenizer import SPECIAL_TOKENS, CharTokenizer, Tokenizer

__all__ = [
    "PromptDataset", "RowStream",
    "TASKS", "ArithmeticConfig", "CountdownConfig", "generate_arithmetic", "generate_countdown",
    "generate_task", "split_of",
    "PROMPT_TEMPLATE", "make_prompt", "sft_example", "sft_target",
    "SPECIAL_TOKENS", "CharTokenizer", "Tokenizer", "HFTokenizer", "load_tokenizer",
]
