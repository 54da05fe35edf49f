"""`keep_in_memory`: decoded images, already resized to their bucket's scale, kept under a
memory budget so epochs after the first do no I/O and no decode."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from PIL import Image

log = logging.getLogger(__name__)
BUDGET_SHARE = 0.5
"""Share of the memory available to this container that the decoded images may use."""
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
"""Bytes Pillow stores per pixel, by mode; every other mode (RGB included) takes 4."""


def memory_limit_bytes() -> int:
    """The container's memory limit (cgroup v2 / v1), else the machine's physical memory."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class Kept:
    """A decoded example resized to cover its bucket: image, original (w, h), mask."""

    image: Image.Image
    original_wh: tuple[int, int]
    mask: Image.Image | None = None

    @property
    def cost(self) -> int:
        """Bytes of pixel data held, as Pillow stores them (RGB takes 4 bytes a pixel)."""
        images = [self.image] + ([self.mask] if self.mask is not None else [])
        return sum(i.width * i.height * _PIXEL_BYTES.get(i.mode, 4) for i in images)


class DecodedImages:
    """Images by example index; adding one over the budget is refused (once logged), so
    memory stays bounded and the rest are decoded on each draw. ``indices``: the examples
    that may be kept (None: all), e.g. only a DreamBooth run's instance images."""

    def __init__(self, budget_bytes: int | None = None, indices: range | None = None) -> None:
        self.budget = budget_bytes if budget_bytes is not None else default_budget()
        self.indices = indices
        self.used = 0
        self._images: dict[int, Kept] = {}
        self._lock = threading.Lock()
        self._warned = False

    def __len__(self) -> int:
        return len(self._images)

    def get(self, index: int) -> Kept | None:
        return self._images.get(index)

    def put(self, index: int, kept: Kept) -> None:
        if self.indices is not None and index not in self.indices:
            return
        cost = kept.cost
        with self._lock:
            if index in self._images:
                return
            if self.used + cost > self.budget:
                if not self._warned:
                    log.warning(
                        "keep_in_memory: the decoded-image budget (%d MiB) is full after %d "
                        "images; the others are decoded on every draw",
                        self.budget >> 20,
                        len(self._images),
                    )
                    self._warned = True
                return
            self._images[index] = kept
            self.used += cost

    def __getstate__(self) -> dict[str, object]:
        """Worker processes start with an empty cache of the same budget."""
        return {"budget": self.budget}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(int(state["budget"]))  # type: ignore[misc, arg-type]


def default_budget() -> int:
    return int(memory_limit_bytes() * BUDGET_SHARE)
