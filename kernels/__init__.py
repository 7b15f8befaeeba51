"""Triton kernels of r1fast, installed as ``r1fast.kernels``.

Kernels only: nothing here imports ``r1fast`` (the dispatch, validation and autograd live in
``r1fast.ops``), and importing this package requires ``triton``. On a machine without a GPU
the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``), which is how CI tests them.
"""
