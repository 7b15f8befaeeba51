"""Setuptools shim: installs the top-level ``kernels/`` folder as ``r1fast.kernels``.

A top-level package named ``kernels`` would collide with an existing PyPI package, so the
Triton sources live in ``kernels/`` for readability but import as ``r1fast.kernels``;
``csrc/`` (CUDA/C++ sources, built just in time) likewise installs as ``r1fast.csrc``.
"""
from setuptools import find_packages, setup

packages = [p for p in find_packages(include=["r1fast", "r1fast.*"])]
packages += ["r1fast.kernels", "r1fast.csrc"]

setup(
    packages=packages,
    # CUDA sources ship as package data so the just-in-time build finds them in any install.
    package_dir={"r1fast.kernels": "kernels", "r1fast.csrc": "csrc"},
    package_data={"r1fast.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h"]},
)
