"""HF_HUB_IMAGE_CAPTION_DATASET: a Hugging Face dataset (hub name or `save_to_disk` folder)
as a `Source` of its rows, images read as encoded bytes. `datasets` is imported only here,
when such a dataset is used."""

from __future__ import annotations

import os
from typing import Any

from kubetune.config.data import HFHubImageCaptionDatasetConfig
from kubetune.dataset.records import Record
from kubetune.dataset.source import Source
from kubetune.errors import DataError


class HFRows:
    """A `datasets.Dataset` whose image column is read as encoded bytes (not decoded)."""

    def __init__(self, dataset: Any, image_column: str) -> None:
        import datasets

        self.image_column = image_column
        self.dataset = dataset.cast_column(image_column, datasets.Image(decode=False))

    def image_bytes(self, row: int, name: str) -> bytes:
        value = self.dataset[row][self.image_column]
        if value is None or not (value.get("bytes") or value.get("path")):
            raise DataError(f"{name}: the image column holds no image")
        if value.get("bytes"):
            return value["bytes"]
        try:
            with open(value["path"], "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise DataError(f"{name}: image file {value['path']} not found") from None


def _load_hf(cfg: HFHubImageCaptionDatasetConfig) -> Any:
    import datasets

    if os.path.isdir(cfg.dataset_name):
        loaded = datasets.load_from_disk(cfg.dataset_name)
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        return loaded
    try:
        return datasets.load_dataset(
            cfg.dataset_name, cfg.dataset_config_name, cache_dir=cfg.hf_cache_dir, split="train"
        )
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        raise DataError(
            f"{cfg.dataset_name}: cannot load the dataset: {err}",
            hint="check dataset_name / dataset_config_name",
        ) from None


def hf_source(cfg: HFHubImageCaptionDatasetConfig, need_captions: bool) -> Source:
    """The dataset's `train` split, a record per row (its columns checked, no image read)."""
    dataset = _load_hf(cfg)
    columns = list(dataset.column_names)
    wanted = [cfg.image_column] + ([cfg.caption_column] if need_captions else [])
    for column in wanted:
        if column not in columns:
            raise DataError(
                f"{cfg.dataset_name}: missing column {column!r} (has {columns})",
                hint="set image_column / caption_column",
            )
    captions: list[Any] = list(dataset[cfg.caption_column]) if need_captions else []
    # no listing: the Arrow dataset's fingerprint (it changes with the data) versions each
    # row, so the dataset index is reused until the dataset changes
    version = f"hf:{getattr(dataset, '_fingerprint', '') or ''}"
    records = []
    for row in range(len(dataset)):
        caption = captions[row] if need_captions else None
        if need_captions and not isinstance(caption, str):
            raise DataError(f"{cfg.dataset_name}[{row}]: caption is not text ({caption!r})")
        records.append(
            Record(
                id=f"{cfg.dataset_name}[{row}]",
                image_key="",
                caption=caption,
                row=row,
                etag=version if version != "hf:" else "",
            )
        )
    return Source(
        cfg.dataset_name, records, [], keep_in_memory=False, hf=HFRows(dataset, cfg.image_column)
    )
