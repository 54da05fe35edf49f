"""`TrainDataset`: one example's image, mask and caption, keyed by (index, epoch); unreadable
examples skipped or substituted so that no batch is ever empty."""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Sequence

from torch.utils.data import Dataset

from kubetune.dataset.captions import CaptionBuilder
from kubetune.dataset.images import decode_image, decode_mask
from kubetune.dataset.sources import Source, fetch_pool
from kubetune.errors import DataError
from kubetune.humanize import count
from runner.data.batch import Batch
from runner.data.buckets import derive_seed
from runner.data.dreambooth import FixedCaptions
from runner.data.memory import DecodedImages, Kept
from runner.data.streaming import StreamTargets
from runner.data.transforms import ImageTransform, cover, mask_to_tensor, to_tensor

Key = tuple[int, int] | tuple[int, int, tuple[int, int]]
"""An example as the dataset gets it: (index, epoch), or with its bucket's (h, w)."""
log = logging.getLogger(__name__)
MAX_SUBSTITUTES = 16
"""Examples tried in place of a batch whose examples are all unreadable."""


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
