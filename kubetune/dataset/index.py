"""The dataset index: per example its store, key, byte size, version (ETag / mtime), image
height and width and caption, built from one listing plus one ranged header read per image.

It is stored with the run (`INDEX_KEY`) and beside the runs, keyed by the dataset's URI
(`shared_index_key`), so a restarted run and a later run of another name on the same data
reuse it: an entry is reused while the listing still shows the same size and version for its
image (and caption file), and rescanned otherwise. Captions given inline (JSONL lines, HF
rows) always come from the current dataset. Memory is O(number of examples). No torch here:
`launcher validate --data` uses it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from kubetune.dataset.headers import (
    check_mask_header,
    header_size_hw,
    header_sizes_async,
    reads_async,
)
from kubetune.dataset.images import MAX_IMAGE_PIXELS
from kubetune.dataset.size_feed import SizeStream
from kubetune.dataset.sources import Record, Source, bounded_map, evolve
from kubetune.errors import DataError, StorageError, StorageUserError
from kubetune.layout import DATA_INDEX_KEY, DATASET_INDEXES
from kubetune.storage import ObjectStore, is_remote, open_store, parse_uri, split_uri

log = logging.getLogger(__name__)
INDEX_KEY = DATA_INDEX_KEY
"""The index's key in the run's output location (gzip'd JSON)."""
INDEX_VERSION = 2
"""Version 2: columns in the order of the records indexed, with the listing's digest (version
1, rows of entries without a digest, is still read)."""
SHARED_KEY_SCHEME = 1
"""Part of the key of the index beside the runs (unchanged by version 2: both are readable)."""


@dataclass(frozen=True)
class IndexEntry:
    """What the index knows about one example."""

    size: int
    etag: str
    height: int
    width: int
    caption: str | None
    caption_etag: str = ""


Key = tuple[str, str]  # (store URI, key)
_COLUMNS = ("store", "key", "size", "etag", "height", "width", "caption", "caption_etag")


class DataIndex:
    """Entries by (store URI, key), serialised as gzip'd JSON columns.

    An index built from a whole source also keeps its entries in the source's record order
    (``columns``) with the digest of the listing they came from (``listing_digest``): a run
    whose listing has the same digest takes every size from the columns in order, without a
    lookup per example. ``entries`` (by key) is made from the columns on first use."""

    def __init__(
        self,
        entries: dict[Key, IndexEntry] | None = None,
        *,
        digest: str = "",
        columns: dict[str, list[Any]] | None = None,
    ) -> None:
        self._entries = entries
        self.digest = digest
        self.columns = columns
        self._bytes: bytes | None = None

    @classmethod
    def in_order(cls, keys: list[Key], rows: list[IndexEntry], digest: str) -> DataIndex:
        """The index of a whole source: its entries in record order, with its digest."""
        stores = sorted({store for store, _ in keys})
        number = {uri: i for i, uri in enumerate(stores)}
        columns: dict[str, list[Any]] = {
            "stores": stores,
            "store": [number[s] for s, _ in keys],
            "key": [k for _, k in keys],
            "size": [e.size for e in rows],
            "etag": [e.etag for e in rows],
            "height": [e.height for e in rows],
            "width": [e.width for e in rows],
            "caption": [e.caption for e in rows],
            "caption_etag": [e.caption_etag for e in rows],
        }
        return cls(digest=digest, columns=columns)

    @property
    def entries(self) -> dict[Key, IndexEntry]:
        if self._entries is None:
            self._entries = _entries_of(self.columns) if self.columns else {}
        return self._entries

    def __len__(self) -> int:
        return len(self.columns["key"]) if self.columns else len(self.entries)

    def to_bytes(self) -> bytes:
        """The stored form, made once (a run stores it twice: with the run, beside the runs);
        gzip level 1: a 100,000-image index is a few percent larger than at level 9 and
        compressed in a tenth of the time, before step 1."""
        if self._bytes is None:
            columns = self.columns or _columns_of(self.entries)
            digest = self.digest if self.columns else ""
            doc = {"version": INDEX_VERSION, "digest": digest, **columns}
            text = json.dumps(doc, separators=(",", ":")).encode()
            self._bytes = gzip.compress(text, compresslevel=1, mtime=0)
        return self._bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> DataIndex:
        doc = json.loads(gzip.decompress(data))
        version = doc.get("version")
        if version == 1:
            return cls({(r[0], r[1]): IndexEntry(*r[2:]) for r in doc["entries"]})
        if version != INDEX_VERSION:
            raise ValueError(f"index version {version}")
        columns = {name: doc[name] for name in ("stores", *_COLUMNS)}
        if len({len(columns[name]) for name in _COLUMNS}) != 1:
            raise ValueError("index columns of different lengths")
        return cls(digest=str(doc.get("digest") or ""), columns=columns)


def _entries_of(columns: dict[str, list[Any]]) -> dict[Key, IndexEntry]:
    stores = columns["stores"]
    rows = zip(*(columns[name] for name in _COLUMNS), strict=True)
    return {(stores[s], k): IndexEntry(*rest) for s, k, *rest in rows}


def _columns_of(entries: dict[Key, IndexEntry]) -> dict[str, list[Any]]:
    return DataIndex.in_order(list(entries), list(entries.values()), "").columns or {}


def listing_digest(source: Source) -> str:
    """The digest of what the listing says of every example, in order (`Source.digest`)."""
    return source.digest()


def load_index(store: ObjectStore | None, key: str = INDEX_KEY) -> DataIndex | None:
    """The index stored at `key` (the run's by default), or None (absent or unreadable)."""
    if store is None:
        return None
    try:
        return DataIndex.from_bytes(store.get_bytes(key))
    except FileNotFoundError:
        return None
    except (
        ValueError,
        KeyError,
        TypeError,
        IndexError,
        OSError,
        StorageError,
        StorageUserError,
    ) as err:
        # only an optimisation: a failed or refused read (retries spent, access denied to the
        # location beside the runs) means a rescan, never a failure
        log.warning("ignoring an unreadable data index %s: %s", store.url(key), err)
        return None


def save_index(store: ObjectStore, report: Any, key: str = INDEX_KEY) -> None:
    """Store a preflight report's index at `key` (the run's by default), unless the stored
    one is current."""
    if report.index is None or (report.scanned == 0 and store.exists(key)):
        return
    store.put_bytes(key, report.index.to_bytes())


def save_shared_index(store: ObjectStore | None, report: Any) -> None:
    """Store the index beside the runs for later runs on the same data; best-effort (a
    read-only or failing location only costs a later run its header reads)."""
    if store is None or report.source is None:
        return
    try:
        save_index(store, report, shared_index_key(report.source))
    except (OSError, StorageError, StorageUserError) as err:  # e.g. access denied there
        log.warning("could not store the dataset index beside the runs: %s", err)


def shared_index_key(source: Source) -> str:
    """The key of a dataset's index beside the runs: one per dataset URI (a local path made
    absolute) and index version."""
    name = source.name
    if "://" not in name and os.path.exists(name):
        name = os.path.abspath(name)
    digest = hashlib.sha256(f"{SHARED_KEY_SCHEME}|{name}".encode()).hexdigest()[:32]
    return f"{DATASET_INDEXES}/{digest}.json.gz"


def shared_index_store(cfg: Any) -> ObjectStore | None:
    """Where dataset indexes live beside the runs: the storage prefix that holds every run
    (a cloud store), or a local run's parent folder. None when the run has no parent
    location."""
    from kubetune.config.loader import output_uri

    uri = output_uri(cfg)
    if is_remote(uri):
        loc = parse_uri(uri)
        if not loc.path:
            return None
        return open_store(split_uri(uri)[0], cfg.storage)
    parent = os.path.dirname(os.path.abspath(uri).rstrip("/"))
    if not parent:
        return None
    return open_store(parent, cfg.storage)


def previous_index(
    run_store: ObjectStore | None, shared: ObjectStore | None, source: Source
) -> DataIndex | None:
    """The run's stored index, or the one beside the runs, whichever was built from this
    very listing (`listing_digest`: the run's is read first, the other only if the run's
    does not match); else the run's merged over the other (either may be absent)."""
    own = load_index(run_store)
    if own is not None and own.digest and own.digest == listing_digest(source):
        return own
    other = load_index(shared, shared_index_key(source)) if shared is not None else None
    if other is not None and other.digest and other.digest == listing_digest(source):
        return other
    if own is None or other is None:
        return own or other
    return DataIndex({**other.entries, **own.entries})


@dataclass
class IndexResult:
    """The index of a source, the source with captions filled in, and what it cost."""

    index: DataIndex
    source: Source
    sizes_hw: list[tuple[int, int]]
    errors: list[DataError]
    reused: int
    scanned: int


def build_index(
    source: Source,
    previous: DataIndex | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    *,
    stream: SizeStream | None = None,
) -> IndexResult:
    """Index every example of `source` (bounded parallel header reads; entries of `previous`
    whose size and version still match are reused without any read; `previous` is taken
    whole when it was built from this very listing). Bad examples are returned in
    `errors`, not raised. ``stream``: header reads in its queue's order, each size handed
    to it as it is known ((0, 0) for a bad example)."""
    whole = _reused_whole(source, previous, max_pixels)
    if whole is not None:
        return whole
    results: list[tuple[IndexEntry | DataError, bool]] = []
    reads: list[tuple[int, IndexEntry | None]] = []
    for i in range(len(source)):  # reuse checks here: a pool task each would cost more
        old = _reusable(source, i, previous, max_pixels)
        results.append((old, True) if old is not None else (DataError(""), False))
        if old is None or source.records[i].mask_key is not None:
            reads.append((i, old))
        elif stream is not None:
            stream.on_size(i, (old.height, old.width))
    for (i, _), result in zip(reads, _read(source, reads, max_pixels, stream), strict=True):
        results[i] = result
    return _collect(source, results)


def _read(
    source: Source,
    reads: list[tuple[int, IndexEntry | None]],
    max_pixels: int,
    stream: SizeStream | None = None,
) -> list[tuple[IndexEntry | DataError, bool]]:
    """The entries of `reads` (example, reusable entry or None): images with nothing but a
    header to read (no mask, no caption file) on a store with `Capability.ASYNC_READS`
    through `header_sizes_async`, the others in the bounded thread pool."""
    records = source.records
    plain = [i for i, old in reads if old is None and _header_only(records[i])]
    done: dict[int, tuple[IndexEntry | DataError, bool]] = {}
    # a stream's queue is taken from by one reader: by the async one only if it reads all
    one_reader = stream is None or len(plain) == len(reads)
    if len(plain) > 1 and one_reader and reads_async(source, plain):
        streamed = {} if stream is None else {"order": stream.queue, "on_size": _told(stream)}
        sizes = header_sizes_async(source, plain, max_pixels, **streamed)  # type: ignore[arg-type]
        for i, size in zip(plain, sizes, strict=True):
            rec = records[i]
            done[i] = (
                size
                if isinstance(size, DataError)
                else IndexEntry(rec.size, rec.etag, *size, rec.caption, rec.caption_etag),
                False,
            )
    rest = {job[0]: job[1] for job in reads if job[0] not in done}
    order = list(rest) if stream is None else (i for i in stream.queue if i in rest)

    def entry(i: int) -> tuple[int, tuple[IndexEntry | DataError, bool]]:
        result = _entry(source, i, max_pixels, rest[i])
        if stream is not None:
            got = result[0]
            bad = isinstance(got, DataError)
            stream.on_size(i, (0, 0) if bad else (got.height, got.width))  # type: ignore[union-attr]
        return i, result

    done.update(bounded_map(entry, order))  # type: ignore[arg-type]  (iterated lazily)
    return [done[i] for i, _ in reads]


def _told(stream: SizeStream) -> Any:
    """``stream.on_size`` for `header_sizes_async`'s results (a DataError: size (0, 0))."""
    return lambda i, size: stream.on_size(i, (0, 0) if isinstance(size, DataError) else size)


def _header_only(rec: Record) -> bool:
    return rec.mask_key is None and rec.caption_key is None and rec.row is None


def _collect(source: Source, results: list[tuple[IndexEntry | DataError, bool]]) -> IndexResult:
    """The index (in record order, with the listing's digest when every example is good),
    the source with captions filled in and each example's size ((0, 0) when bad)."""
    keys: list[Key] = []
    rows: list[IndexEntry] = []
    errors: list[DataError] = []
    records = list(source.records)
    sizes: list[tuple[int, int]] = []
    reused = 0
    for i, (entry, was_reused) in enumerate(results):
        if isinstance(entry, DataError):
            errors.append(entry)
            sizes.append((0, 0))
            continue
        reused += was_reused
        rec = records[i]
        keys.append((source.store_uri(i), rec.image_key or rec.id))
        rows.append(entry)
        if rec.caption_key is not None or rec.caption != entry.caption:
            records[i] = evolve(rec, caption=entry.caption, caption_key=None)
        sizes.append((entry.height, entry.width))
    indexed = Source(source.name, records, source.stores, source.keep_in_memory, source.hf)
    index = (
        DataIndex(dict(zip(keys, rows, strict=True)))
        if errors
        else DataIndex.in_order(keys, rows, listing_digest(source))
    )
    scanned = len(records) - reused - len(errors)
    return IndexResult(index, indexed, sizes, errors, reused, scanned)


def _reused_whole(
    source: Source, previous: DataIndex | None, max_pixels: int
) -> IndexResult | None:
    """`previous` taken whole when it indexed this very listing (same digest, same order):
    sizes and caption files' text from its columns, no lookup per example. None when it
    cannot be (another listing, a mask to check, an image above `max_pixels`)."""
    columns = previous.columns if previous is not None else None
    if previous is None or columns is None or previous.digest != listing_digest(source):
        return None
    records = source.records
    heights, widths = columns["height"], columns["width"]
    if len(heights) != len(records) or any(r.mask_key is not None or not r.etag for r in records):
        return None
    if max(map(int.__mul__, heights, widths), default=0) > max_pixels:
        return None
    if any(r.caption_key is not None for r in records):  # caption files: the indexed text
        records = [
            evolve(r, caption=text, caption_key=None) if r.caption_key is not None else r
            for r, text in zip(records, columns["caption"], strict=True)
        ]
    indexed = Source(source.name, records, source.stores, source.keep_in_memory, source.hf)
    indexed._digest = source._digest
    sizes = list(zip(heights, widths, strict=True))
    return IndexResult(previous, indexed, sizes, [], len(records), 0)


def _entry(
    source: Source, i: int, max_pixels: int, old: IndexEntry | None
) -> tuple[IndexEntry | DataError, bool]:
    """Example `i`'s entry (`old` when reusable: only its mask, if any, is checked)."""
    entry = old or _image_entry(source, i, max_pixels)
    if isinstance(entry, IndexEntry) and source.records[i].mask_key is not None:
        try:
            check_mask_header(source, i, (entry.height, entry.width), max_pixels)
        except DataError as err:
            return err, False
    return entry, old is not None


def _reusable(
    source: Source, i: int, previous: DataIndex | None, max_pixels: int
) -> IndexEntry | None:
    """The previous index's entry for example `i` if its listing still matches (size and
    version of image and caption file)."""
    rec = source.records[i]
    if previous is None or not rec.etag:
        return None
    old = previous.entries.get((source.store_uri(i), rec.image_key or rec.id))
    if (
        old is None
        or (old.size, old.etag, old.caption_etag) != (rec.size, rec.etag, rec.caption_etag)
        or old.height * old.width > max_pixels
    ):
        return None
    # a caption file's text is versioned by its listing; an inline one (JSONL line, HF row)
    # is the current dataset's, whatever the run that indexed it had
    return old if rec.caption_key else evolve(old, caption=rec.caption)


def _image_entry(source: Source, i: int, max_pixels: int) -> IndexEntry | DataError:
    rec = source.records[i]
    try:
        height, width = header_size_hw(source, i, max_pixels)
        caption = source.caption(i)
    except DataError as err:
        return err
    return IndexEntry(rec.size, rec.etag, height, width, caption, rec.caption_etag)
