"""Image sizes that arrive while training runs (`aspect_ratio_buckets.order: streaming`):
the preflight's header reads fill the run's `SizeFeed`, reading first the examples the
sampler will take first (`ReadQueue.reorder`). No torch here."""

from __future__ import annotations

import threading
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

Size = tuple[int, int]
SizeItem = tuple[int, int, int]
"""(example, height, width); (0, 0) for an example whose header is bad."""


class SizeFeed:
    """Every example's (h, w) as the header checks learn it: the one owner of the sizes a
    streaming run knows. ``get`` waits for one; ``fail`` hands the checks' error to whoever
    waits; ``want(seed, epoch)`` asks the checks to read that epoch's scan order first.

    The examples are also kept in the order their sizes arrived (`arrivals`): what a
    multi-process run publishes to its other ranks (`runner.data.size_relay`).

    A copy sent to another process (a DataLoader worker) holds the sizes known then and
    never waits: the batches it gets carry their examples' sizes."""

    def __init__(self, n: int, on_want: Callable[[int, int], None] | None = None) -> None:
        self._sizes: list[Size | None] = [None] * n
        self._missing = n
        self._arrived = array("q")  # examples, in the order their sizes came (8 bytes each)
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self.on_want = on_want

    def __len__(self) -> int:
        return len(self._sizes)

    @property
    def complete(self) -> bool:
        """Whether every size is known."""
        return self._missing == 0

    def put(self, items: Iterable[SizeItem]) -> None:
        with self._cond:
            for i, h, w in items:
                if self._sizes[i] is None:
                    self._missing -= 1
                    self._arrived.append(i)
                self._sizes[i] = (h, w)
            self._cond.notify_all()

    def fill(self, sizes_hw: Sequence[Size]) -> None:
        """Every size at once (the checks' final report)."""
        self.put((i, h, w) for i, (h, w) in enumerate(sizes_hw))

    def fail(self, error: BaseException) -> None:
        """The checks failed: ``get`` of a size not known raises ``error`` from now on."""
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def arrivals(self, start: int, timeout: float) -> tuple[list[SizeItem], BaseException | None]:
        """The sizes that arrived after the first ``start`` ones, in arrival order (waiting
        up to ``timeout`` s for one if there is none yet), and the checks' error if they
        failed. After the error, nothing more arrives; once `complete`, nothing either."""
        with self._cond:
            if len(self._arrived) <= start and self._error is None and not self.complete:
                self._cond.wait(timeout)
            new = self._arrived[start:]
            items = [(i, *self._sizes[i]) for i in new]  # type: ignore[misc]
            return items, self._error  # type: ignore[return-value]

    def arrived(self) -> list[int]:
        """The examples whose size is known, in the order they arrived."""
        with self._cond:
            return list(self._arrived)

    def known(self, i: int) -> Size | None:
        return self._sizes[i]

    def get(self, i: int) -> Size:
        """Example ``i``'s size, waiting for the checks to read it (they always end: with
        every size, or with an error raised here)."""
        size = self._sizes[i]
        if size is not None:
            return size
        with self._cond:
            while (size := self._sizes[i]) is None:
                if self._error is not None:
                    raise self._error
                self._cond.wait(timeout=1.0)
            return size

    def want(self, seed: int, epoch: int) -> None:
        """Ask the header checks to read ``scan_order(n, seed, epoch)`` first."""
        if self.on_want is not None and not self.complete:
            self.on_want(seed, epoch)

    def __getstate__(self) -> dict[str, Any]:
        return {"sizes": list(self._sizes), "missing": self._missing}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._sizes, self._missing = state["sizes"], state["missing"]
        self._arrived = array("q", (i for i, size in enumerate(self._sizes) if size is not None))
        self._error, self.on_want = None, None
        self._cond = threading.Condition()


class ReadQueue:
    """The examples whose headers are still to be read, next first; ``reorder`` puts
    another order first. Thread-safe: the readers take from it while an order arrives."""

    def __init__(self, indices: Iterable[int]) -> None:
        self._lock = threading.Lock()
        self._pending = list(indices)[::-1]  # taken from the end
        self._taken: set[int] = set()

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        with self._lock:
            while self._pending:
                i = self._pending.pop()
                if i not in self._taken:
                    self._taken.add(i)
                    return i
            raise StopIteration

    def reorder(self, order: Sequence[int]) -> None:
        """Read the examples not taken yet in ``order``."""
        with self._lock:
            self._pending = [i for i in reversed(order) if i not in self._taken]


@dataclass
class SizeStream:
    """How header checks stream sizes: the order they read in and where each size goes."""

    queue: ReadQueue
    on_size: Callable[[int, Size], None]
    flush: Callable[[], None] = lambda: None
