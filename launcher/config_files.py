"""Config commands' logic: validate files, write starter configs, emit the JSON Schema."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from kubetune.config import (
    PIPELINE_TYPES,
    PipelineConfig,
    json_schema,
    load_config,
    output_uri,
    parse_config,
    run_name,
)
from kubetune.config.advice import precision_warnings
from kubetune.config.gpu_fit import gpu_fit_warnings
from kubetune.config.loader import field_problems
from kubetune.errors import BadExamples, ConfigError, DataError, UserError
from kubetune.humanize import count
from launcher.pod_security import pod_patch_warnings


@dataclass
class ValidationResult:
    """The outcome of validating one config file."""

    file: str
    valid: bool
    type: str | None = None
    run_name: str | None = None
    outputs: str | None = None
    summary: str | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    """Field paths of datasets in object storage or on the Hub, which validate does not read
    (`--data` does); `notes` says where each is."""
    notes: list[str] = field(default_factory=list)


def summarize(cfg: PipelineConfig) -> str:
    """One line describing what the config will train."""
    length = (
        count(cfg.max_train_steps, "step")
        if cfg.max_train_steps
        else count(cfg.max_train_epochs or 0, "epoch")
    )
    text = (
        f"{cfg.type} run '{run_name(cfg)}': {length}, batch {cfg.train_batch_size}, "
        f"model {cfg.model}, outputs -> {output_uri(cfg)}"
    )
    job = cfg.job
    if job is not None and (job.nodes > 1 or job.backend != "job"):
        procs = job.nodes * max(job.gpus, 1)
        text += (
            f"; {count(job.nodes, 'node')} x {count(job.gpus, 'GPU')} = "
            f"{count(procs, 'process')} ({job.backend})"
        )
    return text


def validate_file(
    source: str, overrides: list[str] | None = None, *, local_data: bool = True
) -> ValidationResult:
    """Validate one file (or `-` for stdin); never raises for config problems. `local_data`:
    also list the local datasets (`kubetune.dataset.local_check`, no image read): errors for
    a local run, warnings with `storage:` (the path may be inside the pod's image)."""
    source = source if source != "-" else "<stdin>"
    try:
        cfg = load_config("-" if source == "<stdin>" else source, overrides=overrides)
    except ConfigError as err:
        return ValidationResult(file=source, valid=False, errors=list(err.problems))
    result = _valid(source, cfg)
    _note_unread_datasets(result, cfg)
    problems = local_data_lines(source, cfg, overrides) if local_data else []
    if cfg.storage is not None:
        result.warnings += [f"{p} (fine if the pod's image has it)" for p in problems]
    elif problems:
        result.valid, result.errors = False, problems
    return result


def _note_unread_datasets(result: ValidationResult, cfg: PipelineConfig) -> None:
    """Name each dataset validate does not read (object storage, the Hub): an 'ok' must not
    read as 'the bucket exists'."""
    from kubetune.config.data import HFHubImageCaptionDatasetConfig
    from kubetune.dataset.local_check import dataset_locations, path_field

    for where, dataset in dataset_locations(cfg):
        location = getattr(dataset, path_field(dataset))
        on_hub = isinstance(dataset, HFHubImageCaptionDatasetConfig) and not location.startswith(
            "/"
        )
        if "://" in location or on_hub:
            path = f"{where}.{path_field(dataset)}"
            result.unchecked.append(path)
            result.notes.append(
                f"{result.file}: {path}: {location} not read (in object storage or on the "
                "Hub); `launcher validate --data` reads it"
            )


def validate_text(
    text: str, name: str, base: Path | None = None
) -> tuple[ValidationResult, PipelineConfig | None]:
    """`validate_file`'s checks on YAML text (the UI's Generate Config): (result, config).
    `base`: the folder its relative paths resolve against (None: left as written)."""
    try:
        cfg = parse_config(text, name=name, base=base)
    except ConfigError as err:
        return ValidationResult(file=name, valid=False, errors=list(err.problems)), None
    return _valid(name, cfg), cfg


def _valid(source: str, cfg: PipelineConfig) -> ValidationResult:
    return ValidationResult(
        file=source,
        valid=True,
        type=cfg.type,
        run_name=run_name(cfg),
        outputs=output_uri(cfg),
        summary=summarize(cfg),
        warnings=pod_patch_warnings(cfg) + precision_warnings(cfg) + gpu_fit_warnings(cfg),
    )


def local_data_lines(
    source: str, cfg: PipelineConfig, overrides: list[str] | None = None
) -> list[str]:
    """`file:line: field.path: message` for each local model path that is missing and each
    local dataset that cannot be listed (`--set KEY=VALUE: ...` for one an override gave)."""
    from kubetune.config.paths import model_path_problems, with_working_folder_hints
    from kubetune.dataset.local_check import local_data_problems

    problems = model_path_problems(cfg) + local_data_problems(cfg)
    return field_problems(source, with_working_folder_hints(source, cfg, problems), overrides)


def local_storage_lines(
    source: str, cfg: PipelineConfig, overrides: list[str] | None = None
) -> list[str]:
    """`file:line: field.path: message` for each bucket of a local run that does not exist or
    that this machine's credentials may not list (`launcher.local_storage_check`)."""
    from launcher.local_storage_check import storage_problems

    return field_problems(source, storage_problems(cfg), overrides)


def check_local_data(source: str, cfg: PipelineConfig, overrides: list[str] | None = None) -> None:
    """Raise DataError (exit 2) listing the local datasets that cannot be listed and the
    buckets this machine cannot use, before a local run starts."""
    problems = local_data_lines(source, cfg, overrides) or local_storage_lines(
        source, cfg, overrides
    )
    if problems:
        raise DataError("\n".join(problems))


def verify_dataset(
    result: ValidationResult,
    overrides: list[str] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ValidationResult:
    """For a valid config: download and fully decode every example of its dataset (no torch);
    a bad dataset marks the result invalid with one error line per bad example."""
    if not result.valid:
        return result
    result.unchecked, result.notes = [], []  # read below
    from kubetune.dataset.preflight import verify_data

    cfg = load_config("-" if result.file == "<stdin>" else result.file, overrides=overrides)
    try:
        report = verify_data(cfg, on_progress=on_progress)
    except UserError as err:
        from kubetune.config.dataset_errors import dataset_problem
        from kubetune.dataset.local_check import dataset_locations

        problems = err.problems if isinstance(err, BadExamples) else [str(err)]
        where = dataset_locations(cfg)[0][0] if dataset_locations(cfg) else "data_loader"
        found = None if isinstance(err, BadExamples) else dataset_problem(err, cfg)
        result.valid = False
        result.errors = field_problems(
            result.file, [found] if found else [(where, p) for p in problems], overrides
        )
        return result
    result.summary = f"{result.summary}; data: {count(report.num_examples, 'example')} decode"
    return result


def results_to_json(results: list[ValidationResult]) -> str:
    return json.dumps(
        {"valid": all(r.valid for r in results), "results": [asdict(r) for r in results]}, indent=2
    )


def starter_config(pipeline_type: str) -> str:
    """The commented starter config for a pipeline type (passes the schema as written;
    `validate` then also wants its dataset folder)."""
    if pipeline_type not in PIPELINE_TYPES:
        raise UserError(
            f"--type {pipeline_type!r} is not a pipeline type",
            hint=f"use one of {', '.join(PIPELINE_TYPES)}",
        )
    return resources.files("launcher").joinpath(f"templates/{pipeline_type}.yaml").read_text()


def write_starter(pipeline_type: str, output: Path | None, force: bool) -> str:
    """Write the starter config to `output` (or return it for stdout). Never overwrites
    an existing file unless `force`."""
    text = starter_config(pipeline_type)
    if output is not None:
        if output.exists() and not force:
            raise UserError(f"{output} already exists", hint="pass --force to overwrite it")
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
    return text


def starter_next_step(path: Path) -> str:
    """What to do after `launcher init -o PATH`: the starter's dataset location does not
    exist yet, so name it (absolute, as `validate` will) and the field that sets it."""
    from kubetune.dataset.local_check import dataset_locations, path_field

    for where, dataset in dataset_locations(load_config(path)):
        field = f"{where}.{path_field(dataset)}"
        return (
            f"next: put your images in {getattr(dataset, path_field(dataset))} (or set {field} "
            f"to your folder or s3:// prefix), then `launcher validate {path}`"
        )
    return f"next: `launcher validate {path}`"


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2)
