"""The training DataLoader: source → captions → transforms → buckets, resumable mid-epoch."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

from kubetune.config.data import DreamboothSDDataLoaderConfig
from kubetune.config.training_types import PipelineConfig
from kubetune.dataset.buckets import assign_buckets
from kubetune.dataset.captions import CaptionBuilder
from kubetune.dataset.images import decode_image, decode_mask
from kubetune.dataset.preflight import PreflightReport, preflight, streams_sizes
from kubetune.dataset.size_feed import SizeFeed
from kubetune.dataset.sources import Source, fetch_pool
from kubetune.errors import DataError
from kubetune.humanize import count
from kubetune.storage import fork_safe, is_remote
from runner.data.buckets import (
    BucketBatchSampler,
    Slots,
    build_buckets,
    derive_seed,
)
from runner.data.dreambooth import DreamBoothBatchSampler, FixedCaptions
from runner.data.loader_settings import LoaderConfig, LoaderSettings
from runner.data.memory import DecodedImages, Kept
from runner.data.streaming import StreamingBucketSampler, StreamTargets
from runner.data.transforms import (
    ImageTransform,
    cover,
    cover_hw,
    mask_to_tensor,
    resolution_hw,
    to_tensor,
)

Batch = dict[str, Any]
Key = tuple[int, int] | tuple[int, int, tuple[int, int]]
"""An example as the dataset gets it: (index, epoch), or with its bucket's (h, w)."""
T = TypeVar("T")
log = logging.getLogger(__name__)
MAX_SUBSTITUTES = 16
"""Examples tried in place of a batch whose examples are all unreadable."""
PREFETCH_BATCHES = 2
"""Batches prepared ahead of the consumer (in-process loading); memory is O(this)."""
PREFETCH_STOP_WAIT_S = 1.0
"""How long closing the loader waits for its prefetch thread to stop. One still busy then
(waiting for a streamed image size that has not arrived) is left to end on its own: it
is a daemon and stops at its next batch."""


