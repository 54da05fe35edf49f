"""The training DataLoader: source → captions → transforms → buckets, resumable mid-epoch."""

from __future__ import annotations

import contextlib
import queue
import random
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from runner.config.data import DreamboothSDDataLoaderConfig, TextualInversionSDDataLoaderConfig
from runner.config.pipelines import PipelineConfig
from runner.data.buckets import BucketBatchSampler, build_buckets, closest_bucket, derive_seed
from runner.data.captions import CaptionBuilder, LoaderConfig
from runner.data.dreambooth import DreamBoothBatchSampler, DreamBoothSource, FixedCaptions
from runner.data.images import MAX_IMAGE_PIXELS, decode_image, decode_mask, image_size_hw
from runner.data.sources import MaskRef, Source, build_source, fetch_pool
from runner.data.transforms import ImageTransform, resolution_hw
from runner.errors import DataError

Batch = dict[str, Any]
PREFETCH_BATCHES = 2
"""Batches prepared ahead of the consumer (in-process loading); memory is O(this)."""


class TrainDataset(Dataset[Batch]):
    """Examples keyed by (index, epoch): each draw's crop/flip/caption comes from
    (seed, epoch, index), so results do not depend on workers or on resuming."""

    def __init__(
        self,
        source: Source | DreamBoothSource,
        captions: CaptionBuilder | FixedCaptions,
        transform: ImageTransform,
        target_hw: Sequence[tuple[int, int]],
        seed: int,
        loss_weights: Sequence[float] | None = None,
        caption_dropout_rate: float = 0.0,
    ) -> None:
        self.source, self.captions, self.transform = source, captions, transform
        self.caption_dropout_rate = caption_dropout_rate
        """Probability of training on the empty caption (kohya's caption dropout)."""
        self.target_hw, self.seed = list(target_hw), seed
        self.loss_weights = None if loss_weights is None else list(loss_weights)

    def __len__(self) -> int:
        return len(self.source)

    def load(self, key: tuple[int, int]) -> Batch:
        index, epoch = key
        raw = self.source.fetch(index)
        image = decode_image(raw.data, raw.id)
        rng = random.Random(derive_seed("image", self.seed, epoch, index))
        item: Batch = {}
        if raw.mask is None:
            pixels, original, crop = self.transform(image, self.target_hw[index], rng)
        else:
            mask = decode_mask(raw.mask.data, raw.mask.name)
            pixels, item["mask"], original, crop = self.transform.with_mask(
                image, mask, self.target_hw[index], rng
            )
        caption_rng = random.Random(derive_seed("caption", self.seed, epoch, index))
        caption = self.captions.build(raw.caption, caption_rng, raw.id)
        if self.caption_dropout_rate:  # its own stream: the rate changes no other draw
            drop_rng = random.Random(derive_seed("caption-dropout", self.seed, epoch, index))
            caption = "" if drop_rng.random() < self.caption_dropout_rate else caption
        item.update(
            pixel_values=pixels,
            caption=caption,
            original_size_hw=original,
            crop_top_left_yx=crop,
            id=raw.id,
        )
        if self.loss_weights is not None:
            item["loss_weight"] = self.loss_weights[index]
        return item

    def __getitem__(self, key: tuple[int, int]) -> Batch:
        return self.load(key)

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list[Batch]:
        """A whole batch: fetch + decode + transform in the bounded parallel pool."""
        if len(keys) <= 1:
            return [self.load(k) for k in keys]
        return list(fetch_pool().map(self.load, keys))


def collate(items: list[Batch]) -> Batch:
    """Stack examples of one bucket into the batch format of docs/architecture.md."""
    batch = {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "caption": [it["caption"] for it in items],
        "original_size_hw": torch.tensor(
            [it["original_size_hw"] for it in items], dtype=torch.long
        ),
        "crop_top_left_yx": torch.tensor(
            [it["crop_top_left_yx"] for it in items], dtype=torch.long
        ),
        "id": [it["id"] for it in items],
    }
    if "mask" in items[0]:
        batch["mask"] = torch.stack([it["mask"] for it in items])
    if "loss_weight" in items[0]:
        batch["loss_weight"] = torch.tensor(
            [it["loss_weight"] for it in items], dtype=torch.float32
        )
    return batch


