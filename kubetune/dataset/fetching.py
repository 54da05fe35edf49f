"""Where a dataset's bytes come from: a store opened once per process (`StoreRef`) and the
bounded thread pool its GETs run on (`fetch_pool`, `bounded_map`)."""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from kubetune.storage import ObjectStore, open_store

_T = TypeVar("_T")
_U = TypeVar("_U")
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
