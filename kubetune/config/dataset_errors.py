"""Which config field a cloud dataset's (or the output bucket's) error is about. The storage
layer names a URI or a bucket (and, for a missing bucket, hints at the output URI); the user
needs the field (`data_loader.dataset.dataset_dir`, `storage.bucket`) and its fix: the runner's
last line and `launcher validate --data` both say it this way. Torch-free."""

from __future__ import annotations

from typing import Any

from kubetune.errors import KubetuneError


def dataset_problem(err: KubetuneError, cfg: Any) -> tuple[str, str] | None:
    """(field path, message) when `err` names one of `cfg`'s cloud dataset locations (its URI,
    or its bucket quoted), else None."""
    from kubetune.dataset.local_check import dataset_locations, path_field

    for where, dataset in dataset_locations(cfg) if cfg is not None else []:
        field = f"{where}.{path_field(dataset)}"
        location = str(getattr(dataset, path_field(dataset)))
        if "://" not in location:
            continue
        bucket = location.split("://", 1)[1].split("/", 1)[0]
        if location in str(err) or f"{bucket!r}" in str(err):
            hint = err.hint
            if hint and "output URI" in hint:
                hint = f"create the bucket, or point {field} at an existing bucket"
            return field, err.message + (f" ({hint})" if hint else "")
    return None


def output_problem(err: KubetuneError, cfg: Any) -> tuple[str, str] | None:
    """(`storage.bucket`, message) when `err` names the run's output bucket (quoted, or in a
    URI): a missing bucket, refused or absent credentials."""
    storage = getattr(cfg, "storage", None)
    if storage is None:
        return None
    bucket = storage.bucket
    if f"{bucket!r}" not in str(err) and f"://{bucket}/" not in str(err):
        return None
    hint = err.hint
    if hint and "output URI" in hint:
        hint = "create the bucket, or point storage.bucket at an existing bucket"
    return "storage.bucket", err.message + (f" ({hint})" if hint else "")
