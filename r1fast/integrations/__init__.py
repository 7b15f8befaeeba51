"""Using r1fast ops from other trainers' loss code (Hugging Face models in TRL, verl or
plain PyTorch loops)."""
from r1fast.integrations.hf import hf_grpo_loss, hf_hidden_and_head, hf_logprobs

__all__ = ["hf_hidden_and_head", "hf_logprobs", "hf_grpo_loss"]
