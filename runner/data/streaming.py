"""The streaming bucket order (`aspect_ratio_buckets.order: streaming`): batches formed as
the examples' sizes arrive, so step 1 does not wait for every image header."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from typing import Any

from kubetune.dataset.buckets import closest_bucket, scan_order
from kubetune.dataset.size_feed import Size, SizeFeed
from runner.data.buckets import BucketBatchSampler


class StreamPlan:
    """One epoch's global batches, formed as far as asked: the examples are taken in
    `scan_order`; a bucket yields a batch each time it holds ``size`` examples; when the
    scan ends, the buckets' partial batches follow in bucket order. Each batch needs only
    the sizes of the examples scanned up to it (`SizeFeed.get` waits for one), and whether
    a next batch exists needs none (`has`). Thread-safe: the loader's prefetch and the
    training loop both read it; a size is waited for without the lock, so a batch formed
    already is read while another thread waits for a later one's sizes."""

    def __init__(self, order: Sequence[int], bucket_of: Any, size: int) -> None:
        self._order, self._bucket_of, self._size = order, bucket_of, size
        self._scanned = 0
        self._open: dict[int, list[int]] = {}
        self._batches: list[list[int]] = []
        self._ended = False
        self._lock = threading.Lock()

    def has(self, position: int) -> bool:
        """Whether there is a batch ``position``. The one after those formed exists if any
        example is not in a batch yet (scanned or not: it ends in a later one), so asking
        for it waits for no size; a later one scans on until it is formed or the end."""
        with self._lock:
            if position < len(self._batches):
                return True
            if position == len(self._batches) and not self._ended:
                return self._scanned < len(self._order) or any(self._open.values())
        self._reach(position)
        return position < len(self._batches)

    def __getitem__(self, position: int) -> list[int]:
        self._reach(position)
        return self._batches[position]

    def __len__(self) -> int:
        """Batches in the epoch (scans the whole epoch: every size)."""
        self._reach(len(self._order))
        return len(self._batches)

    def __iter__(self) -> Any:
        position = 0
        while self.has(position):
            yield self[position]
            position += 1

    def _reach(self, position: int) -> None:
        """Scan until batch ``position`` is formed or the scan ends. The next example's
        bucket is looked up (waiting for its size) without the lock; whichever thread
        comes back first with it takes the example into the plan."""
        while True:
            with self._lock:
                if len(self._batches) > position or self._ended:
                    return
                scanned = self._scanned
                if scanned == len(self._order):
                    self._batches.extend(self._open.pop(b) for b in sorted(self._open))
                    self._ended = True
                    return
            example = self._order[scanned]
            bucket = self._bucket_of(example)
            with self._lock:
                if self._scanned == scanned:  # not taken by another thread meanwhile
                    self._take(example, bucket)

    def _take(self, example: int, bucket: int) -> None:
        self._scanned += 1
        members = self._open.setdefault(bucket, [])
        members.append(example)
        if len(members) == self._size:
            self._batches.append(self._open.pop(bucket))


class StreamTargets:
    """Each example's bucket and bucket size (h, w), from its size in the feed (waiting for
    it). An unreadable image (size (0, 0)) goes in the first bucket: the checks' error ends
    the run. What the dataset uses as its ``target_hw``; picklable for loader workers
    (which get the sizes in their keys and never wait)."""

    def __init__(self, feed: SizeFeed, buckets: Sequence[Size]) -> None:
        self.feed, self.buckets = feed, list(buckets)
        self._memo: dict[Size, int] = {}

    def bucket(self, index: int) -> int:
        return self._bucket_of_size(self.feed.get(index))

    def _bucket_of_size(self, size: Size) -> int:
        bucket = self._memo.get(size)
        if bucket is None:
            bucket = 0 if 0 in size else closest_bucket(size, self.buckets)
            self._memo[size] = bucket
        return bucket

    def __getitem__(self, index: int) -> Size:
        return self.buckets[self.bucket(index)]

    def __len__(self) -> int:
        return len(self.feed)

    def known(self, index: int) -> Size | None:
        """The example's bucket size if its size has arrived, else None (never waits)."""
        size = self.feed.known(index)
        return None if size is None else self.buckets[self._bucket_of_size(size)]


class StreamingBucketSampler(BucketBatchSampler):
    """`BucketBatchSampler` in the streaming order (`StreamPlan`): same buckets, every example
    once per epoch, seeded by (seed, epoch) and resumable on any number of processes; the
    sizes come from ``feed`` as the header checks read them, the epoch's scan order first
    (`SizeFeed.want`). Each key handed to the dataset carries the example's bucket size,
    so DataLoader workers never wait for the feed."""

    def __init__(
        self,
        targets: StreamTargets,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        *,
        identity: str = "",
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__([], batch_size, seed, shuffle, num_replicas=num_replicas, rank=rank)
        self.targets, self.feed, self.identity = targets, targets.feed, identity
        """``identity``: what the dataset is (the listing's digest), for `fingerprint`."""
        self._stream: tuple[int, StreamPlan] | None = None

    def __len__(self) -> int:
        return len(self._plan(self._epoch))

    def estimated_len(self) -> int:
        """Batches per epoch: exact once every size is known, else the fewest possible."""
        if self.feed.complete:
            return len(self)
        return -(-len(self.feed) // self.global_batch_size)

    def _known_len(self) -> int | None:
        return len(self) if self.feed.complete else None

    def global_batches(self, epoch: int) -> list[list[int]]:
        return list(self._new_plan(epoch))

    def _new_plan(self, epoch: int) -> StreamPlan:
        n = len(self.feed)
        order = scan_order(n, self.seed, epoch) if self.shuffle else list(range(n))
        self.feed.want(self.seed, epoch)
        return StreamPlan(order, self.targets.bucket, self.global_batch_size)

    def _plan(self, epoch: int) -> StreamPlan:  # type: ignore[override]
        if self._stream is None or self._stream[0] != epoch:
            self._stream = (epoch, self._new_plan(epoch))
        return self._stream[1]

    def _exists(self, epoch: int, position: int) -> bool:
        return self._plan(epoch).has(position)

    def _keys(self, batch: list[int], epoch: int) -> list[Any]:
        return [(i, epoch, self.targets[i]) for i in batch]

    def fingerprint(self) -> str:
        raw = f"streaming:{self.seed}:{self.shuffle}:{self.targets.buckets}:{self.identity}"
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def legacy_fingerprint(self) -> str:
        return self.fingerprint()
