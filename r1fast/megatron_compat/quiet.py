"""Silence the third-party warnings that are expected on r1fast's own paths, one by one.

A first run used to open with a page of warnings that say nothing about the user's setup:
megatron-core announcing, once per module, that Apex/Transformer Engine are absent (r1fast runs
megatron's torch fallbacks on purpose wherever TE is absent); megatron tripping over its own
default ``cuda_graph_scope``; torch 2.13 deprecating the collective names megatron-core 0.16
still calls; and, in an INFO-level run, megatron's FSDP package (unused by r1fast) logging
that TE is absent; and, with a CUDA build of torch but no visible device, torch logging (when
megatron imports ``torch.utils.cpp_extension``) that it found no CUDA runtime. Each warning is
filtered here *by its exact text, category and emitting module* (each log line by its exact
format string and logger), with the reason it is harmless, so that any other warning -- from
these modules too -- still shows; the one logger is raised to WARNING only.

:func:`install_filters` runs when :mod:`r1fast.megatron_compat` is imported (r1fast.policy's
model and parallel modules import it at the top, before they import megatron), and again from
:func:`r1fast.megatron_compat.install` (``warnings.filterwarnings`` replaces an identical
filter, so repeating is harmless).
"""
from __future__ import annotations

import logging
import re
import warnings

_NO_APEX_OPTIMIZER = ("Transformer Engine and Apex are not installed. Falling back to Torch "
                      "optimizers.")
_NO_APEX_MULTI_TENSOR = ("Transformer Engine and Apex are not installed. Falling back to local "
                         "implementations of multi_tensor_applier and multi_tensor_scale")
_NO_APEX_MULTI_TENSOR_L2 = ("Transformer Engine and Apex are not installed. Falling back to local "
                            "implementations of multi_tensor_applier, multi_tensor_l2norm, and "
                            "multi_tensor_scale")
_NO_APEX_NORM = "Apex is not installed. Falling back to Torch Norm"
_WHY_NO_APEX = ("r1fast uses megatron's torch fallbacks (torch.optim Adam/SGD, the local "
                "multi-tensor helpers, torch RMSNorm) wherever TE is absent, by design")

FILTERS: tuple[tuple[str, type[Warning], str, str], ...] = (
    # (exact message, category, emitting module, why it is harmless)
    (_NO_APEX_OPTIMIZER, UserWarning, "megatron.core.optimizer", _WHY_NO_APEX),
    (_NO_APEX_MULTI_TENSOR, UserWarning, "megatron.core.optimizer.optimizer", _WHY_NO_APEX),
    (_NO_APEX_MULTI_TENSOR, UserWarning,
     "megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision",
     "imported by megatron's distributed package; r1fast does not use megatron FSDP"),
    (_NO_APEX_MULTI_TENSOR_L2, UserWarning, "megatron.core.optimizer.clip_grads", _WHY_NO_APEX),
    (_NO_APEX_NORM, UserWarning, "megatron.core.models.backends", _WHY_NO_APEX),
    (_NO_APEX_NORM, UserWarning, "megatron.core.models.gpt.gpt_layer_specs", _WHY_NO_APEX),
    ("full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.",
     UserWarning, "megatron.core.transformer.transformer_config",
     "raised by megatron's own default TransformerConfig.cuda_graph_scope='full', which it "
     "converts to the equivalent []; r1fast does not capture CUDA graphs"),
    ("`torch.distributed.all_gather_into_tensor` is deprecated. "
     "Please use `torch.distributed.all_gather_single` instead.",
     FutureWarning, "torch.distributed.c10d_logger",
     "torch 2.13 renamed the collective; megatron-core 0.16 (DDP, distributed optimizer) still "
     "calls the old name, which does the same operation"),
    ("`torch.distributed.reduce_scatter_tensor` is deprecated. "
     "Please use `torch.distributed.reduce_scatter_single` instead.",
     FutureWarning, "torch.distributed.c10d_logger",
     "torch 2.13 renamed the collective; megatron-core 0.16 (DDP gradient reduce-scatter) "
     "still calls the old name, which does the same operation"),
)
"""Each filter: the exact message, its category, the module that emits it, and why it is
harmless. (torch's deprecation shim emits from ``torch.distributed.c10d_logger`` whoever the
caller is, hence that module for the two collective renames.)"""


LOGGERS: tuple[tuple[str, int, str], ...] = (
    # (megatron logger, level, why)
    ("megatron.core.distributed.fsdp.src.megatron_fsdp", logging.WARNING,
     "megatron's FSDP package is imported by megatron.core.distributed and logs at INFO, on "
     "import, 'Using Megatron-FSDP without Transformer Engine.' and 'Detected Megatron Core, "
     "using Megatron-FSDP with Megatron.'; r1fast never uses megatron FSDP"),
)
"""Loggers raised to ``level`` (only while nobody configured them: a level already set is
kept), so that their INFO lines stay out of an INFO-level r1fast run; warnings still show."""


LOG_LINES: tuple[tuple[str, str, str], ...] = (
    # (logger, exact format string of the record, why)
    ("torch.utils.cpp_extension", "No CUDA runtime is found, using CUDA_HOME='%s'",
     "a CUDA build of torch with no visible device (a CPU machine, or a GPU machine with "
     "CUDA_VISIBLE_DEVICES='') logs it when megatron-core imports torch.utils.cpp_extension; "
     "r1fast's own line (the CPU bridges' announcement) names that case, and r1fast builds no "
     "CUDA extension without a device"),
)
"""Log records dropped from one logger when their format string (``record.msg``, before its
arguments) is exactly this text; any other record of that logger still shows."""


class _DropLogLine(logging.Filter):
    """Drops the records of one logger whose format string is exactly ``line``."""

    def __init__(self, line: str) -> None:
        super().__init__()
        self.line = line

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != self.line


def install_filters() -> None:
    """Add one ``ignore`` filter per :data:`FILTERS` entry, matching the whole message and the
    exact module name, one log filter per :data:`LOG_LINES` entry (once per logger), and raise
    the :data:`LOGGERS` that are still unconfigured."""
    for message, category, module, _why in FILTERS:
        warnings.filterwarnings("ignore", message=re.escape(message) + r"\Z", category=category,
                                module=re.escape(module) + r"\Z")
    for name, line, _why in LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLogLine) and f.line == line for f in logger.filters):
            logger.addFilter(_DropLogLine(line))
    for name, level, _why in LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)
