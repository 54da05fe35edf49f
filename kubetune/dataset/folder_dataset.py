"""IMAGE_CAPTION_DIR_DATASET and IMAGE_DIR_DATASET: a folder's images (and their `.txt`
captions) listed into a `Source`, no image read."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from typing import Any

from kubetune.dataset.fetching import StoreRef
from kubetune.dataset.images import is_image_name
from kubetune.dataset.records import Record
from kubetune.dataset.source import Source
from kubetune.errors import DataError
from kubetune.storage import ObjectInfo


def folder_source(uri: str, storage: Any | None, keep: bool, *, captions: bool) -> Source:
    """The folder's images in listing order; with `captions`, each needs its `.txt` file."""
    if "://" not in uri and not os.path.isdir(uri):
        raise DataError(
            f"{uri}: no such folder",
            hint="put your images there, or point the field at their folder",
        )
    ref = StoreRef(uri, storage)
    images: list[ObjectInfo] = []
    texts: dict[str, ObjectInfo] = {}
    for info in _top_level(ref.get().list()):
        if is_image_name(info.key):
            images.append(info)
        elif info.key.endswith(".txt"):
            texts[info.key] = info
    records = []
    for info in images:
        caption_key, caption_etag = None, ""
        if captions:
            caption_key = posixpath.splitext(info.key)[0] + ".txt"
            if caption_key not in texts:
                raise DataError(
                    f"{ref.get().url(info.key)}: no caption file {caption_key}",
                    hint="add it, or use IMAGE_DIR_DATASET with caption templates",
                )
            text = texts[caption_key]
            caption_etag = f"{text.size}:{text.etag}"
        records.append(
            Record(
                id=info.key,
                image_key=info.key,
                caption_key=caption_key,
                size=info.size,
                etag=info.etag,
                caption_etag=caption_etag,
            )
        )
    return Source(uri, records, [ref], keep_in_memory=keep)


def _top_level(infos: Iterator[Any]) -> Iterator[Any]:
    """Files directly in the folder (no sub-folders, no hidden files)."""
    for info in infos:
        if "/" not in info.key and not info.key.startswith("."):
            yield info
