"""The four dataset types as one indexable `Source` of (image bytes, caption) records.

Everything is read through `kubetune.storage` (local directory or S3). Listing is lazy and
paginated; only keys are held in memory. Bytes are fetched on demand (in parallel by the
caller, through `fetch_pool`); `keep_in_memory` keeps decoded images in the loader, not bytes here.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import posixpath
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from kubetune.config.data import (
    AnyDatasetConfig,
    HFHubImageCaptionDatasetConfig,
    ImageCaptionDirDatasetConfig,
    ImageCaptionJsonlDatasetConfig,
    ImageDirDatasetConfig,
)
from kubetune.dataset.images import is_image_name
from kubetune.dataset.listing import list_known
from kubetune.errors import DataError
from kubetune.storage import ObjectInfo, ObjectStore, is_remote, open_store, parse_uri, split_uri

_T = TypeVar("_T")
_U = TypeVar("_U")
MASK_COLUMN = "mask"
"""The JSONL key of a line's loss-mask image path (fixed, as in invoke-training)."""
FETCH_WORKERS = 16
"""Parallel GETs per process (bounded pool)."""
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def fetch_pool() -> ThreadPoolExecutor:
    """This process's bounded fetch pool (a fresh one after fork, e.g. in loader workers)."""
    pid = os.getpid()
    with _pools_lock:
        if pid not in _pools:
            _pools[pid] = ThreadPoolExecutor(FETCH_WORKERS, thread_name_prefix="kubetune-fetch")
        return _pools[pid]


def bounded_map(fn: Callable[[_T], _U], items: Sequence[_T], window: int = 256) -> Iterator[_U]:
    """``fetch_pool().map(fn, items)`` with at most ``window`` calls submitted at a time
    (a future per item of 100,000 at once costs memory and time for nothing)."""
    pool, pending = fetch_pool(), deque[Future[_U]]()
    for item in items:
        if len(pending) >= window:
            yield pending.popleft().result()
        pending.append(pool.submit(fn, item))
    while pending:
        yield pending.popleft().result()


class StoreRef:
    """A store opened lazily once per process. It pickles with the store it opened (its
    settings, resolved here), so a DataLoader worker started by forkserver or spawn gets its
    own client for the same endpoint and credentials; a forked process reopens it."""

    def __init__(self, uri: str, storage: Any | None = None) -> None:
        self.uri, self.storage = uri, storage
        self._store: ObjectStore | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def get(self) -> ObjectStore:
        with self._lock:
            if self._store is None or self._pid != os.getpid():
                self._store, self._pid = open_store(self.uri, self.storage), os.getpid()
            return self._store

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "storage": self.storage, "store": self._store}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"], state["storage"])  # type: ignore[misc]
        if state.get("store") is not None:
            self._store, self._pid = state["store"], os.getpid()


