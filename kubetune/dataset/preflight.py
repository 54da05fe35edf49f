"""Checks before step 1 without downloading the dataset (`preflight`: listing, captions and
image headers through the dataset index), and the full decode of every example that
`launcher validate --data` runs from a laptop or CI (`verify_data`). No torch here."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

from kubetune.config.data import DreamboothSDDataLoaderConfig
from kubetune.dataset.buckets import scan_order
from kubetune.dataset.captions import needs_captions
from kubetune.dataset.dreambooth import DreamBoothData, dreambooth_source
from kubetune.dataset.images import MAX_IMAGE_PIXELS, decode_image, decode_mask
from kubetune.dataset.index import DataIndex, build_index, previous_index
from kubetune.dataset.size_feed import ReadQueue, Size, SizeFeed, SizeItem, SizeStream
from kubetune.dataset.sources import Source, build_source, fetch_pool
from kubetune.errors import BadExamples, DataError, KubetuneError
from kubetune.storage import ObjectStore

DEFERRED_CHECKS_MIN_EXAMPLES = 10_000
"""Above this many examples, a run whose config needs no image size before step 1 (no
aspect-ratio buckets, no `keep_in_memory`) starts training once the dataset is listed, while
the header checks go on beside it (`PreflightReport.pending`). Below it the checks take a few
seconds, hidden by the model loading, and a bad image still fails the run before any write."""


@dataclass(frozen=True)
class PreflightReport:
    """The checked dataset: its size, every image's (h, w), the index to store with the run
    and the source (captions filled in) the loader uses, so nothing is listed twice."""

    num_examples: int
    sizes_hw: list[tuple[int, int]]
    source: Source | None = field(default=None, repr=False, compare=False)
    index: DataIndex | None = field(default=None, repr=False, compare=False)
    reused: int = 0
    scanned: int = 0
    num_instance: int | None = None
    """DreamBooth: how many of the examples (the first ones) are instance images."""
    loss_weights: list[float] | None = field(default=None, repr=False)
    """DreamBooth: each example's loss weight."""
    pending: Future[PreflightReport] | None = field(default=None, repr=False, compare=False)
    """Header checks still running (`DEFERRED_CHECKS_MIN_EXAMPLES`): this report is the
    listing's (`sizes_hw` empty, no index) and `pending` gives the checked one or raises
    the DataError naming the first bad example, as `preflight` would have."""
    streamed: bool = False
    """The checks beside training stream each size as they read it, in the order the
    sampler asks for (`aspect_ratio_buckets.order: streaming`)."""
    feed: SizeFeed | None = field(default=None, repr=False, compare=False)
    """Where those sizes arrive in the run (set by the run's side, with `pending`)."""


def preflight(
    cfg: Any,
    max_pixels: int = MAX_IMAGE_PIXELS,
    *,
    run_store: ObjectStore | None = None,
    shared_store: ObjectStore | None = None,
) -> PreflightReport:
    """Check the dataset from its listing and image headers (one ranged read per image not
    already in the index stored in `run_store` or beside the runs in `shared_store`); raise
    DataError naming the first bad file or line and how many more are bad. Bounded parallel
    reads; never hangs."""
    report, errors = _header_checks(cfg, max_pixels, run_store, shared_store)
    raise_first(errors, "bad examples")
    return report


