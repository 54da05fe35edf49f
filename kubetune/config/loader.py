"""YAML → TrainConfig, with errors that name the file, line, field path and fix."""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from kubetune.config.base import FieldProblems, document_fields, models_in, reachable_models
from kubetune.config.cluster import sanitize_name
from kubetune.config.paths import resolve_paths
from kubetune.config.training_types import (
    PIPELINE_CLASSES,
    PIPELINE_TYPES,
    PipelineConfig,
    TrainConfig,
)
from kubetune.errors import ConfigError

_ADAPTER: TypeAdapter[PipelineConfig] = TypeAdapter(TrainConfig)
_BY_TYPE = {cls.model_fields["type"].default: cls for cls in PIPELINE_CLASSES}
Loc = tuple[str | int, ...]


def load_config(source: str | Path, *, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a config file (or `-` for stdin) and validate it; raise ConfigError listing every
    problem as `file:line: field.path: message`."""
    name = str(source)
    if name == "-":
        text, name = sys.stdin.read(), "<stdin>"
    else:
        path = Path(source)
        if path.is_dir():
            raise ConfigError([f"{name}: a folder, not a config file (name a .yaml in it)"], name)
        if not path.is_file():
            raise ConfigError([f"{name}: no such file (check the path)"], name)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError([f"{name}: cannot read: {err}"], name) from None
    folder = Path.cwd() if name == "<stdin>" else Path(source).resolve().parent
    return parse_config(text, name=name, overrides=overrides, base=folder)


def parse_config(
    text: str,
    *,
    name: str = "<config>",
    overrides: list[str] | None = None,
    base: Path | None = None,
) -> PipelineConfig:
    """Validate YAML text. See load_config. `base`: the folder relative paths of the text
    resolve against (`kubetune.config.paths`; `--set` values resolve against the working
    folder); None leaves them as written."""
    data, lines = _parse_yaml(text, name)
    if base is not None:
        resolve_paths(data, base)
    if overrides:
        apply_overrides(data, overrides, name, base=Path.cwd() if base is not None else None)
    problems = _shape_problems(data, name, lines.get(("type",), 1))
    if problems:
        raise ConfigError(problems, name)
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as err:
        set_by = _set_by(overrides)
        raise ConfigError(format_errors(err, data, lines, name, set_by), name) from None


def _parse_yaml(text: str, name: str) -> tuple[Any, dict[Loc, int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            [f"{where}: invalid YAML: {problem} (check indentation and quoting)"], name
        ) from None
    lines: dict[Loc, int] = {}
    if node is not None:
        _record_lines(node, (), lines)
    return data, lines


def _record_lines(node: yaml.Node, loc: Loc, lines: dict[Loc, int]) -> None:
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*loc, str(key.value))
            lines[child] = key.start_mark.line + 1
            _record_lines(value, child, lines)
            lines[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record_lines(item, (*loc, i), lines)


def _shape_problems(data: Any, name: str, type_line: int = 1) -> list[str]:
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        return [
            f"{name}:1: the config must be a YAML mapping with a `type:` key, not {got}; "
            "start from `launcher init --type SD_LORA`"
        ]
    kind = data.get("type")
    if kind is None:
        return [f"{name}:1: type: missing; set it to one of {', '.join(PIPELINE_TYPES)}"]
    if kind not in PIPELINE_TYPES:
        close = difflib.get_close_matches(str(kind).upper(), PIPELINE_TYPES, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return [
            f"{name}:{type_line}: type: {kind!r} is not a pipeline type; {hint}use one of "
            f"{', '.join(PIPELINE_TYPES)}"
        ]
    return []


# --- pydantic errors → one line each -------------------------------------------------------


@functools.cache
def _union_tags() -> frozenset[str]:
    """The discriminator values (SD_LORA, AdamW, ...) pydantic inserts into error locs."""
    return frozenset(
        model.model_fields[name].default
        for model in all_models()
        for name in ("type", "optimizer_type")
        if name in model.model_fields and isinstance(model.model_fields[name].default, str)
    )


def _clean_loc(loc: Loc, data: Any) -> Loc:
    """Map pydantic's loc onto the user's data: drop the union branch labels it inserts
    (`SD_LORA`, `AdamW`, `int`, `tuple[int, int]`, ...) by walking the raw mapping."""
    out: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict):
            branch = node.get("type", node.get("optimizer_type"))
            if part in _union_tags() and part == branch and not (last and part in node):
                continue
            if part in node:
                out.append(part)
                node = node[part]
            elif last:
                out.append(part)  # a missing key of this mapping
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
    return tuple(out)


def _model_at(data: Any, loc: Loc) -> type[BaseModel] | None:
    """The config model that owns the mapping at `loc` in the raw data."""
    if not isinstance(data, dict):
        return None
    model: type[BaseModel] | None = _BY_TYPE.get(data.get("type"))
    node = data
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        node = node.get(part) if isinstance(node, dict) else None
        candidates = models_in(model.model_fields[part].annotation)
        model = _pick(candidates, node)
    return model


def _pick(candidates: list[type[BaseModel]], node: Any) -> type[BaseModel] | None:
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    for cls in candidates:
        for tag_field in ("type", "optimizer_type"):
            field = cls.model_fields.get(tag_field)
            if field and isinstance(node, dict) and node.get(tag_field) == field.default:
                return cls
    return None


def _nested_field(owner: type[BaseModel], key: str) -> str | None:
    """`section.key` when `key` is a field of one of owner's sub-sections (e.g. learning_rate)."""
    for name, field in owner.model_fields.items():
        for sub in models_in(field.annotation):
            if key in sub.model_fields:
                return f"{name}.{key}"
    return None


def _other_types_with(field: str) -> list[str]:
    return [t for t, cls in _BY_TYPE.items() if field in cls.model_fields]


def _line_for(lines: dict[Loc, int], loc: Loc) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _describe(err: dict[str, Any], loc: Loc, data: Any) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else ""
        if len(loc) == 1 and _other_types_with(key):
            return (
                f"not valid for type {data.get('type')}; only for "
                f"{', '.join(_other_types_with(key))} (remove it or change `type`)"
            )
        owner = _model_at(data, loc[:-1])
        nested = _nested_field(owner, key) if owner else None
        if nested:
            return f"unknown key here; did you mean {nested!r}?"
        close = difflib.get_close_matches(key, list(owner.model_fields), n=1) if owner else []
        if close:
            return f"unknown key; did you mean {close[0]!r}?"
        return "unknown key; remove it (see `launcher schema` for the valid keys)"
    if kind == "missing":
        return "missing; this field is required"
    if kind == "union_tag_invalid":
        ctx = err["ctx"]
        return f"{ctx['tag']!r} is not valid here; expected one of {ctx['expected_tags']}"
    if kind == "union_tag_not_found":
        return _missing_tag(err["ctx"]["discriminator"].strip(chr(39)), tuple(err["loc"]), data)
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    got = err.get("input")
    if kind not in ("value_error",) and not isinstance(got, (dict, list)):
        msg = f"{msg} (got {got!r})"
    if kind == "literal_error" and isinstance(got, str):
        msg = _closest_choice(got, str((err.get("ctx") or {}).get("expected", ""))) + msg
    return msg


def _missing_tag(tag: str, raw_loc: Loc, data: Any) -> str:
    """`missing its `type` key; set it to one of A, B`: the choices of the union at `raw_loc`
    (pydantic's loc, whose branch labels say which model owns each part)."""
    model = _BY_TYPE.get(data.get("type")) if isinstance(data, dict) else None
    candidates = list(_BY_TYPE.values())
    for part in raw_loc:
        if model is not None and isinstance(part, str) and part in model.model_fields:
            candidates = models_in(model.model_fields[part].annotation)
            model = candidates[0] if len(candidates) == 1 else None
        else:
            model = next((c for c in candidates if part in _tags_of(c)), None)
    choices = [str(c.model_fields[tag].default) for c in candidates if tag in c.model_fields]
    return f"missing its `{tag}` key" + (
        f"; set it to one of {', '.join(choices)}" if choices else ""
    )


def _tags_of(cls: type[BaseModel]) -> set[Any]:
    return {
        cls.model_fields[f].default for f in ("type", "optimizer_type") if f in cls.model_fields
    }


def _closest_choice(got: str, expected: str) -> str:
    """`did you mean 'bf16'? ` for a mistyped choice (pydantic's `expected` lists them quoted),
    else nothing."""
    choices = {c.lower(): c for c in re.findall(r"'([^']*)'", expected)}
    close = difflib.get_close_matches(got.lower(), list(choices), n=1)
    return f"did you mean {choices[close[0]]!r}? " if close else ""


def format_errors(
    err: ValidationError,
    data: Any,
    lines: dict[Loc, int],
    name: str,
    set_by: dict[Loc, str] | None = None,
) -> list[str]:
    """Turn a pydantic ValidationError into sorted `file:line: path: message` lines; a field
    an override in `set_by` (its path → `KEY=VALUE`) gave is `--set KEY=VALUE: path: ...`."""
    out: list[tuple[int, str]] = []
    for item in err.errors(include_url=False):
        loc = _clean_loc(tuple(item["loc"]), data)
        error = (item.get("ctx") or {}).get("error")
        if isinstance(error, FieldProblems):
            entries = [((*loc, *_split(field)), msg) for field, msg in error.problems]
        elif item["type"] == "union_tag_invalid":  # name the tag key: `dataset.type`
            tag = str(item["ctx"]["discriminator"]).strip("'")
            tag = tag if tag.isidentifier() else "type"  # a callable discriminator: `type`
            entries = [((*loc, tag), _describe(item, loc, data))]
        else:
            entries = [(loc, _describe(item, loc, data))]
        for full_loc, msg in entries:
            line = _line_for(lines, full_loc)
            path = ".".join(_show(p) for p in full_loc) or "(top level)"
            override = _override_of(full_loc, set_by or {})
            where = f"--set {override}" if override else f"{name}:{line or 1}"
            rival = None if override else _rival_override(full_loc, msg, set_by or {})
            if rival:  # the file's field is fine alone: the --set made the conflict
                where = f"--set {rival}"
                msg += f"; {name}:{line or 1} sets {path}: add --set {path}=null to drop it"
            out.append((line or 0, f"{where}: {path}: {msg}"))
    unique = dict.fromkeys(text for _, text in sorted(out, key=lambda t: t[0]))
    return list(unique)


def _override_of(loc: Loc, set_by: dict[Loc, str]) -> str | None:
    """The `KEY=VALUE` override that set the field at `loc` (or a section holding it)."""
    for key, override in set_by.items():
        if tuple(map(str, loc[: len(key)])) == tuple(map(str, key)):
            return override
    return None


def _rival_override(loc: Loc, msg: str, set_by: dict[Loc, str]) -> str | None:
    """For a `set only one of A / B` conflict on the file's field `loc`: the `--set` that
    gave its sibling (the field the user meant to win), if one did."""
    if not msg.startswith("set only one of "):
        return None
    named = msg[len("set only one of ") :].split(",")[0].split(" / ")
    for key, override in set_by.items():
        if tuple(map(str, key[:-1])) == tuple(map(str, loc[:-1])) and str(key[-1]) in named:
            return override
    return None


def unknown_keys(data: Any) -> list[Loc]:
    """The paths of the keys in raw config data that its type's schema does not know (what
    `launcher validate` reports as unknown keys), in the data's own terms."""
    try:
        _ADAPTER.validate_python(data)
    except ValidationError as err:
        return [
            _clean_loc(tuple(item["loc"]), data)
            for item in err.errors(include_url=False)
            if item["type"] == "extra_forbidden"
        ]
    return []


def _show(part: str | int) -> str:
    """A path segment as text; keys with control characters or none at all are quoted."""
    text = str(part)
    return repr(text) if not text or not text.isprintable() else text


def _set_by(overrides: list[str] | None) -> dict[Loc, str]:
    """Each `--set KEY=VALUE` by the path it sets."""
    return {_split(o.partition("=")[0].strip()): o for o in overrides or []}


def _split(field: str) -> Loc:
    return tuple(int(p) if p.isdigit() else p for p in field.split("."))


# --- overrides, dumping, identity ----------------------------------------------------------


def field_problems(
    source: str | Path, problems: list[tuple[str, str]], overrides: list[str] | None = None
) -> list[str]:
    """`file:line: field.path: message` for problems found after validation (the line of the
    field in the config file, or of its nearest parent; line 1 when the file is stdin); a
    field one of `overrides` gave is `--set KEY=VALUE: field.path: message`."""
    name = str(source)
    lines: dict[Loc, int] = {}
    if name not in ("-", "<stdin>") and Path(name).is_file():
        lines = _parse_yaml(Path(name).read_text(encoding="utf-8"), name)[1]
    set_by = _set_by(overrides)
    out = []
    for field, message in problems:
        loc = _split(field)
        override = _override_of(loc, set_by)
        where = f"--set {override}" if override else f"{name}:{_line_for(lines, loc) or 1}"
        out.append(f"{where}: {field}: {message}")
    return out


def apply_overrides(
    data: dict[str, Any], overrides: list[str], name: str = "--set", base: Path | None = None
) -> None:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to the raw config mapping; with
    `base`, a relative path among the values resolves against it."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"--set {item!r}: use KEY=VALUE, e.g. --set max_train_steps=100"])
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError([f"--set {item!r}: {part} is not a mapping"])
            node = child
        if base is not None:
            probe = {parts[-1]: value}
            resolve_paths(probe if len(parts) == 1 else {"data_loader": probe}, base)
            value = probe[parts[-1]]
        node[parts[-1]] = value


def config_to_dict(cfg: PipelineConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-compatible data (every field, defaults included)."""
    return cfg.model_dump(mode="json")


_LAST_SECTIONS = ("job", "storage", "notify")  # kubetune's own sections, as in a starter


def config_to_yaml(cfg: PipelineConfig) -> str:
    """The resolved config as YAML, ordered as a user's file reads: `type` first, the
    kubetune sections (job, storage, notify) last."""
    data = config_to_dict(cfg)
    middle = [k for k in data if k != "type" and k not in _LAST_SECTIONS]
    order = ["type", *middle, *(k for k in _LAST_SECTIONS if k in data)]
    ordered = {k: data[k] for k in order if k in data}
    return yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True)


def config_hash(cfg: PipelineConfig, length: int = 10) -> str:
    """Stable short hash of the resolved config (idempotent submits, run identity)."""
    canonical = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def run_name(cfg: PipelineConfig) -> str:
    """The run's DNS-1123 name: job.name, else the last part of base_output_dir."""
    raw = cfg.job.name if cfg.job and cfg.job.name else Path(cfg.base_output_dir or "").name
    return sanitize_name(raw)[:52].strip("-") or "kubetune-run"


def output_uri(cfg: PipelineConfig) -> str:
    """Where the run's outputs live: s3:// (gs://, az:// by storage.provider)
    bucket/prefix/<run> with storage, else base_output_dir."""
    if cfg.storage is not None:
        prefix = f"{cfg.storage.prefix}/" if cfg.storage.prefix else ""
        from kubetune.storage.schemes import scheme_of_provider

        scheme = scheme_of_provider(cfg.storage.provider)
        return f"{scheme}://{cfg.storage.bucket}/{prefix}{run_name(cfg)}"
    assert cfg.base_output_dir is not None  # the schema requires it without storage
    return cfg.base_output_dir


def all_models() -> list[type[BaseModel]]:
    """Every config model reachable from the pipeline types, sections first."""
    return reachable_models(*PIPELINE_CLASSES)


def json_schema() -> dict[str, Any]:
    """JSON Schema of the config file (for yaml-language-server / editors), with every
    field's docstring as its description."""
    document_fields(all_models())
    schema = TypeAdapter(TrainConfig).json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "kubetune training config"
    return schema