class _Plan:
    """The batch_sampler the DataLoader sees: the rest of the current epoch, keyed by epoch."""

    def __init__(self, sampler: BucketBatchSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.sampler.epoch, self.sampler.position  # snapshot now, not lazily
        return iter([[(i, epoch) for i in batch] for batch in self.sampler.batches(epoch)[start:]])


class ResumableLoader:
    """Iterates the current epoch's remaining batches; `state_dict` is the position of the
    last batch handed out, so a restored loader yields exactly the batches not yet seen.
    The epoch advances after its last batch (or with `set_epoch`)."""

    def __init__(
        self,
        dataset: TrainDataset,
        sampler: BucketBatchSampler,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.dataset, self.sampler, self.num_workers = dataset, sampler, num_workers
        self.buckets: list[tuple[int, int]] = []
        self._loader = DataLoader(
            dataset,
            batch_sampler=_Plan(sampler),
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            prefetch_factor=2 if num_workers else None,
        )

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)

    def __iter__(self) -> Iterator[Batch]:
        batches: Iterator[Batch] = iter(self._loader)
        if self.num_workers == 0:
            batches = _ahead(batches, PREFETCH_BATCHES)
        for batch in batches:
            self.sampler.position += 1
            yield batch
        if self.sampler.position >= len(self.sampler):
            self.sampler.epoch, self.sampler.position = self.sampler.epoch + 1, 0


def cache_batches(loader: ResumableLoader) -> Iterator[Batch]:
    """Every example once, for filling the latent / text caches: the sampler's covering
    batches (epoch 0's, whatever epoch a resumed run is in, so caches are identical across
    resumes) cut into per-process batches. The loader's position does not move."""
    sampler, dataset = loader.sampler, loader.dataset
    size = sampler.batch_size
    for batch in sampler.cover_batches():
        for start in range(0, len(batch), size):
            yield collate(dataset.__getitems__([(i, 0) for i in batch[start : start + size]]))


_DONE = object()


def _ahead(source: Iterator[Batch], depth: int) -> Iterator[Batch]:
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
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):
                items.get_nowait()
            thread.join(timeout=0.05)


# --- building ------------------------------------------------------------------------------


def default_placeholder_text(cfg: PipelineConfig) -> str | None:
    """ "<tok>" or "<tok> <tok>_1 ..." for TI configs with several vectors; None for LoRA."""
    token = getattr(cfg, "placeholder_token", None)
    if token is None:
        return None
    n = getattr(cfg, "num_vectors", 1)
    return " ".join([token] + [f"{token}_{i}" for i in range(1, n)])


def needs_captions(loader: LoaderConfig) -> bool:
    """Whether the dataset's own captions are read."""
    if isinstance(loader, TextualInversionSDDataLoaderConfig):
        return loader.keep_original_captions
    return True


def build_train_dataloader(
    cfg: PipelineConfig,
    *,
    seed: int,
    batch_size: int,
    device_is_cuda: bool,
    placeholder_text: str | None = None,
    num_processes: int = 1,
    process_index: int = 0,
) -> ResumableLoader:
    """The training loader for `cfg.data_loader` (see docs/architecture.md for batches).

    ``batch_size`` is per process; with ``num_processes`` > 1 (``accelerate launch``) each
    process gets its own disjoint slice of every global batch (see ``BucketBatchSampler``).
    """
    loader_cfg = cfg.data_loader
    source = train_source(cfg)
    if loader_cfg.aspect_ratio_buckets is None:
        buckets = [resolution_hw(loader_cfg.resolution)]
        bucket_of = [0] * len(source)
    else:
        buckets = build_buckets(loader_cfg.aspect_ratio_buckets)
        bucket_of = [closest_bucket(size, buckets) for size in scan_sizes(source)]
    transform = ImageTransform(
        center_crop=loader_cfg.center_crop, random_flip=loader_cfg.random_flip
    )
    target_hw = [buckets[b] for b in bucket_of]
    sampler: BucketBatchSampler
    if isinstance(source, DreamBoothSource):
        dataset = TrainDataset(
            source,
            FixedCaptions(),
            transform,
            target_hw,
            seed,
            source.loss_weights(),
            caption_dropout_rate=loader_cfg.caption_dropout_rate,
        )
        sampler = DreamBoothBatchSampler(
            bucket_of,
            source.num_instance,
            batch_size,
            seed,
            bucketed=loader_cfg.aspect_ratio_buckets is not None,
            num_replicas=num_processes,
            rank=process_index,
        )
    else:
        captions = CaptionBuilder(loader_cfg, placeholder_text or default_placeholder_text(cfg))
        rate = getattr(loader_cfg, "caption_dropout_rate", 0.0)  # TI loaders have none
        dataset = TrainDataset(
            source, captions, transform, target_hw, seed, caption_dropout_rate=rate
        )
        sampler = BucketBatchSampler(
            bucket_of, batch_size, seed, num_replicas=num_processes, rank=process_index
        )
    loader = ResumableLoader(
        dataset, sampler, num_workers=loader_cfg.dataloader_num_workers, pin_memory=device_is_cuda
    )
    loader.buckets = buckets
    return loader


