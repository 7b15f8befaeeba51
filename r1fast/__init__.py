"""r1fast: DeepSeek-R1-style reinforcement learning for Mixture-of-Experts models.

Layout (see README): ``r1fast.ops`` holds the public fused ops (log-probs from hidden states,
GRPO loss and advantages, MoE routing and permutation) with a pure-PyTorch reference for each;
``r1fast.kernels`` holds their Triton kernels; ``r1fast.policy`` the Megatron-core MoE policy;
``r1fast.rollout``, ``r1fast.rewards``, ``r1fast.train`` and ``r1fast.pipeline`` the R1 recipe.
Importing ``r1fast`` needs neither a GPU nor Triton.
"""

__version__ = "0.1.0"
