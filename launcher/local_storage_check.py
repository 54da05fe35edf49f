"""What `launcher submit --local` (and the UI's local Start Training) checks of a run's object
storage before anything starts: each bucket it names (the outputs', each `s3://` / `gs://` /
`az://` dataset's) exists and this machine's credentials may list it. One list request each,
no object read; a refusal the user must fix (no such bucket, no or wrong credentials) is an
error naming the config field, as `launcher validate --data` names a dataset's. An endpoint
that does not answer, and a write the credentials may not make, are left to the run itself
(its retries, its one-line error). Click-free."""

from __future__ import annotations

from typing import Any

from kubetune.config import PipelineConfig, output_uri
from kubetune.errors import StorageError, StorageUserError
from kubetune.storage import is_remote, open_store

PROBE = {"max_attempts": 1, "connect_timeout": 3.0, "read_timeout": 10.0, "page_size": 1}
"""One request of one key, bounded: a submit never waits on the transfer retries of a run."""


def storage_problems(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """(field path, message) for each object-storage location of `cfg` this machine cannot
    use; empty when every one answers (or none is in object storage)."""
    problems = []
    for field, uri in _locations(cfg):
        try:
            next(iter(open_store(uri, cfg.storage, **PROBE).list()), None)
        except StorageUserError as err:
            problems.append((field, _message(err, field)))
        except StorageError:  # unreachable or failing now: the run's own retries decide
            continue
    return problems


def _locations(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """(field path, URI) of the outputs and the datasets that live in object storage."""
    from kubetune.dataset.local_check import dataset_locations, path_field

    found = []
    if cfg.storage is not None:
        found.append(("storage.bucket", output_uri(cfg)))
    elif cfg.base_output_dir is not None and is_remote(cfg.base_output_dir):
        found.append(("base_output_dir", cfg.base_output_dir))
    for where, dataset in dataset_locations(cfg):
        location = str(getattr(dataset, path_field(dataset)))
        if is_remote(location):
            found.append((f"{where}.{path_field(dataset)}", _folder_of(dataset, location)))
    return found


def _folder_of(dataset: Any, location: str) -> str:
    """A JSONL dataset is a file: its folder is what is listed."""
    from kubetune.config.data import ImageCaptionJsonlDatasetConfig
    from kubetune.storage.schemes import split_uri

    return (
        split_uri(location)[0] if isinstance(dataset, ImageCaptionJsonlDatasetConfig) else location
    )


def _message(err: StorageUserError, field: str) -> str:
    hint = err.hint
    if hint and "output URI" in hint:  # the storage layer's hint names no field
        hint = f"create the bucket, or point {field} at an existing bucket"
    return err.message + (f" ({hint})" if hint else "")
