"""The package's dependency rules, checked on the source: each layer imports only the layers
below it (docs/DESIGN.md §1), so kernels can be imported into other trainers on their own and
the rollout can serve any trainer."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: the bottom of every layer: plain-Python argument checks and atomic writes (no r1fast import,
#: no torch), so a reward worker that validates its config never imports torch
BASE = {"r1fast.checks", "r1fast.atomic"}
# package folder -> the r1fast packages its modules may import (besides their own)
ALLOWED = {
    "kernels": set(),
    "r1fast/ops": {"r1fast.kernels", "r1fast.csrc", *BASE},
    "r1fast/rollout": {"r1fast.ops", "r1fast.policy", *BASE},
    "r1fast/rewards": {"r1fast.ops", *BASE},
}


def r1fast_imports(path: Path) -> set[str]:
    """Every ``r1fast.*`` module a file imports, at any depth (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("r1fast"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("r1fast"):
                found.add(node.module)
    return found


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_layer_imports_only_what_is_below(folder):
    own = "r1fast.kernels" if folder == "kernels" else folder.replace("/", ".")
    allowed = ALLOWED[folder] | {own}
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}"
    bad = {f"{f.relative_to(ROOT)}: {m}" for f in files for m in r1fast_imports(f)
           if not any(m == a or m.startswith(a + ".") for a in allowed)}
    assert not bad, f"{folder} may import only {sorted(allowed)}; found:\n" + "\n".join(sorted(bad))


def test_the_base_imports_nothing():
    for module in BASE:
        tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert imported <= {"__future__", "typing", "os", "pathlib"}, \
            f"{module} imports {sorted(imported)}"


def test_no_source_file_over_600_lines():
    files = [p for d in ("r1fast", "kernels", "csrc", "bench") for p in (ROOT / d).rglob("*")
             if p.suffix in (".py", ".cu", ".cpp", ".h") and "__pycache__" not in p.parts]
    long = {str(p.relative_to(ROOT)): n for p in files
            if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"files over 600 lines (split them by responsibility): {long}"
