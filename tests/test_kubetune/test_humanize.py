"""Counts and durations as people read them: one helper each, used by every message
(the launcher's and the runner's alike)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from kubetune.humanize import count, duration

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("n", "noun", "expected"),
    [
        (1, "file", "1 file"),
        (0, "file", "0 files"),
        (2, "file", "2 files"),
        (1, "process", "1 process"),
        (4, "process", "4 processes"),
        (3, "entry", "3 entries"),
        (2, "day", "2 days"),
        (2, "GPU", "2 GPUs"),
        (1, "bad image", "1 bad image"),
        (2, "batch", "2 batches"),
        (15, "epoch", "15 epochs"),  # validate's summary said '15 epoches'
    ],
)
def test_count_agrees_with_its_number(n: int, noun: str, expected: str) -> None:
    assert count(n, noun) == expected


def test_count_takes_an_irregular_plural() -> None:
    assert count(1, "child", "children") == "1 child"
    assert count(2, "child", "children") == "2 children"


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(0, "0s"), (4.9, "4s"), (59, "59s"), (95, "1m35s"), (3600, "1h00m"), (3900, "1h05m"),
     (90_000, "25h00m"), (-3, "0s")],
)  # fmt: skip
def test_duration(seconds: float, expected: str) -> None:
    assert duration(seconds) == expected


_NOUNS = (
    "files|images|examples|runs|steps|epochs|nodes|GPUs|processes|checkpoints|objects|"
    "buckets|captions|photos|prompts|problems|attempts|pods|entries"
)
_PLURAL_AFTER_NUMBER = re.compile(rf"^\s(?:[a-z]+ )?(?:(?:{_NOUNS})\b|[A-Za-z]+\(s\))")
_NOT_A_NUMBER = {"backend_name"}  # "the {backend_name} runs"


def _counted_plurals(path: Path) -> list[str]:
    """f-strings that put a number straight before a plural noun (or a "(s)" one)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.JoinedStr):
            continue
        for value, text in zip(node.values, node.values[1:], strict=False):
            if (
                isinstance(value, ast.FormattedValue)
                and ast.unparse(value.value) not in _NOT_A_NUMBER
                and isinstance(text, ast.Constant)
                and _PLURAL_AFTER_NUMBER.match(str(text.value))
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text.value.strip()!r}")
    return found


def test_no_message_writes_1_files() -> None:
    """Every count printed to a person goes through `count`, so none reads "1 files" or
    "1 node(s)"."""
    offenders = [
        hit
        for package in ("kubetune", "launcher", "runner")
        for path in sorted((ROOT / package).rglob("*.py"))
        for hit in _counted_plurals(path)
    ]
    assert offenders == []


def test_no_log_line_writes_1_files() -> None:
    """Log lines count through `count` too (``%s`` with ``count(n, noun)``), not ``%d files``."""
    pattern = re.compile(rf"%d (?:[a-z]+ )?(?:(?:{_NOUNS})\b|[A-Za-z]+\(s\))")
    offenders = [
        f"{path.relative_to(ROOT)}: {hit}"
        for package in ("kubetune", "launcher", "runner")
        for path in sorted((ROOT / package).rglob("*.py"))
        for hit in pattern.findall(path.read_text())
    ]
    assert offenders == []


def test_the_ui_counts_with_one_helper_too() -> None:
    scripts = "\n".join(p.read_text() for p in (ROOT / "launcher/ui/static").glob("*.js"))
    assert re.findall(rf"\}} ?(?:{_NOUNS})\b|\b[a-z]+\(s\)", scripts) == []
