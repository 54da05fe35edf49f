"""``RunStore``: the one store every write of a run goes through.

It wraps the run's ``ObjectStore`` and, for each write and delete, first checks the run lease
(a runner that lost it writes nothing more) and then retries transient failures
(``StorageError``) with jittered backoff. Reads pass through with the same retries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from runner.storage import ObjectInfo, ObjectStore, retry_transient

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class RunStore:
    """An ``ObjectStore`` with a write guard (the lease check) and one retry policy."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        guard: Callable[[], None] | None = None,
        attempts: int = 5,
        backoff_s: float = 0.5,
        backoff_max_s: float = 10.0,
    ) -> None:
        self.inner, self.guard, self.uri = store, guard, store.uri
        self.attempts, self.backoff_s, self.backoff_max_s = attempts, backoff_s, backoff_max_s

    def _retry(self, fn: Callable[[], _T], what: str) -> _T:
        def warn(exc: Exception, delay: float) -> None:
            log.warning("storage: %s failed (%s); retrying in %.1fs", what, exc, delay)

        return retry_transient(fn, self.attempts, base_s=self.backoff_s,
                               max_s=self.backoff_max_s, on_retry=warn)  # fmt: skip

    def _write(self, fn: Callable[[], None], what: str) -> None:
        if self.guard is not None:
            self.guard()
        self._retry(fn, what)

    def url(self, key: str) -> str:
        return self.inner.url(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(lambda: self.inner.put_bytes(key, data), f"write {key}")

    def put_file(self, key: str, path: str | Path) -> None:
        self._write(lambda: self.inner.put_file(key, path), f"upload {key}")

    def delete(self, keys: Iterable[str]) -> None:
        doomed = list(keys)
        self._write(lambda: self.inner.delete(doomed), f"delete {len(doomed)} object(s)")

    def get_bytes(self, key: str) -> bytes:
        return self._retry(lambda: self.inner.get_bytes(key), f"read {key}")

    def get_file(self, key: str, path: str | Path) -> None:
        self._retry(lambda: self.inner.get_file(key, path), f"download {key}")

    def exists(self, key: str) -> bool:
        return bool(self._retry(lambda: self.inner.exists(key), f"check {key}"))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Listed in full inside the retry, so a failure midway is retried from the start."""
        objects = self._retry(lambda: list(self.inner.list(prefix)), f"list {prefix!r}")
        return iter(objects)
