"""DreamBooth batching (`DREAMBOOTH_SD_DATA_LOADER`): invoke-training's balanced
instance/class batches as a resumable sampler, and the fixed-caption builder. The source
itself is `kubetune.dataset.dreambooth`."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from kubetune.dataset.dreambooth import CLASS, INSTANCE
from runner.data.buckets import BucketBatchSampler, derive_seed


class FixedCaptions:
    """The caption builder of DreamBooth data: the source's caption as it is."""

    def build(self, caption: str | None, rng: random.Random, example_id: str = "") -> str:
        return caption or ""


class DreamBoothBatchSampler(BucketBatchSampler):
    """invoke-training's DreamBooth batching, seeded and resumable.

    Without a class set it is the plain bucket sampler over the instance images. With one,
    each epoch takes min(#instance, #class) examples of each set (a fresh random subset of the
    larger set every epoch) and alternates them: one by one without aspect-ratio buckets (so
    every batch holds both halves), batch by batch with buckets (a batch is one bucket).
    With several processes the balance holds per global batch (each rank takes a strided
    slice of it, as in ``BucketBatchSampler``).
    """

    def __init__(
        self,
        bucket_of: Sequence[int],
        num_instance: int,
        batch_size: int,
        seed: int,
        *,
        bucketed: bool,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(bucket_of, batch_size, seed, num_replicas=num_replicas, rank=rank)
        self.num_instance, self.bucketed = num_instance, bucketed
        self._parts: list[BucketBatchSampler] = []
        if num_instance < len(bucket_of):
            for name, ids in (
                (INSTANCE, bucket_of[:num_instance]),
                (CLASS, bucket_of[num_instance:]),
            ):
                part_seed = derive_seed(name, seed)
                self._parts.append(
                    BucketBatchSampler(ids, batch_size, part_seed, num_replicas=num_replicas)
                )
            self._len = len(self.global_batches(0))

    def global_batches(self, epoch: int) -> list[list[int]]:
        if not self._parts:
            return super().global_batches(epoch)
        inst, cls = (part.global_batches(epoch) for part in self._parts)
        cls = [[i + self.num_instance for i in batch] for batch in cls]
        if self.bucketed:
            k = min(len(inst), len(cls))
            return [batch for pair in zip(inst[:k], cls[:k], strict=True) for batch in pair]
        inst_order = [i for batch in inst for i in batch]
        cls_order = [i for batch in cls for i in batch]
        k = min(len(inst_order), len(cls_order))
        stream = [i for pair in zip(inst_order[:k], cls_order[:k], strict=True) for i in pair]
        size = self.global_batch_size
        return [stream[i : i + size] for i in range(0, len(stream), size)]

    def cover_batches(self) -> list[list[int]]:
        """Every example once (instance batches, then class batches): for filling caches."""
        if not self._parts:
            return super().cover_batches()
        inst, cls = (part.global_batches(0) for part in self._parts)
        return inst + [[i + self.num_instance for i in batch] for batch in cls]

    def fingerprint(self) -> str:
        return self._with_parts(super().fingerprint())

    def legacy_fingerprint(self) -> str:
        return self._with_parts(super().legacy_fingerprint())

    def _with_parts(self, base: str) -> str:
        raw = f"{base}:dreambooth:{self.num_instance}:{self.bucketed}"
        return hashlib.sha256(raw.encode()).hexdigest()[:16]