class TrainDataset(Dataset[Batch]):
    """Examples keyed by (index, epoch): each draw's crop/flip/caption comes from
    (seed, epoch, index), so results do not depend on workers or on resuming.

    An example that turns out undecodable is skipped (logged, listed in the batch's
    ``"skipped"``); a batch whose examples are all bad takes the next good example of its
    bucket instead, so no batch is ever empty. With ``memory`` (``keep_in_memory``) decoded
    images are kept resized to their bucket's scale: later draws only crop and flip.
    """

    def __init__(
        self,
        source: Source,
        captions: CaptionBuilder | FixedCaptions,
        transform: ImageTransform,
        target_hw: Sequence[tuple[int, int]],
        seed: int,
        memory: DecodedImages | None = None,
        loss_weights: Sequence[float] | None = None,
        caption_dropout_rate: float = 0.0,
    ) -> None:
        self.source, self.captions, self.transform = source, captions, transform
        self.caption_dropout_rate = caption_dropout_rate
        """Probability of training on the empty caption (kohya's caption dropout)."""
        # a streaming order's targets are looked up as the sizes arrive: never all at once
        streamed = isinstance(target_hw, StreamTargets)
        self.target_hw = target_hw if streamed else list(target_hw)
        self.seed = seed
        self.memory = memory
        self.loss_weights = None if loss_weights is None else list(loss_weights)

    def __len__(self) -> int:
        return len(self.source)

    def _image(self, index: int, target: tuple[int, int]) -> Kept:
        """The decoded image (and mask) resized to cover the example's bucket (`target`):
        what `keep_in_memory` keeps; each draw then only crops and flips it."""
        kept = self.memory.get(index) if self.memory is not None else None
        if kept is not None:
            return kept
        raw = self.source.fetch(index)
        image = decode_image(raw.data, raw.id)
        mask = None
        if raw.mask is not None:
            mask = cover(decode_mask(raw.mask.data, raw.mask.name), target, image.size)
        kept = Kept(cover(image, target), image.size, mask)
        if self.memory is not None:
            self.memory.put(index, kept)
        return kept

    def load(self, key: Key) -> Batch:
        """Example ``key`` = (index, epoch) or (index, epoch, its bucket's (h, w)) (the
        streaming order's keys: the size need not be looked up)."""
        index, epoch, target = self._key(key)
        kept = self._image(index, target)
        rng = random.Random(derive_seed("image", self.seed, epoch, index))
        place = self.transform.plan(kept.original_wh, target, rng)
        item: Batch = {
            "pixel_values": to_tensor(place.apply(kept.image)),
            "caption": self.caption(index, epoch),
            "original_size_hw": place.original_hw,
            "crop_top_left_yx": place.crop_yx,
            "id": self.source.records[index].id,
            "flipped": place.flip,
            "index": index,
        }
        if kept.mask is not None:
            item["mask"] = mask_to_tensor(place.apply(kept.mask))
        if self.loss_weights is not None:
            item["loss_weight"] = self.loss_weights[index]
        return item

    def caption(self, index: int, epoch: int) -> str:
        """The final caption of an example in an epoch (no image read; its caption file is
        read only while the header checks, which read them all, run beside training)."""
        rec = self.source.records[index]
        rng = random.Random(derive_seed("caption", self.seed, epoch, index))
        caption = self.captions.build(self.source.caption(index), rng, rec.id)
        if self.caption_dropout_rate:  # its own stream: the rate changes no other draw
            drop_rng = random.Random(derive_seed("caption-dropout", self.seed, epoch, index))
            caption = "" if drop_rng.random() < self.caption_dropout_rate else caption
        return caption

    def _key(self, key: Key) -> tuple[int, int, tuple[int, int]]:
        if len(key) == 3:
            return key  # type: ignore[return-value]
        return key[0], key[1], self.target_hw[key[0]]

    def try_load(self, key: Key) -> Batch | DataError:
        """`load`, or the DataError of an undecodable / missing example (logged)."""
        try:
            return self.load(key)
        except DataError as err:
            log.warning("skipping a bad example: %s", err)
            return err

    def __getitem__(self, key: Key) -> Batch:
        return self.load(key)

    def __getitems__(self, keys: Sequence[Key]) -> list[Batch]:
        """A whole batch: fetch + decode + transform in the bounded parallel pool."""
        if len(keys) <= 1:
            loaded = [self.try_load(k) for k in keys]
        else:
            loaded = list(fetch_pool().map(self.try_load, keys))
        items = [it for it in loaded if not isinstance(it, DataError)]
        bad = [err.message for err in loaded if isinstance(err, DataError)]
        if not items:
            items = [self._substitute(keys[0], bad)]
        if bad:
            items[0] = {**items[0], "skipped": bad}
        return items

    def _substitute(self, key: Key, bad: list[str]) -> Batch:
        """The next good example of the same bucket (bounded search). In the streaming
        order the next good example whatever its bucket, cropped to this one: which sizes
        have arrived (in a loader worker: those known when it started) must not change
        which example it is, or a resumed run, another rank or a worker would differ."""
        index, epoch, target = self._key(key)
        n = len(self.target_hw)
        later = (j % n for j in range(index + 1, index + n))
        if not isinstance(self.target_hw, StreamTargets):
            later = (j for j in later if self.target_hw[j] == target)
        for j in itertools.islice(later, MAX_SUBSTITUTES):
            item = self.try_load((j, epoch, target))
            if not isinstance(item, DataError):
                return item
            bad.append(item.message)
        raise DataError(
            f"{count(len(bad), 'example')} in a row are unreadable: {'; '.join(bad[:3])}",
            hint="check the dataset with `launcher validate --data`",
        )


