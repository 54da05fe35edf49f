"""docs/architecture.md keeps up with the code: every kubetune, runner and launcher module
is named."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules(package: str) -> list[str]:
    names = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def test_every_module_is_in_the_architecture_doc() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    modules = _modules("kubetune") + _modules("runner") + _modules("launcher")
    assert "kubetune.layout" in modules and "launcher.cli.main" in modules  # the walk found them
    missing = [m for m in modules if not re.search(re.escape(m) + r"(?!\w)", doc)]
    assert missing == [], f"docs/architecture.md does not mention {missing}"


def test_every_module_imports() -> None:
    """Every module the doc names can be imported (a moved name breaks an importer that no
    other quick test loads; it happened once, between two commits)."""
    import importlib

    failed = {}
    for name in _modules("kubetune") + _modules("runner") + _modules("launcher"):
        if name.endswith("__main__"):
            continue  # importing one runs its command
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 — report every module that fails, not the first
            failed[name] = f"{type(exc).__name__}: {exc}"
    assert failed == {}