def evolve(obj: _T, **changes: Any) -> _T:
    """``dataclasses.replace`` for the frozen records made 100,000 at a time: a copy of the
    instance's fields with ``changes`` (no ``__init__`` call; ~10x faster at that count)."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__, **changes)
    return new


@dataclass(frozen=True)
class Record:
    """One example: where its image (and caption) are, and a name for messages."""

    id: str
    image_key: str
    store: int = 0
    caption: str | None = None
    caption_key: str | None = None
    row: int | None = None  # HF datasets: the row holding the image
    size: int = -1
    """Byte size from the listing (-1: not listed, e.g. HF rows)."""
    etag: str = ""
    """Version tag from the listing (S3 ETag / local mtime); with `size` it keys the index."""
    caption_etag: str = ""
    mask_key: str | None = None  # use_masks: the loss mask image, in store `mask_store`
    mask_store: int = 0
    origin: str | None = None  # JSONL: "file:line", for messages


_record_fields = operator.attrgetter(*Record.__dataclass_fields__)


@dataclass(frozen=True)
class MaskRef:
    """The loss mask of one example (`use_masks`): encoded bytes and a name for messages."""

    data: bytes
    name: str


@dataclass(frozen=True)
class RawExample:
    id: str
    data: bytes
    caption: str | None
    mask: MaskRef | None = None


class Source:
    """Indexable records plus the stores (or HF dataset) their bytes come from."""

    def __init__(
        self,
        name: str,
        records: list[Record],
        stores: list[StoreRef],
        keep_in_memory: bool = False,
        hf: _HFRows | None = None,
    ) -> None:
        self.name = name
        self.records = records
        self.stores = stores
        self.keep_in_memory = keep_in_memory
        self.hf = hf
        self._digest: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Records pickle as tuples (the preflight process hands 100,000 of them over: a
        third of the bytes and a quarter of the time of pickling the objects)."""
        state = dict(self.__dict__)
        state["records"] = list(map(_record_fields, self.records))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.records = [Record(*fields) for fields in state["records"]]

    def digest(self) -> str:
        """What the listing says of every example, in order (store, key, size, version,
        caption file version), hashed once: equal digests, the same objects in the same
        order (the dataset index is then reused whole)."""
        if self._digest is None:
            uris = [ref.uri for ref in self.stores]
            lines = (
                f"{uris[r.store] if r.row is None else ''}\0{r.image_key or r.id}\0{r.size}\0"
                f"{r.etag}\0{r.caption_etag}\n"
                for r in self.records
            )
            self._digest = hashlib.sha256("".join(lines).encode()).hexdigest()
        return self._digest

    def __len__(self) -> int:
        return len(self.records)

    def url(self, index: int) -> str:
        rec = self.records[index]
        if rec.row is not None:
            return rec.id
        return self.stores[rec.store].get().url(rec.image_key)

    def fetch(self, index: int) -> RawExample:
        """The example's encoded image bytes and caption (DataError naming a missing file)."""
        rec = self.records[index]
        if rec.row is not None and self.hf is not None:
            data = self.hf.image_bytes(rec.row, rec.id)
        else:
            data = self._get(rec.store, rec.image_key)
        return RawExample(rec.id, data, self.caption(index), self._mask(rec))

    def caption(self, index: int) -> str | None:
        """The example's dataset caption (reads its caption file, if it has one)."""
        rec = self.records[index]
        if rec.caption_key is None:
            return rec.caption
        raw = self._get(rec.store, rec.caption_key)
        try:
            return raw.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise DataError(
                f"{self._url(rec, rec.caption_key)}: caption is not valid UTF-8 (byte {err.start})",
                hint="re-save the file as UTF-8",
            ) from None

    def head(self, index: int, length: int, start: int = 0) -> bytes:
        """`length` bytes of the example's image from `start` (one ranged GET; HF rows and
        stores without ranged reads return the whole image, whatever `start`)."""
        rec = self.records[index]
        if rec.row is not None and self.hf is not None:
            return self.hf.image_bytes(rec.row, rec.id)
        store = self.stores[rec.store].get()
        if not hasattr(store, "get_range"):
            return self._get(rec.store, rec.image_key)
        try:
            return store.get_range(rec.image_key, start, length)
        except FileNotFoundError:
            raise DataError(
                f"{self._url(rec, rec.image_key)}: file not found",
                hint="fix the path or remove the entry",
            ) from None

    async def head_async(self, index: int, length: int) -> bytes:
        """`head` awaited, from offset 0 (a store with `Capability.ASYNC_READS`)."""
        rec = self.records[index]
        try:
            return await self.stores[rec.store].get().get_range_async(rec.image_key, 0, length)
        except FileNotFoundError:
            raise DataError(
                f"{self._url(rec, rec.image_key)}: file not found",
                hint="fix the path or remove the entry",
            ) from None

    def mask_head(self, index: int, length: int) -> MaskRef:
        """The first `length` bytes of the example's mask (one ranged GET)."""
        rec = self.records[index]
        assert rec.mask_key is not None
        store = self.stores[rec.mask_store].get()
        name = f"{rec.origin}: mask {store.url(rec.mask_key)}"
        try:
            return MaskRef(store.get_range(rec.mask_key, 0, length), name)
        except FileNotFoundError:
            raise DataError(
                f"{name}: file not found", hint="fix the path or remove the entry"
            ) from None

    def store_uri(self, index: int) -> str:
        """The URI of the store holding the example ("" for HF rows)."""
        rec = self.records[index]
        return self.stores[rec.store].uri if rec.row is None else ""

    def _url(self, rec: Record, key: str) -> str:
        return self.stores[rec.store].get().url(key)

    def _get(self, store: int, key: str, what: str = "") -> bytes:
        try:
            return self.stores[store].get().get_bytes(key)
        except FileNotFoundError:
            raise DataError(
                f"{what}{self.stores[store].get().url(key)}: file not found",
                hint="fix the path or remove the entry",
            ) from None

    def _mask(self, rec: Record) -> MaskRef | None:
        if rec.mask_key is None:
            return None
        name = f"{rec.origin}: mask {self.stores[rec.mask_store].get().url(rec.mask_key)}"
        data = self._get(rec.mask_store, rec.mask_key, f"{rec.origin}: mask ")
        return MaskRef(data, name)


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
        source = _jsonl_source(cfg, storage, need_captions, need_masks)
    elif isinstance(cfg, ImageCaptionDirDatasetConfig):
        source = _dir_source(cfg.dataset_dir, storage, cfg.keep_in_memory, captions=True)
    elif isinstance(cfg, ImageDirDatasetConfig):
        source = _dir_source(cfg.dataset_dir, storage, cfg.keep_in_memory, captions=False)
    elif isinstance(cfg, HFHubImageCaptionDatasetConfig):
        source = _hf_source(cfg, need_captions)
    else:  # pragma: no cover - the config union is closed
        raise TypeError(f"unknown dataset config {type(cfg).__name__}")
    if not len(source):
        raise DataError(
            f"{source.name}: the dataset is empty (no images found)",
            hint="check the path; images must be png, jpg, webp or bmp",
        )
    return source