def _own_process_group(_worker_id: int) -> None:
    """A loader worker leaves its training process's process group: torchrun stops a worker
    (SIGTERM, preemption) by signalling its whole group, and a loader worker killed by it
    made the training process fail ('DataLoader worker ... is killed by signal') instead
    of writing its stop checkpoint. The worker still ends with its training process (the
    DataLoader shuts it down; it exits when its parent is gone)."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)


def _worker_context(source: Source, num_workers: int) -> str | None:
    """How DataLoader workers start: forked (the default), unless they read a cloud store
    after this process opened one (obstore's runtime does not survive a fork; see
    ``kubetune.storage.fork_safe``): then from a clean forkserver process, which the dataset
    reaches pickled, each worker with its own client."""
    remote = any(is_remote(ref.uri) for ref in source.stores)
    return "forkserver" if num_workers and remote and not fork_safe() else None


def collate(items: list[Batch]) -> Batch:
    """Stack examples of one bucket into the batch format of docs/architecture.md (plus
    ``"skipped"``: messages naming the bad examples left out of this batch, if any)."""
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
        "flipped": [bool(it.get("flipped", False)) for it in items],
        "index": [it.get("index", -1) for it in items],
    }
    if "mask" in items[0]:
        batch["mask"] = torch.stack([it["mask"] for it in items])
    if "loss_weight" in items[0]:
        batch["loss_weight"] = torch.tensor(
            [it["loss_weight"] for it in items], dtype=torch.float32
        )
    skipped = [message for it in items for message in it.get("skipped", [])]
    if skipped:
        batch["skipped"] = skipped
    return batch


class _Plan:
    """The batch_sampler the DataLoader sees: the rest of the current epoch, keyed by epoch."""

    def __init__(self, sampler: BucketBatchSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[Any]]:
        return self.sampler.remaining()  # from the cursor now: workers may run ahead of it


class ResumableLoader:
    """Iterates the current epoch's remaining batches. The sampler owns the data cursor: it
    advances as each batch is handed to the consumer (never as workers prefetch), so
    `state_dict` (the sampler's) makes a restored loader yield exactly the batches not yet
    consumed. After an epoch's last batch the cursor is at the next epoch's start."""

    def __init__(
        self,
        dataset: TrainDataset,
        sampler: BucketBatchSampler,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        max_bad: int = 0,
    ) -> None:
        self.dataset, self.sampler, self.num_workers = dataset, sampler, num_workers
        self.max_bad = max_bad
        """How many unreadable examples may be skipped before the run stops."""
        self.bad: dict[str, None] = {}
        self.on_bad: Callable[[list[str]], None] | None = None
        """Called with every skipped example's message so far (e.g. to note progress)."""
        self.buckets: list[tuple[int, int]] = []
        self.checks: Future[PreflightReport] | None = None
        """The dataset's header checks when they run beside training (`PreflightReport.pending`)."""
        self.on_checked: Callable[[PreflightReport], None] | None = None
        """Called once with the checked report (e.g. to store the dataset index)."""
        self.together: Together | None = None
        """Several processes (`runner.training.distributed.Ranks`): the checks are global
        rank 0's (the other ranks' `checks` never end), the skipped examples count over every
        rank, and every rank settles both at the same step (`settle`)."""
        self.verdict_due = False
        """Several processes: this rank wants `settle` (rank 0's checks ended, or this rank
        met an unreadable example); the loop's per-step vote carries it."""
        self._loader = DataLoader(
            dataset,
            batch_sampler=_Plan(sampler),
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            prefetch_factor=2 if num_workers else None,
            multiprocessing_context=_worker_context(dataset.source, num_workers),
            worker_init_fn=_own_process_group if num_workers else None,
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def bucket_sizes(self) -> list[tuple[int, int]]:
        """The bucket sizes (h, w) the batches may have (streaming: every bucket's)."""
        if isinstance(self.dataset.target_hw, StreamTargets):
            return list(self.buckets)
        return sorted(set(self.dataset.target_hw))

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """Examples per bucket size ({} while a streaming order is still reading sizes)."""
        targets = self.dataset.target_hw
        if isinstance(targets, StreamTargets) and not targets.feed.complete:
            return {}
        return dict(sorted(Counter(targets[i] for i in range(len(targets))).items()))

    def estimated_len(self) -> int:
        """Batches per epoch without waiting for image sizes: `len` but for the streaming
        order before every size is known (then the fewest possible, a lower bound)."""
        estimate = getattr(self.sampler, "estimated_len", None)
        return estimate() if estimate is not None else len(self.sampler)

    def _count_bad(self, messages: list[str]) -> None:
        """Record skipped examples; past ``max_bad`` stop with a DataError listing them. While
        header checks run beside training, they are awaited first: a bad header fails the
        run with their error, as before step 1."""
        self.poll_checks(wait=True)
        self.bad.update(dict.fromkeys(messages))
        if self.on_bad is not None:
            self.on_bad(list(self.bad))
        if self.together is not None:  # several processes: counted over every rank, together
            self.verdict_due = True
        else:
            self._check_bad_limit()

    def _check_bad_limit(self) -> None:
        if len(self.bad) > self.max_bad:
            total = len(self.dataset)
            listed = "; ".join(list(self.bad)[:10]) + (" ..." if len(self.bad) > 10 else "")
            raise DataError(
                f"data_loader.max_bad_image_share: {len(self.bad)} of "
                f"{count(total, 'example')} are unreadable, more than the {self.max_bad} "
                f"allowed: {listed}",
                hint="fix or remove them (`launcher validate --data` lists them all), or "
                "raise data_loader.max_bad_image_share",
            )

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)

    def poll_checks(self, wait: bool = False) -> None:
        """Once the header checks running beside training end (now, or at once with
        ``wait``): raise the DataError naming the first bad example, as the preflight would
        have, or hand the checked report to ``on_checked``."""
        if self.checks is None or not (wait or self.checks.done()):
            return
        if self.together is not None:  # not on one rank alone: the loop's vote settles them
            self.verdict_due = True
            return
        checks, self.checks = self.checks, None
        self._resolve(checks)

    def _resolve(self, checks: Future[PreflightReport]) -> None:
        report = checks.result()
        if self.on_checked is not None:
            self.on_checked(report)

    def settle(self) -> None:
        """Several processes, every rank at the same step: global rank 0 waits for its header
        checks (while they run); their DataError is raised on every rank (exit 2 everywhere,
        not a lost peer), else rank 0 hands the report to ``on_checked``. Then every rank's
        skipped examples count against ``max_bad``: the same error on every rank past it."""
        if self.together is None:
            return
        checks, self.checks, self.verdict_due = self.checks, None, False
        if checks is not None:  # on every rank alike: only `settle` ends them
            self.together.from_rank_0(lambda: self._resolve(checks))
        mine = list(self.bad)
        self.bad = dict.fromkeys(m for bad in self.together.gather(mine) for m in bad)
        if list(self.bad) != mine and self.on_bad is not None:  # the same list on every rank
            self.on_bad(list(self.bad))
        self._check_bad_limit()

    def end_checks(self) -> None:
        """As the run finishes: the header checks still running are waited for (settled by
        every rank together with several processes)."""
        if self.together is not None:
            self.settle()
        else:
            self.poll_checks(wait=True)

    def __iter__(self) -> Iterator[Batch]:
        batches: Iterator[Batch] = iter(self._loader)
        if self.num_workers == 0:
            batches = _ahead(batches, PREFETCH_BATCHES)
        try:
            for batch in batches:
                self.poll_checks()
                place(batch, self.sampler.slots(self.sampler.epoch, self.sampler.position))
                self.sampler.advance()
                if "skipped" in batch:
                    self._count_bad(batch.pop("skipped"))
                yield batch
        finally:  # stop the prefetch thread here, not whenever the generator is collected
            close = getattr(batches, "close", None)
            if close is not None:
                close()


class Together(Protocol):
    """What the loader needs of a multi-process run's ranks (`Ranks`)."""

    def from_rank_0(self, work: Callable[[], T]) -> T: ...

    def gather(self, value: T) -> list[T]: ...


def place(batch: Batch, slots: Slots) -> None:
    """Tell the batch where its examples sit in their global batch (``Batch`` keys
    ``rows``, ``global_size``, ``share``: see ``Slots``). An example that replaced an
    unreadable one takes the first free row."""
    free = dict(zip(slots.indices, zip(slots.rows, slots.shares(), strict=True), strict=True))
    rows, shares = [], []
    for index in batch["index"]:
        row, share = free.pop(index) if index in free else free.pop(next(iter(free)))
        rows.append(row)
        shares.append(share)
    batch["rows"] = rows
    batch["global_size"] = slots.size
    batch["share"] = shares  # host floats: deciding on them needs no device sync


def cache_batches(loader: ResumableLoader, skip: set[int] | None = None) -> Iterator[Batch]:
    """Every example once (but those in `skip`), for filling the latent / text caches: the
    sampler's covering batches (epoch 0's, whatever epoch a resumed run is in, so caches are
    identical across resumes) cut into per-process batches. The loader's position does not
    move."""
    sampler, dataset = loader.sampler, loader.dataset
    size = sampler.batch_size
    for batch in sampler.cover_batches():
        batch = [i for i in batch if not skip or i not in skip]
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
        deadline = time.monotonic() + PREFETCH_STOP_WAIT_S
        while thread.is_alive() and thread is not threading.current_thread():
            with contextlib.suppress(queue.Empty):
                items.get_nowait()
            if time.monotonic() > deadline:
                log.debug("the prefetch thread is still busy; it stops at its next batch")
                break
            thread.join(timeout=0.05)


# --- building ------------------------------------------------------------------------------


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
