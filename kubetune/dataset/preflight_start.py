"""`start_preflight`: a run's preflight started in the background (a forked process, or a
thread), so the listing and header reads overlap the imports and model loading."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

from kubetune.dataset.buckets import scan_order
from kubetune.dataset.preflight import PreflightReport, run_preflight
from kubetune.dataset.preflight_fork import forked
from kubetune.dataset.preflight_replies import Replies
from kubetune.dataset.size_feed import ReadQueue, SizeStream


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
        return forked(cfg)
    future: Future[PreflightReport] = Future()
    future.set_running_or_notify_cancel()
    replies = Replies(future)

    def listed(report: PreflightReport) -> SizeStream | None:
        n, queue = report.num_examples, ReadQueue(range(report.num_examples))
        feed = replies.listed(report, lambda seed, epoch: queue.reorder(scan_order(n, seed, epoch)))
        return None if feed is None else SizeStream(queue, lambda i, hw: feed.put([(i, *hw)]))

    def work() -> None:
        try:
            report = run_preflight(cfg, listed)
            replies.final("ok", report)
        except BaseException as err:  # noqa: BLE001 - handed to the caller by .result()
            replies.final("error", err)

    threading.Thread(target=work, name="kubetune-preflight", daemon=True).start()
    return future


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