def merge_sources(parts: list[tuple[str, Source, str]]) -> Source:
    """One `Source` of several (name, source, fixed caption) parts, in order: ids become
    ``<name>/<id>``, every caption the part's caption."""
    records: list[Record] = []
    stores: list[StoreRef] = []
    for name, source, caption in parts:
        offset = len(stores)
        stores.extend(source.stores)
        records += [
            replace(
                rec,
                id=f"{name}/{rec.id}",
                caption=caption,
                caption_key=None,
                store=rec.store + offset,
                mask_store=rec.mask_store + offset,
            )
            for rec in source.records
        ]
    return Source(" + ".join(source.name for _, source, _ in parts), records, stores)


# --- directories ---------------------------------------------------------------------------


def _dir_source(uri: str, storage: Any | None, keep: bool, *, captions: bool) -> Source:
    if "://" not in uri and not os.path.isdir(uri):
        raise DataError(f"{uri}: no such folder", hint="check data_loader.dataset.dataset_dir")
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


# --- JSONL ---------------------------------------------------------------------------------


def _jsonl_source(
    cfg: ImageCaptionJsonlDatasetConfig, storage: Any | None, need_captions: bool, masks: bool
) -> Source:
    folder, name = split_uri(cfg.jsonl_path)
    refs = {folder: 0}
    stores = [StoreRef(folder, storage)]

    def store_of(path: str, where: str, what: str) -> tuple[int, str]:
        root, key = _resolve(path, where, what)
        root = folder if root is None else root
        if root not in refs:
            refs[root] = len(stores)
            stores.append(StoreRef(root, storage))
        return refs[root], key

    try:
        text = stores[0].get().get_bytes(name)
    except FileNotFoundError:
        raise DataError(
            f"{cfg.jsonl_path}: no such file", hint="check data_loader.dataset.jsonl_path"
        ) from None
    lines: list[_Line] = []
    for lineno, row in _parse_jsonl(text, cfg.jsonl_path):
        where = f"{cfg.jsonl_path}:{lineno}"
        image = _column(row, cfg.image_column, where, str)
        caption = _column(row, cfg.caption_column, where, str) if need_captions else None
        store, key = (0, image) if _plain_key(image) else store_of(image, where, "image")
        mask_store, mask_key = (
            store_of(_mask_column(row, where), where, "mask") if masks else (0, None)
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


_Line = tuple[str, str, int, "str | None", "str | None", int, str]
"""A JSONL line's image path, key, store, caption, mask key, mask store and file:line."""


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


def _parse_jsonl(text: bytes, path: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line. The lines are parsed as one JSON array
    (one call for 100,000 lines); should that fail or not give one object per line, line by
    line, so the first bad line is named."""
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    try:
        rows = json.loads(b"[" + b",".join(line for _, line in lines) + b"]")
    except (ValueError, UnicodeDecodeError):
        rows = None
    if (
        not isinstance(rows, list)
        or len(rows) != len(lines)
        or not all(type(row) is dict for row in rows)
    ):
        rows = [_parse_line(line, f"{path}:{n}") for n, line in lines]
    return [(n, row) for (n, _), row in zip(lines, rows, strict=True)]


def _plain_key(path: str) -> bool:
    """A relative path that is its own key in the JSONL's folder: no scheme, no leading or
    trailing '/', no empty, '.' or '..' segment, no backslash (`_resolve` gives it back
    unchanged; checked without splitting it)."""
    return (
        bool(path)
        and path[0] != "/"
        and path[-1] != "/"
        and "://" not in path
        and "\\" not in path
        and "//" not in path
        and "/./" not in f"/{path}/"
        and "/../" not in f"/{path}/"
    )


def _parse_line(line: bytes, where: str) -> dict[str, Any]:
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{where}: line is not valid UTF-8") from None
    except json.JSONDecodeError as err:
        raise DataError(
            f"{where}: not valid JSON ({err.msg})", hint="each line must be one JSON object"
        ) from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _column(row: dict[str, Any], column: str, where: str, kind: type) -> Any:
    if column not in row:
        raise DataError(
            f"{where}: missing column {column!r} (has {sorted(row)})",
            hint="fix the line or set image_column / caption_column",
        )
    value = row[column]
    if not isinstance(value, kind):
        raise DataError(
            f"{where}: column {column!r} must be a {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _mask_column(row: dict[str, Any], where: str) -> str:
    """The line's `mask` path (invoke-training's fixed column name)."""
    value = row.get(MASK_COLUMN)
    if not isinstance(value, str) or not value:
        raise DataError(
            f"{where}: use_masks needs a {MASK_COLUMN!r} path on every line (got {value!r})",
            hint="add the mask image path, or set use_masks: false",
        )
    return value


def _resolve(path: str, where: str, what: str = "image") -> tuple[str | None, str]:
    """(store root or None for the JSONL folder, key) for a file path from a JSONL line."""
    if is_remote(path):
        loc = parse_uri(path)
        if not loc.path:
            raise DataError(f"{where}: {path!r} is not a {loc.scheme}://bucket/key URI")
        _check_relative(loc.path, path, where, what)
        return loc.root, loc.path
    if os.path.isabs(path):
        return "/", path.lstrip("/")
    _check_relative(path, path, where, what)
    return None, posixpath.normpath(path)


def _check_relative(key: str, shown: str, where: str, what: str = "image") -> None:
    if ".." in key.replace("\\", "/").split("/") or "://" in key:
        raise DataError(
            f"{where}: {what} path {shown!r} escapes the dataset folder",
            hint="use a path inside the dataset folder (no '..')",
        )


# --- Hugging Face datasets -----------------------------------------------------------------


class _HFRows:
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


def _hf_source(cfg: HFHubImageCaptionDatasetConfig, need_captions: bool) -> Source:
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
        cfg.dataset_name, records, [], keep_in_memory=False, hf=_HFRows(dataset, cfg.image_column)
    )
