"""A JSONL dataset's lines: parsed (one bad line named), their columns checked, and the
file paths they hold resolved to (store root, key) without escaping the dataset folder."""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

from kubetune.errors import DataError
from kubetune.storage import is_remote, parse_uri

MASK_COLUMN = "mask"
"""The JSONL key of a line's loss-mask image path (fixed, as in invoke-training)."""


def parse_jsonl(text: bytes, path: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line. The lines are parsed as one JSON array
    (one call for 100,000 lines); should that fail or not give one object per line, line by
    line, so the first bad line is named."""
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    try:
        rows = json.loads(b"[" + b",".join(line for _, line in lines) + b"]")
    except (ValueError, UnicodeDecodeError):
        rows = None
    if (
        not isinstance(rows, list)
        or len(rows) != len(lines)
        or not all(type(row) is dict for row in rows)
    ):
        rows = [_parse_line(line, f"{path}:{n}") for n, line in lines]
    return [(n, row) for (n, _), row in zip(lines, rows, strict=True)]


def plain_key(path: str) -> bool:
    """A relative path that is its own key in the JSONL's folder: no scheme, no leading or
    trailing '/', no empty, '.' or '..' segment, no backslash (`resolve` gives it back
    unchanged; checked without splitting it)."""
    return (
        bool(path)
        and path[0] != "/"
        and path[-1] != "/"
        and "://" not in path
        and "\\" not in path
        and "//" not in path
        and "/./" not in f"/{path}/"
        and "/../" not in f"/{path}/"
    )


def _parse_line(line: bytes, where: str) -> dict[str, Any]:
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{where}: line is not valid UTF-8") from None
    except json.JSONDecodeError as err:
        raise DataError(
            f"{where}: not valid JSON ({err.msg})", hint="each line must be one JSON object"
        ) from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def column(row: dict[str, Any], name: str, where: str, kind: type) -> Any:
    """The line's value of column `name`, which must be a `kind`."""
    if name not in row:
        raise DataError(
            f"{where}: missing column {name!r} (has {sorted(row)})",
            hint="fix the line or set image_column / caption_column",
        )
    value = row[name]
    if not isinstance(value, kind):
        raise DataError(
            f"{where}: column {name!r} must be a {kind.__name__}, got {type(value).__name__}"
        )
    return value


def mask_column(row: dict[str, Any], where: str) -> str:
    """The line's `mask` path (invoke-training's fixed column name)."""
    value = row.get(MASK_COLUMN)
    if not isinstance(value, str) or not value:
        raise DataError(
            f"{where}: use_masks needs a {MASK_COLUMN!r} path on every line (got {value!r})",
            hint="add the mask image path, or set use_masks: false",
        )
    return value


def resolve(path: str, where: str, what: str = "image") -> tuple[str | None, str]:
    """(store root or None for the JSONL folder, key) for a file path from a JSONL line."""
    if is_remote(path):
        loc = parse_uri(path)
        if not loc.path:
            raise DataError(f"{where}: {path!r} is not a {loc.scheme}://bucket/key URI")
        _check_relative(loc.path, path, where, what)
        return loc.root, loc.path
    if os.path.isabs(path):
        return "/", path.lstrip("/")
    _check_relative(path, path, where, what)
    return None, posixpath.normpath(path)


def _check_relative(key: str, shown: str, where: str, what: str = "image") -> None:
    if ".." in key.replace("\\", "/").split("/") or "://" in key:
        raise DataError(
            f"{where}: {what} path {shown!r} escapes the dataset folder",
            hint="use a path inside the dataset folder (no '..')",
        )
