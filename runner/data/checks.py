"""Checks before step 1 without downloading the dataset (`preflight`: listing, captions and
image headers through the dataset index), and the full decode of every example that
`launcher validate --data` runs from a laptop or CI (`verify_data`). No torch here."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from runner.config.data import DreamboothSDDataLoaderConfig
from runner.data.captions import needs_captions
from runner.data.dreambooth import dreambooth_source
from runner.data.images import MAX_IMAGE_PIXELS, decode_image, decode_mask
from runner.data.index import DataIndex, build_index, previous_index
from runner.data.sources import Source, build_source, fetch_pool
from runner.errors import DataError
from runner.storage import ObjectStore


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
    loader_cfg = cfg.data_loader
    need = needs_captions(loader_cfg)
    dreambooth = None
    if isinstance(loader_cfg, DreamboothSDDataLoaderConfig):
        dreambooth = dreambooth_source(loader_cfg, cfg.storage)
        source = dreambooth.source
    else:
        source = build_source(
            loader_cfg.dataset,
            cfg.storage,
            need_captions=need,
            need_masks=cfg.use_masks,
        )
    result = build_index(source, previous_index(run_store, shared_store, source), max_pixels)
    errors = list(result.errors)
    if need:
        missing = [r for r in result.source.records if r.caption is None]
        errors += [DataError(f"{r.id}: no caption") for r in missing]
    raise_first(errors, "bad examples")
    return PreflightReport(
        len(source),
        result.sizes_hw,
        result.source,
        result.index,
        result.reused,
        result.scanned,
        dreambooth.num_instance if dreambooth else None,
        dreambooth.loss_weights if dreambooth else None,
    )


def start_preflight(cfg: Any, *, process: bool = True) -> Future[PreflightReport]:
    """A run's `preflight` (with the index stored with the run and the one beside the runs)
    started in the background: `python -m runner` starts it before importing torch, so the
    listing and header reads overlap the imports. In a forked process by default (the
    imports and the header reads then use two cores instead of sharing one interpreter
    lock), else a thread. `.result()` returns the report or re-raises; nothing is written."""
    fork = process and "fork" in multiprocessing.get_all_start_methods()
    if fork:
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
        future = pool.submit(_run_preflight, cfg)
        pool.shutdown(wait=False)  # the worker exits once it has handed the report over
        return future
    future: Future[PreflightReport] = Future()

    def work() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(_run_preflight(cfg))
        except BaseException as err:  # noqa: BLE001 - handed to the caller by .result()
            future.set_exception(err)

    threading.Thread(target=work, name="kubetune-preflight", daemon=True).start()
    return future


def _run_preflight(cfg: Any) -> PreflightReport:
    from runner.config.loader import output_uri
    from runner.data.index import shared_index_store
    from runner.run_store import RunStore
    from runner.storage import open_store

    run_store = RunStore(open_store(output_uri(cfg), cfg.storage))
    return preflight(cfg, run_store=run_store, shared_store=shared_index_store(cfg))


def raise_first(errors: list[DataError], what: str) -> None:
    """Raise the first error, saying how many more there are."""
    if errors:
        more = f" (and {len(errors) - 1} more {what})" if len(errors) > 1 else ""
        raise DataError(f"{errors[0].message}{more}", hint=errors[0].hint)


def verify_data(
    cfg: Any,
    max_pixels: int = MAX_IMAGE_PIXELS,
    on_progress: Callable[[int, int], None] | None = None,
) -> PreflightReport:
    """`preflight`, then download and fully decode every example (bounded parallel); raise
    DataError naming the first undecodable file and how many more are bad. `on_progress`
    is called (in this thread) with (examples checked, total) after each example."""
    report = preflight(cfg, max_pixels)
    source = report.source
    assert source is not None

    def check(index: int) -> DataError | None:
        try:
            raw = source.fetch(index)
            decode_image(raw.data, raw.id, max_pixels)
            if raw.mask is not None:
                decode_mask(raw.mask.data, raw.mask.name, max_pixels)
            return None
        except DataError as err:
            return err

    bad: list[DataError] = []
    for done, err in enumerate(fetch_pool().map(check, range(len(source))), start=1):
        if err is not None:
            bad.append(err)
        if on_progress is not None:
            on_progress(done, len(source))
    raise_first(bad, "bad examples")
    return report
