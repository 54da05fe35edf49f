"""What `launcher validate` and `submit --local` check of a config's local datasets without
reading an image: the folder or JSONL file exists, a folder has images (and caption files
where captions are needed), every JSONL line parses and names files that exist. The same
listing and parsing as the run's own (`kubetune.dataset.sources.build_source`); image headers
and decoding stay in the run's preflight and `launcher validate --data`. Torch-free."""

from __future__ import annotations

import os
from typing import Any

from kubetune.config.data import HFHubImageCaptionDatasetConfig, ImageCaptionJsonlDatasetConfig
from kubetune.dataset.captions import needs_captions
from kubetune.errors import DataError, KubetuneError

DATASET_FIELDS = ("dataset", "instance_dataset", "class_dataset")


def dataset_locations(cfg: Any) -> list[tuple[str, Any]]:
    """(field path, dataset config) of every dataset the config's data loader names."""
    loader = cfg.data_loader
    found = []
    for name in DATASET_FIELDS:
        dataset = getattr(loader, name, None)
        if dataset is not None:
            found.append((f"data_loader.{name}", dataset))
    return found


def path_field(dataset: Any) -> str:
    """The field of a dataset config that says where it is."""
    if isinstance(dataset, ImageCaptionJsonlDatasetConfig):
        return "jsonl_path"
    if isinstance(dataset, HFHubImageCaptionDatasetConfig):
        return "dataset_name"
    return "dataset_dir"


def local_data_problems(cfg: Any) -> list[tuple[str, str]]:
    """(field path, message) for each local dataset that cannot be listed or parsed; datasets
    in object storage or on the Hub are left to the run's preflight (they need the network)."""
    problems = []
    for where, dataset in dataset_locations(cfg):
        field = f"{where}.{path_field(dataset)}"
        location = getattr(dataset, path_field(dataset))
        if "://" in location:
            continue
        if isinstance(dataset, HFHubImageCaptionDatasetConfig):
            if os.path.isabs(location) and not os.path.exists(location):
                problems.append((field, f"{location}: no such folder (a local dataset saved "
                                        "with `datasets`, or a Hub name)"))  # fmt: skip
            continue
        message = _listing_problem(cfg, where, dataset)
        if message is not None:
            problems.append((field, message))
    return problems


def _listing_problem(cfg: Any, where: str, dataset: Any) -> str | None:
    from kubetune.dataset.sources import build_source

    captions = where == "data_loader.dataset" and needs_captions(cfg.data_loader)
    masks = bool(getattr(cfg, "use_masks", False)) and where == "data_loader.dataset"
    try:
        build_source(dataset, None, need_captions=captions, need_masks=masks)
    except DataError as err:
        return str(err)
    except KubetuneError:  # e.g. a JSONL line naming s3:// images: the preflight checks them
        return None
    return None
