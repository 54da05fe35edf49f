"""A local run's record, `run.json` (its pid, attempts, config hash): read and checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubetune.errors import KubetuneError


class RunRecordError(KubetuneError):
    """A local run's run.json cannot be read (damaged or written by something else)."""


RUN_RECORD_FIELDS = ("config_hash", "job_name", "output_uri", "pid", "run", "started")


def read_run_record(path: Path) -> dict[str, Any]:
    """A local run's run.json, or RunRecordError naming the file and what is wrong with it."""
    try:
        info = json.loads(path.read_bytes())
    except OSError as err:
        why = f"cannot be read ({err.strerror})"
    except json.JSONDecodeError as err:
        why = f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
    except ValueError:  # not UTF-8
        why = "not valid JSON (not UTF-8 text)"
    else:
        why = _record_problem(info)
        if why is None:
            return info
    raise RunRecordError(
        f"{path}: {why}",
        hint=f"remove {path.parent} to forget this run; its outputs stay where they are",
    )


def _record_problem(info: Any) -> str | None:
    if not isinstance(info, dict):
        kind = {list: "list", str: "string", bool: "boolean"}.get(type(info), "number")
        return f"a JSON {'null' if info is None else kind} where an object is expected"
    missing = [k for k in RUN_RECORD_FIELDS if k not in info]
    if missing:
        return f"lacks {', '.join(missing)}"
    if not isinstance(info["pid"], int):
        return f"pid is {info['pid']!r}, not a process id"
    return None
