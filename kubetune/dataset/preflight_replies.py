"""How a preflight running in the background hands its replies to the run's future: the
listed report first when the checks are deferred, streamed sizes, then the checked report
(`Replies`); a future whose reply is read by the thread that asks for it (`ReadOnDemand`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

from kubetune.dataset.preflight import PreflightReport
from kubetune.dataset.size_feed import SizeFeed, SizeItem
from kubetune.dataset.sources import Source


class Replies:
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


class ReadOnDemand(Future):  # type: ignore[type-arg]
    """A future whose reply is read by the first caller of `result` / `exception`."""

    def __init__(
        self,
        read: Callable[[Replies, float | None], None],
        on_want: Callable[[int, int], None] | None = None,
    ) -> None:
        super().__init__()
        self.set_running_or_notify_cancel()
        self._read, self._replies = read, Replies(self, on_want)
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
