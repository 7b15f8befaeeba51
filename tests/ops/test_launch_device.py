"""Every Triton launch in r1fast.kernels runs on the GPU that holds its tensors.

Triton launches on the current CUDA device, not the arguments' (kernels/_launch.py). This
machine has no second GPU to show a wrong-device launch, so the check is on the source: each
``kernel[grid](...)`` statement sits inside ``with on_device_of(...)``. A new launcher without
it fails here."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def _launches_outside_the_context(tree: ast.AST) -> tuple[int, list[int]]:
    """(launch statements, line numbers of those not inside ``with on_device_of(...)``)."""
    launches, bare = 0, []

    def visit(node: ast.AST, guarded: bool) -> None:
        nonlocal launches
        if isinstance(node, ast.With):
            guarded = guarded or any(
                isinstance(item.context_expr, ast.Call)
                and getattr(item.context_expr.func, "id", None) == "on_device_of"
                for item in node.items)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            launches += 1
            if not guarded:
                bare.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return launches, bare


@pytest.mark.parametrize("path", sorted(KERNELS.glob("*.py")), ids=lambda p: p.name)
def test_every_launch_makes_its_tensors_device_current(path):
    launches, bare = _launches_outside_the_context(ast.parse(path.read_text()))
    assert not bare, f"{path.name}: launches outside `with on_device_of(...)` at lines {bare}"
    if path.name in ("__init__.py", "_launch.py"):
        assert launches == 0
    else:
        assert launches >= 1, f"{path.name}: found no kernel launch (did the check miss one?)"


def test_the_check_finds_a_bare_launch():
    src = ("def f(x):\n    with on_device_of(x):\n        k[(1,)](x)\n    g[(2,)](x)\n"
           "    y = h[0]\n")
    assert _launches_outside_the_context(ast.parse(src)) == (2, [4])
