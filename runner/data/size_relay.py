"""One header reader per run in the streaming order (`aspect_ratio_buckets.order: streaming`)
with several processes: global rank 0's header checks are the only ones; the sizes they
learn are published, in the order they arrive, to the run's key-value store (torchrun's
c10d store, which every rank of every node reaches already), one numbered key per message,
then their end ("done") or their error. Every rank's sampler takes its sizes from that
published log, rank 0's too (`publish_sizes` gives it a mirror fed only after a message is
in the store), so every rank knows the same sizes and meets the same error, and forms the
same global batches.

Why the store and not a collective on a side group: a collective needs every rank to call
it in step, from a thread of its own here, and one still waiting for rank 0's next message
when its process ends can hold that process until the group's timeout; polling keys never
blocks for long. Why one reader per run and not one per node: the store crosses nodes
already, so a node-local log would be a second mechanism for no fewer header reads."""

from __future__ import annotations

import logging
import pickle
import threading
import time
from typing import Any, Protocol

from kubetune.dataset.size_feed import SizeFeed, SizeItem
from kubetune.errors import KubetuneError, ProcessGroupError

log = logging.getLogger(__name__)
SIZES_PER_KEY = 4096
"""Sizes in one published message (a few dozen KiB pickled)."""
WAIT_S = 1.0
"""How long the publisher waits for rank 0's next sizes before looking again."""
POLL_S = (0.01, 0.2)
"""A follower looks for the next message this often: at first, and at most (backing off
while none comes)."""


class KeyValueStore(Protocol):
    """What the relay needs of a `torch.distributed.Store`."""

    def set(self, key: str, value: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def check(self, keys: list[str]) -> bool: ...


def publish_sizes(source: SizeFeed, store: KeyValueStore) -> SizeFeed:
    """Global rank 0: publish ``source``'s sizes (its header checks' feed) to ``store`` from
    a thread, and return the feed its sampler uses: a mirror holding only what is published
    (asking it for an epoch's order asks ``source``)."""
    mirror = SizeFeed(len(source), on_want=source.want)
    thread = threading.Thread(
        target=_publish, args=(source, mirror, store), name="kubetune-sizes-out", daemon=True
    )
    thread.start()
    return mirror


def follow_sizes(n: int, store: KeyValueStore) -> SizeFeed:
    """The other ranks: a feed of ``n`` sizes filled from the published log by a thread;
    asking it for an order does nothing (rank 0 asks the same at the same epoch)."""
    feed = SizeFeed(n)
    thread = threading.Thread(
        target=_follow, args=(feed, store), name="kubetune-sizes-in", daemon=True
    )
    thread.start()
    return feed


Message = tuple[str, Any]


def _publish(source: SizeFeed, mirror: SizeFeed, store: KeyValueStore) -> None:
    sent, seq = 0, 0
    try:
        while True:
            items, error = source.arrivals(sent, WAIT_S)
            sent += len(items)
            messages: list[Message] = [
                ("sizes", items[k : k + SIZES_PER_KEY]) for k in range(0, len(items), SIZES_PER_KEY)
            ]
            if error is not None:
                messages.append(("failed", _portable(error)))
            elif sent == len(source):
                messages.append(("done", None))
            for message in messages:
                store.set(str(seq), pickle.dumps(message))
                seq += 1
                if _apply(mirror, message):
                    return
    except Exception as err:  # noqa: BLE001 - the store failed: say so on this rank too
        mirror.fail(_lost(err, "publishing"))


def _follow(feed: SizeFeed, store: KeyValueStore) -> None:
    seq, pause = 0, POLL_S[0]
    try:
        while True:
            if not store.check([str(seq)]):
                time.sleep(pause)
                pause = min(pause * 2, POLL_S[1])
                continue
            message = pickle.loads(store.get(str(seq)))
            seq, pause = seq + 1, POLL_S[0]
            if _apply(feed, message):
                return
    except Exception as err:  # noqa: BLE001 - rank 0's store is gone: no size will come
        feed.fail(_lost(err, "receiving"))


def _apply(feed: SizeFeed, message: Message) -> bool:
    """Put a published message into ``feed``; whether it was the last one."""
    kind, value = message
    if kind == "sizes":
        items: list[SizeItem] = value
        feed.put(items)
        return False
    if kind == "failed":
        feed.fail(value)
    elif not feed.complete:  # "done" with sizes missing: a bug, never a hang
        feed.fail(KubetuneError(f"rank 0's header checks ended with sizes missing ({kind})"))
    return True


def _portable(err: BaseException) -> BaseException:
    """``err`` if it survives pickling (kubetune's errors do), else one with its message."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - any exception that does not round-trip
        return KubetuneError(f"the dataset's header checks failed: {err}")


def _lost(err: BaseException, doing: str) -> ProcessGroupError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    log.debug("the image sizes' store failed while %s: %r", doing, err)
    return ProcessGroupError(
        f"lost contact with the other processes while {doing} image sizes: {first}",
        hint="another rank or node stopped or timed out; rerun to resume from the last "
        "published checkpoint",
    )
