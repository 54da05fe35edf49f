"""Aspect-ratio buckets and a resumable, seeded batch sampler over them."""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune.dataset.buckets import build_buckets, closest_bucket, derive_seed
from kubetune.errors import ResumeMismatchError
from kubetune.humanize import count

__all__ = ["BucketBatchSampler", "build_buckets", "closest_bucket", "derive_seed"]

log = logging.getLogger(__name__)


class BucketBatchSampler:
    """Batches drawn from one bucket at a time, shuffled, deterministic by (seed, epoch).

    Every example appears exactly once per epoch (the last batch of a bucket may be short).
    With ``num_replicas`` > 1 (one per GPU process) batches are drawn as global batches of
    ``batch_size × num_replicas`` and each ``rank`` takes its slice; the plan, its length and
    the position are identical on every rank, so one saved state resumes all of them.

    The sampler is the one owner of the run's data cursor: ``epoch`` and ``position`` (the
    batches of that epoch the consumer has taken). Only ``advance`` (one batch consumed;
    after the epoch's last one the cursor is at the next epoch's start), ``set_epoch`` and
    ``load_state_dict`` move it; ``state_dict`` is what a checkpoint saves of the data.
    """

    def __init__(
        self,
        bucket_of: Sequence[int],
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        *,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.bucket_of = list(bucket_of)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self._epoch, self._position = 0, 0
        self._memo: tuple[int, list[list[int]]] | None = None
        members: dict[int, list[int]] = {}
        for index, bucket in enumerate(self.bucket_of):
            members.setdefault(bucket, []).append(index)
        self._members = [members[b] for b in sorted(members)]
        size = self.global_batch_size
        self._len = sum(-(-len(m) // size) for m in self._members)

    @property
    def global_batch_size(self) -> int:
        """Examples per step over all processes (``batch_size`` × ``num_replicas``)."""
        return self.batch_size * self.num_replicas

    def __len__(self) -> int:
        return self._len

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All processes' batches of `epoch`, in order (the same list on every rank)."""
        rng = random.Random(derive_seed("batches", self.seed, epoch))
        size = self.global_batch_size
        out: list[list[int]] = []
        for members in self._members:
            order = list(members)
            if self.shuffle:
                rng.shuffle(order)
            out.extend(order[i : i + size] for i in range(0, len(order), size))
        if self.shuffle:
            rng.shuffle(out)
        return out

    def cover_batches(self) -> list[list[int]]:
        """Every example exactly once, in one-bucket global batches (for filling caches)."""
        return self.global_batches(0)

    def batches(self, epoch: int) -> list[list[int]]:
        """This process's batches of `epoch` (see `_local`)."""
        return [self._local(glob) for glob in self._plan(epoch)]

    def _local(self, glob: list[int]) -> list[int]:
        """This process's part of a global batch: a strided slice, so the ranks' slices are
        disjoint and cover it. A global batch shorter than the number of processes (a
        bucket's tail) is cycled so that every rank still gets one example."""
        n = self.num_replicas
        if n == 1:
            return glob
        return glob[self.rank :: n] if len(glob) >= n else [glob[self.rank % len(glob)]]

    def _exists(self, epoch: int, position: int) -> bool:
        """Whether `epoch` has a batch `position` (0-based)."""
        return position < len(self._plan(epoch))

    def _keys(self, batch: list[int], epoch: int) -> list[Any]:
        """What the dataset gets for each example of a batch."""
        return [(i, epoch) for i in batch]

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    @property
    def position(self) -> int:
        """Batches of ``epoch`` already consumed."""
        return self._position

    def remaining(self) -> Iterator[list[Any]]:
        """The current epoch's batches not consumed yet (from where the cursor is now), each
        example keyed (index, epoch, ...) (`_keys`)."""
        return self._from(self._epoch, self._position)

    def _from(self, epoch: int, position: int) -> Iterator[list[Any]]:
        while self._exists(epoch, position):
            yield self._keys(self._local(self._plan(epoch)[position]), epoch)
            position += 1

    def advance(self) -> None:
        """One batch consumed; after the epoch's last one, the next epoch starts."""
        self._position += 1
        if not self._exists(self._epoch, self._position):
            self._epoch, self._position = self._epoch + 1, 0

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch, advancing the cursor as each batch is taken."""
        epoch = self._epoch
        while self._epoch == epoch and self._exists(epoch, self._position):
            batch = self._local(self._plan(epoch)[self._position])
            self.advance()
            yield batch

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch` (from its start); the current epoch keeps its position."""
        if epoch != self._epoch:
            self._epoch, self._position = epoch, 0

    def slots(self, epoch: int, position: int) -> Slots:
        """Where this rank's examples of batch ``position`` of ``epoch`` sit in their global
        batch (see ``Slots``)."""
        glob = self._plan(epoch)[position]
        n = self.num_replicas
        if len(glob) >= n:
            rows = list(range(self.rank, len(glob), n))
            return Slots([glob[r] for r in rows], rows, [True] * len(rows), len(glob), n)
        row = self.rank % len(glob)
        return Slots([glob[row]], [row], [self.rank < len(glob)], len(glob), n)

    def _plan(self, epoch: int) -> list[list[int]]:
        """``global_batches(epoch)``, remembered for the current epoch."""
        if self._memo is None or self._memo[0] != epoch:
            self._memo = (epoch, self.global_batches(epoch))
        return self._memo[1]

    def examples_seen(self) -> int:
        """Examples of the current epoch consumed by all processes together."""
        plan = self._plan(self._epoch)
        return sum(len(plan[p]) for p in range(self._position))

    def fingerprint(self) -> str:
        """Identity of the data order: a different dataset, bucketing or seed changes it.
        The batch size and world size do not: positions are kept in examples seen."""
        raw = f"{self.seed}:{self.shuffle}:{self.bucket_of}"
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def legacy_fingerprint(self) -> str:
        """The fingerprint of checkpoints written before positions were kept in examples."""
        raw = f"{self.seed}:{self.batch_size}:{self.shuffle}:{self.bucket_of}"
        if self.num_replicas > 1:
            raw += f":world={self.num_replicas}"
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "examples": self.examples_seen(),
            "global_batch_size": self.global_batch_size,
            "fingerprint": self.fingerprint(),
            "num_batches": self._known_len(),
        }

    def _known_len(self) -> int | None:
        """Batches per epoch if known without waiting (a record, not a check)."""
        return len(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position; refuse one saved for another dataset / order. Saved with the
        same global batch size (any split over processes): the same batch, exactly. With
        another: the first batch after the examples already seen in that epoch."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if "examples" not in state:  # written before positions were kept in examples
            self._check(state, self.legacy_fingerprint())
        else:
            self._check(state, self.fingerprint())
            if int(state["global_batch_size"]) != self.global_batch_size:
                position = self._position_of(epoch, int(state["examples"]), state)
        if position < 0 or (position > 0 and not self._exists(epoch, position - 1)):
            raise ResumeMismatchError(f"data loader position {position} is out of range")
        if not self._exists(epoch, position):  # an epoch's end as older checkpoints held it
            epoch, position = epoch + 1, 0
        self._epoch, self._position = epoch, position

    def _check(self, state: dict[str, Any], expected: str) -> None:
        if state.get("fingerprint") != expected:
            raise ResumeMismatchError(
                "the data loader state was saved for a different dataset, seed or bucketing",
                hint="resume with the same data and config, or start a new run",
            )

    def _position_of(self, epoch: int, examples: int, state: dict[str, Any]) -> int:
        """The first batch of ``epoch`` after ``examples`` examples (another batch size)."""
        plan, position, seen = self._plan(epoch), 0, 0
        while self._exists(epoch, position) and seen < examples:
            seen += len(plan[position])
            position += 1
        log.warning(
            "the global batch size changed (%s -> %d): resuming epoch %d after %s "
            "(saved: %d); this epoch's order differs from an uninterrupted run",
            state["global_batch_size"], self.global_batch_size, epoch + 1, count(seen, "example"),
            examples,
        )  # fmt: skip
        return position


@dataclass(frozen=True)
class Slots:
    """Where one process's examples of a batch (``indices``) sit in their global batch:
    ``rows`` (their positions in it), ``owned`` (False for a copy that only keeps a rank busy
    when the global batch is shorter than the number of processes), ``size`` (the global
    batch's length) and ``processes``. Random draws are made for all ``size`` rows and each
    rank keeps its own, so nothing drawn depends on the rank."""

    indices: list[int]
    rows: list[int]
    owned: list[bool]
    size: int
    processes: int

    def shares(self) -> list[float]:
        """Each example's weight in this process's mean loss so that the mean over processes
        is the mean over the global batch: ``processes · len(rows) / size`` (0 for a copy)."""
        share = self.processes * len(self.rows) / self.size
        return [share if own else 0.0 for own in self.owned]
