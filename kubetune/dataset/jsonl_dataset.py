"""IMAGE_CAPTION_JSONL_DATASET: a JSONL file's lines listed into a `Source` (every named file
checked against one listing per store, sizes and versions from it; no image read)."""

from __future__ import annotations

import posixpath
from typing import Any

from kubetune.config.data import ImageCaptionJsonlDatasetConfig
from kubetune.dataset.fetching import StoreRef
from kubetune.dataset.jsonl_lines import column, mask_column, parse_jsonl, plain_key, resolve
from kubetune.dataset.listing import list_known
from kubetune.dataset.records import Record
from kubetune.dataset.source import Source
from kubetune.errors import DataError
from kubetune.storage import split_uri

_Line = tuple[str, str, int, "str | None", "str | None", int, str]
"""A JSONL line's image path, key, store, caption, mask key, mask store and file:line."""


def jsonl_source(
    cfg: ImageCaptionJsonlDatasetConfig, storage: Any | None, need_captions: bool, masks: bool
) -> Source:
    """The JSONL's lines in order; files it names on other stores (URIs, absolute paths)
    each get a store of their own."""
    folder, name = split_uri(cfg.jsonl_path)
    refs = {folder: 0}
    stores = [StoreRef(folder, storage)]

    def store_of(path: str, where: str, what: str) -> tuple[int, str]:
        root, key = resolve(path, where, what)
        root = folder if root is None else root
        if root not in refs:
            refs[root] = len(stores)
            stores.append(StoreRef(root, storage))
        return refs[root], key

    try:
        text = stores[0].get().get_bytes(name)
    except FileNotFoundError:
        raise DataError(
            f"{cfg.jsonl_path}: no such file",
            hint="put the dataset's JSONL file there, or point the field at it",
        ) from None
    lines: list[_Line] = []
    for lineno, row in parse_jsonl(text, cfg.jsonl_path):
        where = f"{cfg.jsonl_path}:{lineno}"
        image = column(row, cfg.image_column, where, str)
        caption = column(row, cfg.caption_column, where, str) if need_captions else None
        store, key = (0, image) if plain_key(image) else store_of(image, where, "image")
        mask_store, mask_key = (
            store_of(mask_column(row, where), where, "mask") if masks else (0, None)
        )
        lines.append((image, key, store, caption, mask_key, mask_store, where))
    listed = _listings(lines, stores, cfg.jsonl_path)
    records = [
        Record(
            id=image,
            image_key=key,
            store=store,
            caption=caption,
            size=listed[store][key].size,
            etag=listed[store][key].etag,
            mask_key=mask_key,
            mask_store=mask_store,
            origin=where,
        )
        for image, key, store, caption, mask_key, mask_store, where in lines
    ]
    return Source(cfg.jsonl_path, records, stores, keep_in_memory=cfg.keep_in_memory)


def _listings(lines: list[_Line], stores: list[StoreRef], where: str) -> list[dict[str, Any]]:
    """Per store, its listed objects by key (one listing of the common folder of its keys;
    parallel ranges cut at the keys on S3); a key missing from it is a DataError naming the
    first such line."""
    out: list[dict[str, Any]] = []
    for number, ref in enumerate(stores):
        keys = [line[1] for line in lines if line[2] == number]
        if not keys:
            out.append({})
            continue
        folder = posixpath.commonprefix(keys).rpartition("/")[0]  # holds every key
        prefix = f"{folder}/" if folder else ""
        listed = {info.key: info for info in list_known(ref.get(), prefix, keys)}
        for key in keys:
            if key not in listed:
                raise DataError(
                    f"{ref.get().url(key)}: file not found (listed in {where})",
                    hint="fix the path or remove the entry",
                )
        out.append(listed)
    return out
