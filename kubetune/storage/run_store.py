"""``RunStore``: the one store every write of a run goes through, and the one retry layer.

It wraps the run's ``ObjectStore`` and, for each write and delete, first checks the run lease
(a runner that lost it writes nothing more) and then retries transient failures
(``StorageError``) under its ``RetryPolicy``. Reads pass through with the same retries.

Retry layers, in full: this ``RetryPolicy`` (whole operations, jittered backoff) is the only
policy in kubetune; nothing above it (the checkpoint publisher, progress, validation, the
report) retries. Below it, a cloud store (``kubetune.storage.cloud.CloudStore``) keeps
obstore's transport retries, configured once per store (``max_attempts`` per HTTP request:
connection errors, 5xx, throttling, a body cut mid-download); a ``LocalStore`` has none. So a
single-request cloud write makes at most ``RetryPolicy.attempts × max_attempts`` HTTP
requests (5 × 5 by default).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from kubetune.errors import StorageError
from kubetune.humanize import count
from kubetune.storage.base import ObjectInfo, ObjectStore, StoreBase

log = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transient storage failure is retried."""

    attempts: int = 5
    """Calls in all (1 = no retry)."""
    backoff_s: float = 0.5
    """Upper bound of the first delay; doubles per retry (full jitter)."""
    backoff_max_s: float = 10.0
    """Cap on any one delay."""

    def delays(self) -> Iterator[float]:
        """``attempts - 1`` jittered exponential delays."""
        for i in range(self.attempts - 1):
            yield random.uniform(0, min(self.backoff_max_s, self.backoff_s * 2**i))

    def call(self, fn: Callable[[], _T], what: str = "storage request") -> _T:
        """``fn()``, retried on ``StorageError`` (transient; permanent errors are other types)."""
        delays = self.delays()
        while True:
            try:
                return fn()
            except StorageError as exc:
                delay = next(delays, None)
                if delay is None:
                    raise
                log.warning("storage: %s failed (%s); retrying in %.1fs", what, exc, delay)
                time.sleep(delay)


class RunStore(StoreBase):
    """An ``ObjectStore`` with a write guard (the lease check) and the one retry policy. It
    declares no optional capability: conditional writes and presigning go to the raw store."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        guard: Callable[[], None] | None = None,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen, shared safely
    ) -> None:
        self.inner, self.guard, self.uri, self.retry = store, guard, store.uri, retry
        self.page_size = getattr(store, "page_size", StoreBase.page_size)

    def _write(self, fn: Callable[[], None], what: str) -> None:
        if self.guard is not None:
            self.guard()
        self.retry.call(fn, what)

    def url(self, key: str) -> str:
        return self.inner.url(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(lambda: self.inner.put_bytes(key, data), f"write {key}")

    def put_file(self, key: str, path: str | Path) -> None:
        self._write(lambda: self.inner.put_file(key, path), f"upload {key}")

    def delete(self, keys: Iterable[str]) -> None:
        doomed = list(keys)
        self._write(lambda: self.inner.delete(doomed), f"delete {count(len(doomed), 'object')}")

    def get_bytes(self, key: str) -> bytes:
        return self.retry.call(lambda: self.inner.get_bytes(key), f"read {key}")

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self.retry.call(lambda: self.inner.get_range(key, start, length), f"read {key}")

    def get_file(self, key: str, path: str | Path) -> None:
        self.retry.call(lambda: self.inner.get_file(key, path), f"download {key}")

    def exists(self, key: str) -> bool:
        return bool(self.retry.call(lambda: self.inner.exists(key), f"check {key}"))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Listed in full inside the retry, so a failure midway is retried from the start."""
        objects = self.retry.call(lambda: list(self.inner.list(prefix)), f"list {prefix!r}")
        return iter(objects)
