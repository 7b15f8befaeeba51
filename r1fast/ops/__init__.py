"""Public ops of r1fast: each has a pure-PyTorch reference (fp32 accumulation, any device) and,
where written, Triton and CUDA fast paths chosen with ``impl="auto"|"torch"|"triton"|"cuda"``.
"""
from r1fast.ops._dispatch import ImplUnavailableError

__all__ = ["ImplUnavailableError"]