def train_source(cfg: PipelineConfig) -> Source | DreamBoothSource:
    """The examples of `cfg.data_loader` (listed, no image read yet)."""
    loader_cfg = cfg.data_loader
    if isinstance(loader_cfg, DreamboothSDDataLoaderConfig):
        return DreamBoothSource(loader_cfg, cfg.storage)
    return build_source(
        loader_cfg.dataset,
        cfg.storage,
        need_captions=needs_captions(loader_cfg),
        need_masks=cfg.use_masks,
    )


def scan_sizes(source: Source | DreamBoothSource) -> list[tuple[int, int]]:
    """Every image's (h, w) after EXIF orientation (parallel fetch, header parse)."""

    def size(index: int) -> tuple[int, int]:
        raw = source.fetch(index)
        return image_size_hw(raw.data, raw.id)

    return list(fetch_pool().map(size, range(len(source))))


# --- preflight -----------------------------------------------------------------------------


def check_mask(mask: MaskRef, image_hw: tuple[int, int], max_pixels: int) -> None:
    """The mask decodes and has its image's size (it is cropped and flipped with it)."""
    width, height = decode_mask(mask.data, mask.name, max_pixels).size
    if (height, width) != image_hw:
        raise DataError(
            f"{mask.name}: is {width}x{height} but its image is {image_hw[1]}x{image_hw[0]}",
            hint="save the mask at its image's size",
        )


@dataclass(frozen=True)
class PreflightReport:
    num_examples: int
    sizes_hw: list[tuple[int, int]]


def preflight(cfg: PipelineConfig, max_pixels: int = MAX_IMAGE_PIXELS) -> PreflightReport:
    """Read and decode every example once, before training; raise DataError naming the first
    bad file or line (and how many more are bad). Bounded parallel reads; never hangs."""
    loader_cfg = cfg.data_loader
    source = train_source(cfg)
    captions_needed = not isinstance(loader_cfg, DreamboothSDDataLoaderConfig) and needs_captions(
        loader_cfg
    )

    def check(index: int) -> tuple[int, int] | DataError:
        try:
            raw = source.fetch(index)
            name = source.url(index) if isinstance(source, DreamBoothSource) else raw.id
            image = decode_image(raw.data, name, max_pixels, draft_size=(64, 64))
            if captions_needed and raw.caption is None:
                return DataError(f"{raw.id}: no caption")
            size = image_size_hw(raw.data, name, max_pixels) if image else (0, 0)
            if raw.mask is not None:
                check_mask(raw.mask, size, max_pixels)
            return size
        except DataError as err:
            return err

    results = list(fetch_pool().map(check, range(len(source))))
    errors = [r for r in results if isinstance(r, DataError)]
    if errors:
        more = f" (and {len(errors) - 1} more bad examples)" if len(errors) > 1 else ""
        raise DataError(f"{errors[0].message}{more}", hint=errors[0].hint)
    sizes = [r for r in results if not isinstance(r, DataError)]
    return PreflightReport(num_examples=len(source), sizes_hw=sizes)
