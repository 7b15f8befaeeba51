"""The bridge for a machine without NVIDIA Transformer Engine (CPU or GPU).

megatron-core picks TE layers, fused kernels and GEMMs when ``transformer_engine`` imports and
falls back to its own torch implementations otherwise. r1fast builds its layer spec with TE
only on a GPU that has it (r1fast.policy.model.layer_spec, via :func:`te_absent`), so the
fallbacks are the paths it runs everywhere else. One fallback is incomplete in 0.16:
:func:`bridge_te_general_gemm` fills it in; :func:`bridge_mla_te_flag` corrects a second one.
"""
from __future__ import annotations

import importlib.util


def te_absent() -> bool:
    """Whether Transformer Engine is not installed (looked up, not imported)."""
    return importlib.util.find_spec("transformer_engine") is None


def bridge_te_general_gemm() -> None:
    """transformer/moe/moe_utils.py: ``RouterGatingLinearFunction`` tests
    ``te_general_gemm is not None``, but megatron-core 0.16 defines the name only when TE
    imports. Defining it as None selects the function's own torch.mm path."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def bridge_mla_te_flag() -> None:
    """transformer/multi_latent_attention.py: ``HAVE_TE`` is set when megatron's TE extension
    module imports, which it does without TE (its TE names are placeholders); MLA's
    ``isinstance(self.linear_proj, TELinear)`` then fails. Without TE, say so."""
    from megatron.core.transformer import multi_latent_attention as mla

    mla.HAVE_TE = False
    mla.TEColumnParallelLinear = mla.TELinear = mla.Linear = None
