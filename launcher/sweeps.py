"""Sweeps: `--sweep key=v1,v2` axes → the product of configs, each a run with a stable derived
name (re-submitting a sweep is idempotent) and the sweep's labels. Pure: no cluster, no I/O."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from kubetune.config.cluster import MAX_RUN_NAME, label_problem
from kubetune.errors import ConfigError, UserError
from kubetune.humanize import count

if TYPE_CHECKING:
    from kubetune.config import PipelineConfig

LABEL_SWEEP = "kubetune.io/sweep"
PARAM_LABEL_PREFIX = "sweep.kubetune.io/"
MAX_RUNS = 256
HASH_CHARS = 8
SPEC_FORMS = "KEY=V1,V2,... or KEY=[V1, V2, ...] (a YAML / JSON list; quote values with commas)"
SPEC_EXAMPLE = (
    "e.g. --sweep optimizer.learning_rate=1e-4,5e-5 or "
    "--sweep 'validation_prompts.0=[\"a cat, sitting\", a dog]'"
)


@dataclass(frozen=True)
class Axis:
    """One swept field and its values (as written: parsed as YAML by the config loader)."""

    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Member:
    """One run of a sweep: its overrides and its validated config."""

    run: str
    params: dict[str, str]
    config: PipelineConfig


def parse_axes(specs: tuple[str, ...] | list[str]) -> list[Axis]:
    """`KEY=V1,V2,...` or `KEY=[V1, V2, ...]` (a YAML / JSON list, for values that hold
    commas) per spec; a one-line UserError naming the bad spec otherwise."""
    axes: list[Axis] = []
    for spec in specs:
        key, sep, raw = spec.partition("=")
        values = _list_values(spec, raw) if raw.lstrip().startswith("[") else _plain_values(raw)
        if not sep or not key.strip() or not values or not all(values):
            raise UserError(f"--sweep {spec!r}: use {SPEC_FORMS}", hint=SPEC_EXAMPLE)
        if key.strip() in {a.key for a in axes}:
            raise UserError(
                f"--sweep {key.strip()} given twice: list all its values in one --sweep"
            )
        axes.append(Axis(key.strip(), values))
    size = 1
    for axis in axes:
        size *= len(axis.values)
    if size > MAX_RUNS:
        raise UserError(
            f"--sweep: {count(size, 'run')} is more than {MAX_RUNS}; sweep fewer values"
        )
    return axes


def _plain_values(raw: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in raw.split(","))


def _list_values(spec: str, raw: str) -> tuple[str, ...]:
    """Each item of a YAML / JSON list as the text ``--set`` parses back to that item."""
    try:
        items = yaml.safe_load(raw)
    except yaml.YAMLError:
        items = None
    if not isinstance(items, list) or not items:
        raise UserError(f"--sweep {spec!r}: use {SPEC_FORMS}", hint=SPEC_EXAMPLE)
    return tuple(_as_text(item) for item in items)


def _as_text(item: Any) -> str:
    """A plain string stays as written (``1e-4``, ``a cat, sitting``); anything else, or a
    string YAML would read as another type (``"1"``), becomes JSON (a YAML flow value)."""
    if isinstance(item, str):
        try:
            if yaml.safe_load(item) == item:
                return item
        except yaml.YAMLError:
            pass
    return json.dumps(item, ensure_ascii=False)


def combinations(axes: list[Axis]) -> list[dict[str, str]]:
    """The product of the axes, in the order given (first axis slowest)."""
    keys = [a.key for a in axes]
    return [
        dict(zip(keys, combo, strict=True))
        for combo in itertools.product(*(a.values for a in axes))
    ]


def member_name(sweep: str, params: dict[str, str]) -> str:
    """`<sweep>-<hash of the assignments>`: stable whatever the order of --sweep flags."""
    canonical = "\n".join(f"{k}={params[k]}" for k in sorted(params))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:HASH_CHARS]
    return f"{sweep[: MAX_RUN_NAME - HASH_CHARS - 1].rstrip('-')}-{digest}"


def param_labels(params: dict[str, str]) -> dict[str, str]:
    """`sweep.kubetune.io/<key>: <value>` for every assignment that is a valid label."""
    labels = {f"{PARAM_LABEL_PREFIX}{k}": str(v) for k, v in params.items()}
    return {k: v for k, v in labels.items() if label_problem(k, v) is None}


def with_sweep(cfg: PipelineConfig, sweep: str, run: str, params: dict[str, str]) -> PipelineConfig:
    """``cfg`` renamed to ``run``, its local outputs under ``<base_output_dir>/<run>``, and
    labelled with the sweep and its parameters."""
    from kubetune.config import config_to_dict, parse_config

    data: dict[str, Any] = config_to_dict(cfg)
    job = data.get("job") or {}
    job["name"] = run
    job["labels"] = {**(job.get("labels") or {}), LABEL_SWEEP: sweep, **param_labels(params)}
    data["job"] = job
    if cfg.base_output_dir is not None:  # None: the outputs go to storage, named by job.name
        data["base_output_dir"] = str(Path(cfg.base_output_dir) / run)
    return parse_config(yaml.safe_dump(data, sort_keys=False), name=f"sweep {run}")


def _as_sweep(problem: str, swept: list[str]) -> str:
    for item in swept:
        if problem.startswith(f"--set {item}:"):
            return "--sweep" + problem[len("--set") :]
    return problem


def expand(
    config: str | Path, overrides: tuple[str, ...], name: str | None, axes: list[Axis]
) -> tuple[str, list[Member]]:
    """Validate every member (all problems before anything is submitted): (sweep, members)."""
    from kubetune.config import run_name
    from launcher import api

    sweep = run_name(api.load(config, overrides, name))
    members = []
    for params in combinations(axes):
        swept = [f"{k}={v}" for k, v in params.items()]
        try:
            cfg = api.load(config, [*overrides, *swept], name)
        except ConfigError as err:  # name the --sweep value, not the --set it became
            raise ConfigError([_as_sweep(p, swept) for p in err.problems], err.source) from None
        run = member_name(sweep, params)
        members.append(Member(run, params, with_sweep(cfg, sweep, run, params)))
    return sweep, members