def check_headers(
    cfg: Any, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[PreflightReport, list[DataError]]:
    """`preflight` without raising for bad examples: the report and every bad example (a bad
    image's size is (0, 0)); a dataset that cannot be listed still raises. No image is read
    whole: listings and header reads only (`launcher ui`'s dataset preview)."""
    return _header_checks(cfg, max_pixels)


Listed = tuple[Source, DreamBoothData | None]


CHECKS_NICENESS = 10
"""How much the forked preflight lowers its CPU priority once training has its listed
report: the header checks beside training must not slow the steps down."""


def list_dataset(cfg: Any) -> Listed:
    """The run's dataset listed (no image read; DataError for a missing file or a bad line),
    with its DreamBooth parts."""
    loader_cfg = cfg.data_loader
    if isinstance(loader_cfg, DreamboothSDDataLoaderConfig):
        dreambooth = dreambooth_source(loader_cfg, cfg.storage)
        return dreambooth.source, dreambooth
    source = build_source(
        loader_cfg.dataset,
        cfg.storage,
        need_captions=needs_captions(loader_cfg),
        need_masks=cfg.use_masks,
    )
    return source, None


def sizes_needed(loader_cfg: Any) -> bool:
    """Whether step 1 needs every image's size: aspect-ratio buckets in invoke-training's
    order (the batches are planned from them) or images kept in memory (slots sized from
    them). The streaming order needs only the sizes it has taken (`streams_sizes`)."""
    if loader_cfg.aspect_ratio_buckets is not None and not streams_sizes(loader_cfg):
        return True
    if isinstance(loader_cfg, DreamboothSDDataLoaderConfig):
        parts = [loader_cfg.instance_dataset, loader_cfg.class_dataset]
    else:
        parts = [loader_cfg.dataset]
    return any(getattr(part, "keep_in_memory", False) for part in parts if part is not None)


def streams_sizes(loader_cfg: Any) -> bool:
    """Whether the sampler takes the sizes as they are read (`order: streaming`)."""
    buckets = loader_cfg.aspect_ratio_buckets
    return buckets is not None and buckets.order == "streaming"


def checks_deferred(cfg: Any, source: Source) -> bool:
    """Whether the run starts before its header checks end (see `DEFERRED_CHECKS_MIN_EXAMPLES`)."""
    return len(source) > DEFERRED_CHECKS_MIN_EXAMPLES and not sizes_needed(cfg.data_loader)


def listed_report(listed: Listed, streamed: bool = False) -> PreflightReport:
    """The report of a dataset listed but not checked yet (no sizes, no index)."""
    source, dreambooth = listed
    return PreflightReport(
        len(source),
        [],
        source,
        num_instance=dreambooth.num_instance if dreambooth else None,
        loss_weights=dreambooth.loss_weights if dreambooth else None,
        streamed=streamed,
    )


def _header_checks(
    cfg: Any,
    max_pixels: int,
    run_store: ObjectStore | None = None,
    shared_store: ObjectStore | None = None,
    listed: Listed | None = None,
    stream: SizeStream | None = None,
) -> tuple[PreflightReport, list[DataError]]:
    """`preflight`'s report and every bad example it found (a bad image's size is (0, 0));
    a dataset that cannot be listed at all raises. ``stream``: see `build_index`."""
    source, dreambooth = listed or list_dataset(cfg)
    previous = previous_index(run_store, shared_store, source)
    result = build_index(source, previous, max_pixels, stream=stream)
    errors = list(result.errors)
    if needs_captions(cfg.data_loader):  # (an image already reported: not a second problem)
        records = zip(result.source.records, result.sizes_hw, strict=True)
        missing = [r for r, hw in records if r.caption is None and hw != (0, 0)]
        errors += [DataError(f"{r.id}: no caption") for r in missing]
    report = PreflightReport(
        len(source),
        result.sizes_hw,
        result.source,
        result.index,
        result.reused,
        result.scanned,
        dreambooth.num_instance if dreambooth else None,
        dreambooth.loss_weights if dreambooth else None,
    )
    return report, errors


def start_preflight(cfg: Any, *, process: bool = True) -> Future[PreflightReport]:
    """A run's `preflight` (with the index stored with the run and the one beside the runs)
    started in the background: `python -m runner` starts it before importing torch, so the
    listing and header reads overlap the imports. In a forked process by default (the
    imports and the header reads then use two cores instead of sharing one interpreter
    lock), else a thread: also when the preflight reads a cloud store and this process has
    opened one already (`kubetune.storage.fork_safe`). `.result()` returns the report or
    re-raises; nothing is written. When the checks are deferred (`checks_deferred`) it
    returns the listed report as soon as the listing is done, its `pending` the rest."""
    from kubetune.storage import fork_safe

    forkable = fork_safe() or not uses_cloud_storage(cfg)
    if process and forkable and "fork" in multiprocessing.get_all_start_methods():
        return _forked(cfg)
    future: Future[PreflightReport] = Future()
    future.set_running_or_notify_cancel()
    replies = _Replies(future)

    def listed(report: PreflightReport) -> SizeStream | None:
        n, queue = report.num_examples, ReadQueue(range(report.num_examples))
        feed = replies.listed(report, lambda seed, epoch: queue.reorder(scan_order(n, seed, epoch)))
        return None if feed is None else SizeStream(queue, lambda i, hw: feed.put([(i, *hw)]))

    def work() -> None:
        try:
            report = _run_preflight(cfg, listed)
            replies.final("ok", report)
        except BaseException as err:  # noqa: BLE001 - handed to the caller by .result()
            replies.final("error", err)

    threading.Thread(target=work, name="kubetune-preflight", daemon=True).start()
    return future


class _Replies:
    """Hands a preflight's replies to its future: the listed report first when the checks
    are deferred (then the final reply resolves its `pending`), else the final one alone;
    streamed sizes in between go to the listed report's `feed`."""

    def __init__(
        self, future: Future[PreflightReport], on_want: Callable[[int, int], None] | None = None
    ) -> None:
        self.future, self.on_want = future, on_want
        self.pending: Future[PreflightReport] | None = None
        self.listed_source: Source | None = None
        self.feed: SizeFeed | None = None

    def listed(
        self, report: PreflightReport, on_want: Callable[[int, int], None] | None = None
    ) -> SizeFeed | None:
        """Resolve the future with the listed report; its feed (if the sizes are streamed)
        forwards a wanted order to `on_want` (else to this reply's)."""
        self.pending = Future()
        self.pending.set_running_or_notify_cancel()
        self.listed_source = report.source
        if report.streamed:
            self.feed = SizeFeed(report.num_examples, on_want or self.on_want)
        self.future.set_result(replace(report, pending=self.pending, feed=self.feed))
        return self.feed

    def sizes(self, items: list[SizeItem]) -> None:
        if self.feed is not None:
            self.feed.put(items)

    def final(self, kind: str, value: Any) -> None:
        target = self.pending or self.future
        if kind != "ok":
            if self.feed is not None:
                self.feed.fail(value)
            target.set_exception(value)
            return
        if self.feed is not None:
            self.feed.fill(value.sizes_hw)
        if self.pending is not None and value.source is None:  # sent without its records
            target.set_result(replace(value, source=self.listed_source))
        else:
            target.set_result(value)


def uses_cloud_storage(cfg: Any) -> bool:
    """Whether the run reads or writes a cloud store (its outputs, or any path in its config)."""
    from kubetune.config import config_to_dict, output_uri
    from kubetune.storage import is_remote

    def strings(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)

    return is_remote(output_uri(cfg)) or any(map(is_remote, strings(config_to_dict(cfg))))


def _forked(cfg: Any) -> Future[PreflightReport]:
    """`_run_preflight` in a forked daemon process whose replies (the listed report when the
    checks are deferred, then the report or exception) come back through a pipe. The first
    is read by the thread that asks for the result (`_ReadOnDemand`), so unpickling 100,000
    records does not take the interpreter lock from the imports and model loading it
    overlaps; the child waits to hand it over. Not a `ProcessPoolExecutor`: a worker that
    dies surfaces there as `BrokenProcessPool` (a traceback, not one line), and its exit hook
    writes to the manager thread's wake-up pipe without the lock under which that thread
    closes it (Python 3.11); nothing of it is needed here."""
    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    orders_in, orders = ctx.Pipe(duplex=False)  # (seed, epoch) of a wanted order, to the child
    child = ctx.Process(
        target=_preflight_child,
        args=(cfg, writer, os.getpid(), orders_in),
        name="kubetune-preflight",
        daemon=True,
    )
    child.start()  # before any thread of ours exists: the fork copies no held lock
    writer.close()
    orders_in.close()

    sending = threading.Lock()  # a want (sampler's thread) never meets the close (reply's)

    def want(seed: int, epoch: int) -> None:
        with sending, contextlib.suppress(OSError, ValueError):  # ended: nothing to reorder
            if not orders.closed:
                orders.send((seed, epoch))

    def final(replies: _Replies, kind: str, value: Any) -> None:
        reader.close()
        with sending:
            orders.close()
        child.join()
        replies.final(kind, value)

    def rest(replies: _Replies) -> None:
        while (reply := _receive(reader, child))[0] == "sizes":
            replies.sizes(reply[1])
        final(replies, *reply)

    def read_first(replies: _Replies, timeout: float | None) -> None:
        if not reader.poll(timeout):
            raise TimeoutError("the data preflight has not replied yet")
        kind, value = _receive(reader, child)
        if kind != "listed":
            return final(replies, kind, value)
        replies.listed(value)
        threading.Thread(  # the checks beside training: their reply comes when it comes
            target=rest, args=(replies,), name="kubetune-preflight-reply", daemon=True
        ).start()

    return _ReadOnDemand(read_first, want)


class _ReadOnDemand(Future):  # type: ignore[type-arg]
    """A future whose reply is read by the first caller of `result` / `exception`."""

    def __init__(
        self,
        read: Callable[[_Replies, float | None], None],
        on_want: Callable[[int, int], None] | None = None,
    ) -> None:
        super().__init__()
        self.set_running_or_notify_cancel()
        self._read, self._replies = read, _Replies(self, on_want)
        self._reading = threading.Lock()

    def _ensure(self, timeout: float | None) -> None:
        with self._reading:
            if not self.done():
                self._read(self._replies, timeout)

    def result(self, timeout: float | None = None) -> Any:
        self._ensure(timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._ensure(timeout)
        return super().exception(timeout)


def _receive(reader: Connection, child: Any) -> tuple[str, Any]:
    """The child's next reply; an error if it died first or sent what does not unpickle."""
    try:
        kind, value = reader.recv()
        return kind, value
    except Exception as err:  # noqa: BLE001 - no reply (killed, out of memory): the caller
        # must not wait forever
        child.join()
        return "error", KubetuneError(
            f"the data preflight process gave no result (exit code {child.exitcode}: "
            f"{type(err).__name__})"
        )


def _preflight_child(cfg: Any, writer: Connection, parent: int, orders: Connection) -> None:
    """The forked process: send ("listed", report) when the checks are deferred, then
    ("sizes", [(example, h, w), ...]) as they are read if they are streamed, then
    ("ok", report) (without its records, sent already) or ("error", exception); exit."""
    _die_with_parent(parent)
    sent: list[bool] = []

    def listed(report: PreflightReport) -> SizeStream | None:
        writer.send(("listed", report))
        sent.append(True)
        with contextlib.suppress(OSError):  # the checks now run beside training: yield to it
            os.nice(CHECKS_NICENESS)
        return _piped_stream(report.num_examples, writer, orders) if report.streamed else None

    try:
        report = _run_preflight(cfg, listed)
        reply: tuple[str, Any] = ("ok", replace(report, source=None) if sent else report)
    except BaseException as err:  # noqa: BLE001 - handed to the parent
        reply = ("error", err)
    try:
        writer.send(reply)
    except Exception as err:  # noqa: BLE001 - an exception that does not pickle
        writer.send(("error", KubetuneError(f"data preflight failed: {reply[1]!r} ({err})")))
    writer.close()


def _die_with_parent(parent: int) -> None:
    """Linux: this process is killed when the thread that forked it (the run's main thread)
    dies, SIGKILL included, instead of reading headers for nobody (checks beside training
    outlive step 1); exit at once if that already happened."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


SIZES_PER_MESSAGE = 512
"""Streamed sizes sent to the run at once (or fewer, after `SIZES_EVERY_S`)."""
SIZES_EVERY_S = 0.05


def _piped_stream(n: int, writer: Connection, orders: Connection) -> SizeStream:
    """The forked checks' stream: sizes sent to the run in small messages; the orders the
    run wants (seed, epoch) reorder the reads, received by a thread of this process."""
    queue, lock = ReadQueue(range(n)), threading.Lock()
    batch: list[SizeItem] = []
    last = [time.monotonic()]

    def send() -> None:
        if batch:
            writer.send(("sizes", list(batch)))
            batch.clear()
        last[0] = time.monotonic()

    def on_size(i: int, hw: Size) -> None:
        with lock:
            batch.append((i, *hw))
            if len(batch) >= SIZES_PER_MESSAGE or time.monotonic() - last[0] > SIZES_EVERY_S:
                send()

    def flush() -> None:
        with lock:
            send()

    def listen() -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                seed, epoch = orders.recv()
                queue.reorder(scan_order(n, seed, epoch))

    threading.Thread(target=listen, name="kubetune-preflight-orders", daemon=True).start()
    return SizeStream(queue, on_size, flush)


def _run_preflight(
    cfg: Any, on_listed: Callable[[PreflightReport], SizeStream | None] | None = None
) -> PreflightReport:
    """The run's preflight; `on_listed` gets the listed report first if the checks are
    deferred (`checks_deferred`), and returns where to stream the sizes if they are."""
    from kubetune.config.loader import output_uri
    from kubetune.dataset.index import shared_index_store
    from kubetune.storage import open_store
    from kubetune.storage.run_store import RunStore

    listed = list_dataset(cfg)
    stream = None
    if on_listed is not None and checks_deferred(cfg, listed[0]):
        stream = on_listed(listed_report(listed, streams_sizes(cfg.data_loader)))
    run_store = RunStore(open_store(output_uri(cfg), cfg.storage))
    shared = shared_index_store(cfg)
    report, errors = _header_checks(cfg, MAX_IMAGE_PIXELS, run_store, shared, listed, stream)
    if stream is not None:
        stream.flush()
    raise_first(errors, "bad examples")
    return report


def raise_first(errors: list[DataError], what: str) -> None:
    """Raise the first error, saying how many more there are (`BadExamples` lists them)."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        first, more = errors[0], f" (and {len(errors) - 1} more {what})"
        raise BadExamples([str(e) for e in errors], f"{first.message}{more}", first.hint)


def verify_data(
    cfg: Any,
    max_pixels: int = MAX_IMAGE_PIXELS,
    on_progress: Callable[[int, int], None] | None = None,
) -> PreflightReport:
    """`preflight`'s checks, then download and fully decode every example whose header
    passed (bounded parallel); raise DataError naming the first bad example and how many
    more are bad (`BadExamples.problems`: every one, header and decode problems alike).
    `on_progress` is called (in this thread) with (examples checked, total)."""
    report, bad = _header_checks(cfg, max_pixels)
    source = report.source
    assert source is not None
    total = len(source)

    def check(index: int) -> DataError | None:
        if report.sizes_hw[index] == (0, 0):  # its header already failed
            return None
        try:
            raw = source.fetch(index)
            decode_image(raw.data, source.url(index), max_pixels)
            if raw.mask is not None:
                decode_mask(raw.mask.data, raw.mask.name, max_pixels)
            return None
        except DataError as err:
            return err

    for done, err in enumerate(fetch_pool().map(check, range(total)), start=1):
        if err is not None:
            bad.append(err)
        if on_progress is not None:
            on_progress(done, total)
    raise_first(bad, "bad examples")
    return report
