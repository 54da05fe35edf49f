"""The four dataset types as one indexable `Source` of (image bytes, caption) records.

Everything is read through `kubetune.storage` (local directory or S3). Listing is lazy and
paginated; only keys are held in memory. Bytes are fetched on demand (in parallel by the
caller, through `fetch_pool`); `keep_in_memory` keeps decoded images in the loader, not bytes here.

`build_source` picks the type's module (`folder_dataset`, `jsonl_dataset`, `hf_dataset`);
the names callers import from here live in `source`, `records` and `fetching`.
"""

from __future__ import annotations

from typing import Any

from kubetune.config.data import (
    AnyDatasetConfig,
    HFHubImageCaptionDatasetConfig,
    ImageCaptionDirDatasetConfig,
    ImageCaptionJsonlDatasetConfig,
    ImageDirDatasetConfig,
)
from kubetune.dataset.fetching import FETCH_WORKERS, StoreRef, bounded_map, fetch_pool
from kubetune.dataset.folder_dataset import folder_source
from kubetune.dataset.hf_dataset import hf_source
from kubetune.dataset.jsonl_dataset import jsonl_source
from kubetune.dataset.jsonl_lines import MASK_COLUMN
from kubetune.dataset.records import MaskRef, RawExample, Record, evolve
from kubetune.dataset.source import Source, merge_sources
from kubetune.errors import DataError

__all__ = [
    "FETCH_WORKERS",
    "MASK_COLUMN",
    "MaskRef",
    "RawExample",
    "Record",
    "Source",
    "StoreRef",
    "bounded_map",
    "build_source",
    "evolve",
    "fetch_pool",
    "merge_sources",
]


def build_source(
    cfg: AnyDatasetConfig,
    storage: Any | None = None,
    *,
    need_captions: bool = True,
    need_masks: bool = False,
) -> Source:
    """List the dataset (no image bytes read); DataError for missing files, bad lines, or
    an empty dataset. `need_masks` (JSONL only) reads each line's `mask` column."""
    if isinstance(cfg, ImageCaptionJsonlDatasetConfig):
        source = jsonl_source(cfg, storage, need_captions, need_masks)
    elif isinstance(cfg, ImageCaptionDirDatasetConfig):
        source = folder_source(cfg.dataset_dir, storage, cfg.keep_in_memory, captions=True)
    elif isinstance(cfg, ImageDirDatasetConfig):
        source = folder_source(cfg.dataset_dir, storage, cfg.keep_in_memory, captions=False)
    elif isinstance(cfg, HFHubImageCaptionDatasetConfig):
        source = hf_source(cfg, need_captions)
    else:  # pragma: no cover - the config union is closed
        raise TypeError(f"unknown dataset config {type(cfg).__name__}")
    if not len(source):
        raise DataError(
            f"{source.name}: the dataset is empty (no images found)",
            hint="check the path; images must be png, jpg, webp or bmp",
        )
    return source
