"""DreamBooth data (`DREAMBOOTH_SD_DATA_LOADER`): instance and class image folders as one
source with fixed captions and per-example loss weights, and invoke-training's balanced
instance/class batching as a resumable sampler."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from runner.config.data import DreamboothSDDataLoaderConfig
from runner.data.buckets import BucketBatchSampler, derive_seed
from runner.data.sources import Source, build_source, merge_sources

INSTANCE, CLASS = "instance", "class"


@dataclass(frozen=True)
class DreamBoothData:
    """The instance and class folders as one `Source` (instance examples first)."""

    source: Source
    num_instance: int
    loss_weights: list[float]
    """Each example's loss weight: 1.0 (instance) or class_data_loss_weight (class)."""


def dreambooth_source(
    cfg: DreamboothSDDataLoaderConfig, storage: Any | None = None
) -> DreamBoothData:
    """Instance images (indices ``0 .. num_instance-1``), then class images, each captioned
    with its set's fixed caption; ids are ``instance/<file>`` / ``class/<file>``. Listed only."""
    parts = [
        (
            INSTANCE,
            build_source(cfg.instance_dataset, storage, need_captions=False),
            cfg.instance_caption,
            1.0,
        )
    ]
    if cfg.class_dataset is not None:
        source = build_source(cfg.class_dataset, storage, need_captions=False)
        parts.append((CLASS, source, cfg.class_caption or "", cfg.class_data_loss_weight))
    merged = merge_sources([(name, source, caption) for name, source, caption, _ in parts])
    weights = [weight for _, source, _, weight in parts for _ in range(len(source))]
    return DreamBoothData(merged, len(parts[0][1]), weights)


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
        base = super().fingerprint()
        raw = f"{base}:dreambooth:{self.num_instance}:{self.bucketed}"
        return hashlib.sha256(raw.encode()).hexdigest()[:16]
