"""CUDA/C++ sources for r1fast's just-in-time built extension (see ``r1fast.ops._cuda_ext``).

The ``.cu`` files hold no torch headers: they export ``extern "C"`` launchers taking a CUDA
stream; the torch bindings live in the ``.cpp`` files. This folder installs as ``r1fast.csrc``
so the sources are found at build time wherever the package is installed.
"""
