"""The training DataLoader: source → captions → transforms → buckets, resumable mid-epoch.

`build_train_dataloader` builds it from the config; the pieces it puts together live in
`runner.data.train_dataset` (examples), `runner.data.batch` (the batch format),
`runner.data.resumable` (`ResumableLoader`), `runner.data.prefetch` and
`runner.data.workers`; their names are importable from here too."""

from __future__ import annotations

import math
from collections.abc import Sequence

from kubetune.config.data import DreamboothSDDataLoaderConfig
from kubetune.config.training_types import PipelineConfig
from kubetune.dataset.buckets import assign_buckets
from kubetune.dataset.captions import CaptionBuilder
from kubetune.dataset.preflight import PreflightReport, preflight, streams_sizes
from kubetune.dataset.size_feed import SizeFeed
from runner.data.batch import Batch, collate, place
from runner.data.buckets import BucketBatchSampler, build_buckets
from runner.data.dreambooth import DreamBoothBatchSampler, FixedCaptions
from runner.data.loader_settings import LoaderConfig, LoaderSettings
from runner.data.memory import DecodedImages
from runner.data.prefetch import PREFETCH_BATCHES, PREFETCH_STOP_WAIT_S
from runner.data.resumable import ResumableLoader, Together, cache_batches
from runner.data.streaming import StreamingBucketSampler, StreamTargets
from runner.data.train_dataset import MAX_SUBSTITUTES, Key, TrainDataset
from runner.data.transforms import ImageTransform, cover_hw, resolution_hw

__all__ = [
    "MAX_SUBSTITUTES",
    "PREFETCH_BATCHES",
    "PREFETCH_STOP_WAIT_S",
    "Batch",
    "Key",
    "ResumableLoader",
    "Together",
    "TrainDataset",
    "build_train_dataloader",
    "cache_batches",
    "collate",
    "place",
]


def build_train_dataloader(
    cfg: PipelineConfig,
    *,
    seed: int,
    batch_size: int,
    device_is_cuda: bool,
    placeholder_text: str | None = None,
    num_processes: int = 1,
    process_index: int = 0,
    data: PreflightReport | None = None,
) -> ResumableLoader:
    """The training loader for `cfg.data_loader` (see docs/architecture.md for batches).

    ``batch_size`` is per process; with ``num_processes`` > 1 (``accelerate launch``) each
    process gets its own disjoint slice of every global batch (see ``BucketBatchSampler``).
    ``data`` is the run's preflight report: its source and image sizes are used as they are
    (one listing for the whole run, buckets from the index); without it, preflight runs here.
    """
    settings = LoaderSettings.from_config(cfg)
    loader_cfg = settings.section
    data = data or preflight(cfg)
    source = data.source
    assert source is not None
    is_dreambooth = isinstance(loader_cfg, DreamboothSDDataLoaderConfig)
    captions: CaptionBuilder | FixedCaptions = FixedCaptions()
    if not is_dreambooth:
        captions = CaptionBuilder(loader_cfg, placeholder_text or settings.placeholder_token)
    sampler, buckets, target_hw = _sampler(
        loader_cfg, data, batch_size, seed, num_replicas=num_processes, rank=process_index
    )
    dataset = TrainDataset(
        source,
        captions,
        ImageTransform(center_crop=loader_cfg.center_crop, random_flip=loader_cfg.random_flip),
        target_hw,
        seed,
        _memory(settings, data, target_hw),
        data.loss_weights,
        caption_dropout_rate=settings.caption_dropout_rate,
    )
    loader = ResumableLoader(
        dataset,
        sampler,
        num_workers=loader_cfg.dataloader_num_workers,
        pin_memory=device_is_cuda,
        max_bad=math.floor(loader_cfg.max_bad_image_share * len(source)),
    )
    loader.buckets = buckets
    loader.checks = data.pending
    return loader


def _sampler(
    loader_cfg: LoaderConfig,
    data: PreflightReport,
    batch_size: int,
    seed: int,
    *,
    num_replicas: int,
    rank: int,
) -> tuple[BucketBatchSampler, list[tuple[int, int]], Sequence[tuple[int, int]]]:
    """The batch sampler for the loader's order, the bucket sizes and each example's bucket
    size (streaming: looked up as the sizes arrive)."""
    source = data.source
    assert source is not None
    if streams_sizes(loader_cfg):
        buckets = build_buckets(loader_cfg.aspect_ratio_buckets)
        targets = StreamTargets(data.feed or _filled(data.sizes_hw), buckets)
        streaming = StreamingBucketSampler(
            targets, batch_size, seed, identity=source.digest(), num_replicas=num_replicas,
            rank=rank,
        )  # fmt: skip
        return streaming, buckets, targets  # type: ignore[return-value]
    buckets, bucket_of = _buckets(loader_cfg, data.sizes_hw, len(source))
    target_hw = [buckets[b] for b in bucket_of]
    if isinstance(loader_cfg, DreamboothSDDataLoaderConfig):
        assert data.num_instance is not None
        bucketed = loader_cfg.aspect_ratio_buckets is not None
        dreambooth = DreamBoothBatchSampler(
            bucket_of, data.num_instance, batch_size, seed, bucketed=bucketed,
            num_replicas=num_replicas, rank=rank,
        )  # fmt: skip
        return dreambooth, buckets, target_hw
    plain = BucketBatchSampler(bucket_of, batch_size, seed, num_replicas=num_replicas, rank=rank)
    return plain, buckets, target_hw


def _filled(sizes_hw: Sequence[tuple[int, int]]) -> SizeFeed:
    """A feed holding every size already (the checks ended before step 1)."""
    feed = SizeFeed(len(sizes_hw))
    feed.fill(sizes_hw)
    return feed


def _buckets(
    loader_cfg: LoaderConfig, sizes_hw: list[tuple[int, int]], n: int
) -> tuple[list[tuple[int, int]], list[int]]:
    """The bucket sizes (h, w) and each of the ``n`` examples' bucket."""
    if loader_cfg.aspect_ratio_buckets is None:
        return [resolution_hw(loader_cfg.resolution)], [0] * n
    buckets = build_buckets(loader_cfg.aspect_ratio_buckets)
    return buckets, assign_buckets(sizes_hw, buckets)


def _memory(
    settings: LoaderSettings, data: PreflightReport, target_hw: Sequence[tuple[int, int]]
) -> DecodedImages | None:
    """The `keep_in_memory` store, if asked: one block shared by the loader's workers, a slot
    for each kept example (its cover size at its bucket's scale) while the budget lasts."""
    source = data.source
    assert source is not None
    kept = settings.kept_indices(len(source), data.num_instance)
    if kept is None:
        return None
    wanted = [
        (i, cover_hw((w, h), target_hw[i]), source.records[i].mask_key is not None)
        for i in kept
        for h, w in [data.sizes_hw[i]]
        if h > 0 and w > 0  # (0, 0): its header was unreadable
    ]
    return DecodedImages.planned(wanted)
