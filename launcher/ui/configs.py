"""The Configure tab's actions: reload a reference config, Generate Config (exactly
`launcher validate`'s checks), save. Every function returns JSON-ready data; bad input is a
one-line message in it, never an exception."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from kubetune.config import PIPELINE_TYPES, config_to_dict, config_to_yaml
from kubetune.config.loader import unknown_keys
from launcher.config_files import local_data_lines, starter_config, validate_text

FORM_NAME = "form"
_PROBLEM = re.compile(r"^(?P<name>.*?):(?P<line>\d+): (?P<path>[^:]+?): (?P<message>.*)$")


def reload_reference(text: str, name: str, base: Path | None = None) -> dict[str, Any]:
    """A reference config (invoke-training's or kubetune's) for the form: its type, the
    values to fill in, the keys the schema does not know (listed, not dropped silently) and
    what `launcher validate` says about the rest. `base`: the file's folder, which its
    relative paths mean (as `launcher validate FILE` resolves them)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        return {"error": f"{where}: invalid YAML: {getattr(err, 'problem', None) or err}"}
    if not isinstance(data, dict):
        return {"error": f"{name}: not a config (a YAML mapping with a `type:` key)"}
    kind = data.get("type")
    if kind not in PIPELINE_TYPES:
        return {"error": f"{name}: type {kind!r} is not one of {', '.join(PIPELINE_TYPES)}"}
    known = copy.deepcopy(data)
    unknown = [".".join(map(str, loc)) for loc in unknown_keys(data)]
    for loc in unknown_keys(data):
        _delete(known, loc)
    result, cfg = validate_text(yaml.safe_dump(known, sort_keys=False), name, base)
    values = config_to_dict(cfg) if cfg is not None else known
    return {
        "type": kind,
        "values": values,
        "unknown": unknown,
        "problems": [_problem(line, name) for line in result.errors],
    }


def starter_values(kind: str, base: Path | None = None) -> dict[str, Any]:
    """The values `launcher init --type KIND` writes, for its tab to open with (invoke-training's
    UI opens each tab on a reference config); relative paths mean `base`. {} for a type
    without a starter."""
    if kind not in PIPELINE_TYPES:
        return {}
    values = reload_reference(starter_config(kind), f"launcher init --type {kind}", base)
    return dict(values.get("values") or {})


def _delete(data: Any, loc: tuple[str | int, ...]) -> None:
    node = data
    for part in loc[:-1]:
        node = node[part]
    if isinstance(node, dict):
        node.pop(loc[-1], None)


def generate(values: Any, base: Path | None = None) -> dict[str, Any]:
    """Validate the form's values as `launcher validate` does: the YAML with every default
    filled in, or every problem with the field it belongs to; validate's data-path errors (a
    local dataset or model path missing) as `data_warnings` at their fields. Relative paths in
    the form mean paths under `base` (the folder `launcher ui` serves; default: the working
    folder)."""
    if not isinstance(values, dict):
        return {"valid": False, "problems": [_problem("the form sent no values", FORM_NAME)]}
    text = yaml.safe_dump(values, sort_keys=False, allow_unicode=True)
    result, cfg = validate_text(text, FORM_NAME, base or Path.cwd())
    out: dict[str, Any] = {
        "valid": result.valid,
        "problems": [_problem(line, FORM_NAME) for line in result.errors],
        "warnings": result.warnings,
        "summary": result.summary,
    }
    if cfg is not None:
        out["yaml"] = config_to_yaml(cfg)
        out["run"] = result.run_name
        missing = local_data_lines(FORM_NAME, cfg)
        # `launcher validate`'s data-path errors, as warnings at their fields: the form may be
        # for a cluster whose pods have the data (Start Training here refuses them)
        out["data_warnings"] = [_problem(line, FORM_NAME) for line in missing]
        out["warnings"] = result.warnings + [
            f"{line} (`launcher validate` refuses it)" for line in missing
        ]
    return out


def _problem(line: str, name: str) -> dict[str, Any]:
    """One `launcher validate` line split into the field path and the message."""
    match = _PROBLEM.match(line)
    if not match or match.group("name") != name:
        return {"path": None, "message": line, "text": line}
    path = match.group("path")
    return {
        "path": None if path == "(top level)" else path,
        "message": match.group("message"),
        "text": f"{path}: {match.group('message')}",
    }
