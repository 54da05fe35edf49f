"""In-process loading's prefetch: batches prepared in a background thread, a bounded number
ahead of the consumer."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from runner.data.batch import Batch

log = logging.getLogger(__name__)
PREFETCH_BATCHES = 2
"""Batches prepared ahead of the consumer (in-process loading); memory is O(this)."""
PREFETCH_STOP_WAIT_S = 1.0
"""How long closing the loader waits for its prefetch thread to stop. One still busy then
(waiting for a streamed image size that has not arrived) is left to end on its own: it
is a daemon and stops at its next batch."""

_DONE = object()


def ahead(source: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """Run `source` in a background thread, at most `depth` items ahead of the consumer."""
    items: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        items.put(("ok", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(("end", _DONE))
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            items.put(("err", err))

    thread = threading.Thread(target=produce, name="kubetune-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = items.get()
            if kind == "err":
                raise value
            if kind == "end":
                return
            yield value
    finally:
        stop.set()
        deadline = time.monotonic() + PREFETCH_STOP_WAIT_S
        while thread.is_alive() and thread is not threading.current_thread():
            with contextlib.suppress(queue.Empty):
                items.get_nowait()
            if time.monotonic() > deadline:
                log.debug("the prefetch thread is still busy; it stops at its next batch")
                break
            thread.join(timeout=0.05)
