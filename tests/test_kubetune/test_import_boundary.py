"""The torch boundary on the import graph: every import statement of every module (lazy ones
inside functions too), read with ``ast``.

- ``launcher`` imports ``kubetune`` and never ``runner``, torch or diffusers;
- ``kubetune`` imports neither ``runner`` / ``launcher`` nor torch, diffusers or kubernetes;
- ``runner`` never imports ``launcher`` or ``kubernetes``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "diffusers", "transformers", "accelerate", "peft", "safetensors"}
FORBIDDEN = {
    "launcher": {"runner"} | HEAVY,
    "kubetune": {"runner", "launcher", "kubernetes"} | HEAVY,
    "runner": {"launcher", "kubernetes"},
}


def imported_roots(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every absolute import in ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_stays_on_its_side_of_the_boundary(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert len(files) > 5, "the walk found the package's modules"
    crossings = [
        f"{path.relative_to(ROOT)}:{line} imports {root}"
        for path in files
        for root, line in sorted(imported_roots(path))
        if root in FORBIDDEN[package]
    ]
    assert crossings == []


def test_the_launcher_uses_the_core() -> None:
    """The launcher's shared knowledge comes from ``kubetune`` (the walk sees real imports)."""
    roots = {root for p in (ROOT / "launcher").rglob("*.py") for root, _ in imported_roots(p)}
    assert "kubetune" in roots and "click" in roots


def test_a_crossing_is_seen(tmp_path: Path) -> None:
    """The check can fail: a lazy import inside a function counts."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from runner.training import loop\n    import torch.nn\n")
    assert imported_roots(module) == {("runner", 2), ("torch", 3)}
