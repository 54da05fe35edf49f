"""Image sizes from their headers, without downloading the images: one ranged read per image
(more only for a long header), either from a bounded thread pool or, on stores with
`Capability.ASYNC_READS`, awaited `HEADERS_IN_FLIGHT` at a time from one event loop
(`header_sizes_async`). No torch here."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from kubetune.dataset.images import image_size_hw, jpeg_header_length
from kubetune.dataset.sources import Source, fetch_pool
from kubetune.errors import DataError
from kubetune.storage import Capability, supports

HEADER_BYTES = 16 * 1024
"""First ranged read per image: PNG/WEBP/BMP headers and a JPEG's SOF without a large EXIF
block fit in it."""
LONG_HEADER_BYTES = 256 * 1024
"""How much more to read when a header does not fit and its length cannot be told from the
JPEG markers (and the first read of a mask)."""
HEADER_SLACK = 4 * 1024
"""Read this far past a JPEG segment boundary, so the small segments that follow a long
EXIF block (tables, frame, scan header) come in the same read."""
MAX_HEADER_READS = 4
"""Ranged reads of one image's header before the whole file is read instead."""
HEADERS_IN_FLIGHT = 128
"""First header reads awaited at once by `header_sizes_async` (one thread, one event loop;
the threads of `fetch_pool` keep `FETCH_WORKERS` in flight)."""

Size = tuple[int, int]


def check_mask_header(source: Source, i: int, image_hw: Size, max_pixels: int) -> None:
    """`use_masks`: the mask is a readable image of its image's size (from its header)."""
    mask = source.mask_head(i, LONG_HEADER_BYTES)
    try:
        height, width = image_size_hw(mask.data, mask.name, max_pixels)
    except DataError as err:
        if len(mask.data) < LONG_HEADER_BYTES or _final(err):
            raise
        full = source.fetch(i).mask
        assert full is not None
        height, width = image_size_hw(full.data, full.name, max_pixels)
    if (height, width) != image_hw:
        raise DataError(
            f"{mask.name}: is {width}x{height} but its image is {image_hw[1]}x{image_hw[0]}",
            hint="save the mask at its image's size",
        )


def header_size_hw(source: Source, i: int, max_pixels: int, first: bytes | None = None) -> Size:
    """(h, w) of example `i` from its header: one ranged read of `HEADER_BYTES` (or `first`,
    that read already made); when the header is longer (a camera JPEG's EXIF), a read of the
    rest of it only, sized from the JPEG's segment lengths (`LONG_HEADER_BYTES` more for
    other formats), at most `MAX_HEADER_READS` reads in all; the whole file as a last
    resort. Format, pixel limit and EXIF orientation are checked."""
    rec, name = source.records[i], source.url(i)
    data = source.head(i, HEADER_BYTES) if first is None else first
    whole = len(data) != HEADER_BYTES or rec.row is not None  # EOF, or no ranged reads
    for _ in range(MAX_HEADER_READS):
        try:
            return image_size_hw(data, name, max_pixels)
        except DataError as err:
            final = whole or 0 <= rec.size <= len(data)
            if final or _final(err):
                raise
        need = jpeg_header_length(data)
        end = need + HEADER_SLACK if need and need > len(data) else len(data) + LONG_HEADER_BYTES
        more = source.head(i, end - len(data), start=len(data))
        whole = len(more) != end - len(data)
        data += more
    return image_size_hw(source.fetch(i).data, name, max_pixels)


def _final(err: DataError) -> bool:
    """A header that parsed and tells a size above the limit or a format kubetune refuses:
    read no further (a decompression bomb's body is never downloaded)."""
    return "decompression-bomb" in err.message or "unsupported" in err.message


def reads_async(source: Source, indices: Sequence[int]) -> bool:
    """Whether the images `indices` can be read by `header_sizes_async`: each in a store
    with `Capability.ASYNC_READS` (not an HF row)."""
    records = source.records
    stores = {records[i].store for i in indices if records[i].row is None}
    if len(stores) != len({records[i].store for i in indices}) or not stores:
        return False
    return all(supports(source.stores[s].get(), Capability.ASYNC_READS) for s in stores)


def header_sizes_async(
    source: Source,
    indices: Sequence[int],
    max_pixels: int,
    in_flight: int = HEADERS_IN_FLIGHT,
    *,
    order: Iterable[int] | None = None,
    on_size: Callable[[int, Size | DataError], None] | None = None,
) -> list[Size | DataError]:
    """`header_size_hw` of every example in `indices` (their errors returned, not raised):
    the first read of each awaited `in_flight` at a time on an event loop of its own
    thread; a header longer than that read continues in `fetch_pool`. Another error (the
    store failing) is raised. ``order``: the examples in the order to read them (a
    `ReadQueue` may change it meanwhile; those not in `indices` are passed over);
    ``on_size``: called with each result as it comes."""
    out: list[Any] = [None] * len(indices)
    failed: list[BaseException] = []
    if order is None:
        jobs: Iterable[tuple[int, int]] = enumerate(indices)
    else:
        where = {i: k for k, i in enumerate(indices)}
        jobs = ((where[i], i) for i in order if i in where)

    def run() -> None:
        try:
            asyncio.run(_read_all(source, iter(jobs), max_pixels, out, in_flight, on_size))
        except BaseException as err:  # noqa: BLE001 - raised in the caller below
            failed.append(err)

    thread = threading.Thread(target=run, name="kubetune-headers")
    thread.start()  # its own thread: the caller may be inside an event loop already
    thread.join()
    if failed:
        raise failed[0]
    return out


async def _read_all(
    source: Source,
    jobs: Iterator[tuple[int, int]],
    max_pixels: int,
    out: list[Any],
    in_flight: int,
    on_size: Callable[[int, Size | DataError], None] | None,
) -> None:
    """Fill ``out[k]`` for each (k, example) of ``jobs`` (shared by the workers: one loop
    thread, so taking the next job needs no lock of its own)."""

    async def worker() -> None:
        for k, i in jobs:
            out[k] = await _size_async(source, i, max_pixels)
            if on_size is not None:
                on_size(i, out[k])

    await asyncio.gather(*(worker() for _ in range(max(1, min(in_flight, len(out))))))


async def _size_async(source: Source, i: int, max_pixels: int) -> Size | DataError:
    """Example `i`'s size from one awaited read, or from more reads in `fetch_pool` when
    its header is longer; its DataError if it is bad."""
    try:
        first = await source.head_async(i, HEADER_BYTES)
        try:
            return image_size_hw(first, source.url(i), max_pixels)
        except DataError as err:
            if len(first) != HEADER_BYTES or _final(err):
                raise
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            fetch_pool(), header_size_hw, source, i, max_pixels, first
        )
    except DataError as err:
        return err
