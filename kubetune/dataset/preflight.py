"""Checks before step 1 without downloading the dataset (`preflight`: listing, captions and
image headers through the dataset index), and the full decode of every example that
`launcher validate --data` runs from a laptop or CI (`verify_data`). No torch here.

The run starts its preflight in the background with `start_preflight`
(`kubetune.dataset.preflight_start`: a thread, or a forked process in
`kubetune.dataset.preflight_fork`, replying through `kubetune.dataset.preflight_replies`);
those names are importable from here too."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from kubetune.config.data import DreamboothSDDataLoaderConfig
from kubetune.dataset.captions import needs_captions
from kubetune.dataset.dreambooth import DreamBoothData, dreambooth_source
from kubetune.dataset.images import MAX_IMAGE_PIXELS, decode_image, decode_mask
from kubetune.dataset.index import DataIndex, build_index, previous_index
from kubetune.dataset.size_feed import SizeFeed, SizeStream
from kubetune.dataset.sources import Source, build_source, fetch_pool
from kubetune.errors import BadExamples, DataError
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


def run_preflight(
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


_MOVED = {
    "start_preflight": "kubetune.dataset.preflight_start",
    "uses_cloud_storage": "kubetune.dataset.preflight_start",
    "CHECKS_NICENESS": "kubetune.dataset.preflight_fork",
    "SIZES_PER_MESSAGE": "kubetune.dataset.preflight_fork",
    "SIZES_EVERY_S": "kubetune.dataset.preflight_fork",
}
"""Names importable from here whose modules import this one (so they load on first use)."""


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
