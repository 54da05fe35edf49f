"""Relative paths in a config file mean what a reader of the file sees: they resolve against
the file's folder (not the working folder of whoever runs it), and every path a run stores is
absolute. `~` is expanded. URIs (`s3://`, `builtin:`) and hub names are left alone.

Fields that are always local paths resolve whenever they are relative. Fields that may be a
local path or a hub name (`model`, `vae_model`, `dataset_name`, ...) resolve when the path
exists beside the file, is written `./x` or `../x`, or names a weights file; otherwise they
stay a hub name (`runwayml/stable-diffusion-v1-5`)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

LOCAL_PATH_FIELDS = frozenset(
    {"base_output_dir", "dataset_dir", "jsonl_path", "hf_cache_dir", "initial_embedding_file"}
)
PATH_OR_HUB_FIELDS = frozenset(
    {
        "model",
        "vae_model",
        "single_file_config",
        "dataset_name",
        "transformer_path",
        "text_encoder_1_path",
        "text_encoder_2_path",
    }
)
MODEL_FIELDS = (
    "model",
    "vae_model",
    "single_file_config",
    "transformer_path",
    "text_encoder_1_path",
    "text_encoder_2_path",
)
"""The path-or-hub fields that name model weights (checked by `model_path_problems`)."""
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")
"""A Hugging Face Hub repository id (`org/name`), as the runner tells one from a path."""
MODEL_FIX = "point it at a diffusers folder, a weights file or a Hub name (org/name)"
"""What a missing model path's message says to do."""
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")
SECTIONS = ("data_loader",)
"""Sections whose (nested) mappings hold dataset paths; other sections hold no paths."""


def resolve_paths(data: Any, base: Path) -> None:
    """Rewrite, in place, the relative paths of a raw config mapping as absolute paths under
    `base` (the config file's folder, or the working folder for `--set` values)."""
    if not isinstance(data, dict):
        return
    _resolve_mapping(data, base)
    embeddings = data.get("base_embeddings")
    if isinstance(embeddings, dict):
        for token, value in embeddings.items():
            if isinstance(value, str):
                embeddings[token] = _local(value, base)
    for section in SECTIONS:
        _resolve_tree(data.get(section), base)


def _resolve_tree(node: Any, base: Path) -> None:
    if isinstance(node, dict):
        _resolve_mapping(node, base)
        for value in node.values():
            _resolve_tree(value, base)
    elif isinstance(node, list):
        for item in node:
            _resolve_tree(item, base)


def _resolve_mapping(node: dict[str, Any], base: Path) -> None:
    for key, value in node.items():
        if not isinstance(value, str) or not value:
            continue
        if key in LOCAL_PATH_FIELDS:
            node[key] = _local(value, base)
        elif key in PATH_OR_HUB_FIELDS:
            node[key] = _local_or_hub(value, base)


def _is_uri(value: str) -> bool:
    scheme, sep, _ = value.partition(":")
    return bool(sep) and scheme.isidentifier() and len(scheme) > 1  # s3://, builtin:, gs://


def _local(value: str, base: Path) -> str:
    if _is_uri(value):
        return value
    path = Path(value).expanduser()
    return value if path.is_absolute() and value == str(path) else os.path.normpath(base / path)


def _local_or_hub(value: str, base: Path) -> str:
    if _is_uri(value) or Path(value).is_absolute():
        return value
    explicit = value.startswith(("./", "../", "~")) or value.endswith(WEIGHT_SUFFIXES)
    if explicit or (base / value).exists():
        return _local(value, base)
    return value


def model_values(cfg: Any) -> list[tuple[str, Any]]:
    """(field, value) of each of `MODEL_FIELDS` that the config's training type has."""
    return [(name, getattr(cfg, name)) for name in MODEL_FIELDS if name in type(cfg).model_fields]


def model_path_problems(cfg: Any) -> list[tuple[str, str]]:
    """(field, message) for each model field that the runner would refuse as a missing path:
    an absolute path or a weights file that is not there, or a relative value that is no
    folder and cannot be a Hub name either (the runner's rule, `runner.models.loading`).
    Hub names and URIs are not checked (they need the network)."""
    problems = []
    for name, value in model_values(cfg):
        if not isinstance(value, str) or not value or _is_uri(value):
            continue
        path = Path(value).expanduser()
        if path.exists():
            continue
        if path.is_absolute() or value.endswith(WEIGHT_SUFFIXES):
            problems.append((name, f"{value}: no such file or folder ({MODEL_FIX})"))
        elif not HUB_NAME.match(value):
            problems.append((name, f"{value}: no such file or folder beside the config, and "
                                   "not a Hugging Face Hub name (org/name)"))  # fmt: skip
    return problems


def with_working_folder_hints(
    source: str, cfg: Any, problems: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """Each (field, message) about a missing path, plus where it is when the path as written
    exists from the working folder: invoke-training reads relative paths from there, its
    samples say `sample_data/...` meant from its repository's root, and kubetune reads them
    beside the config file."""
    if source in ("-", "<stdin>"):
        return problems
    folder, cwd = Path(source).resolve().parent, Path.cwd()
    out = []
    for field, message in problems:
        value: Any = cfg
        for part in field.split("."):
            value = getattr(value, part, None)
        meant = _from_working_folder(value, folder, cwd)
        if meant is not None:
            message += (
                f"; {meant} exists: a relative path is relative to the config file's folder "
                "(invoke-training: the working folder), so write that path"
            )
        out.append((field, message))
    return out


def _from_working_folder(value: Any, folder: Path, cwd: Path) -> Path | None:
    if not isinstance(value, str) or _is_uri(value) or os.path.exists(value):
        return None
    try:
        meant = cwd / Path(value).relative_to(folder)
    except ValueError:
        return None
    return meant if meant.exists() and folder != cwd else None
