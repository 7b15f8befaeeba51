"""Triton kernels of r1fast, installed as ``r1fast.kernels``.

Kernels only: nothing here imports ``r1fast`` beyond this package (the dispatch, validation
and autograd live in ``r1fast.ops``; ``_launch`` holds what every launcher shares), and
importing this package requires ``triton``. On a machine without a GPU
the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``), which is how CI tests them.
"""
