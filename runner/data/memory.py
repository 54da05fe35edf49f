"""`keep_in_memory`: decoded images, already resized to their bucket's scale, kept under a
memory budget so epochs after the first do no I/O and no decode.

The images live in one shared-memory block that the main process creates before the
DataLoader starts its workers, so every worker (and the main process) sees what any of them
decoded: an example is fetched and decoded once per run, whichever worker draws it later.
Every kept example's size is known up front (its cover size at its bucket's scale, from the
preflight sizes), so each has a fixed slot: RGB pixels (3 bytes a pixel), then its `L` mask
if it has one, plus a ready flag, its original (w, h) and a checksum in the block's header.
A process that decodes an example writes the slot, then sets the flag; readers use ready
slots whose checksum matches (no memory barrier is assumed between processes: a slot seen
half-written on a weakly ordered CPU is decoded again, not used). Two processes decoding the
same example at once write identical bytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import weakref
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory

from PIL import Image

from kubetune.humanize import count

log = logging.getLogger(__name__)
BUDGET_SHARE = 0.5
"""Share of the memory available to this container that the decoded images may use."""
_READY = 1
_META = struct.Struct("<iiI")
"""Per slot: the original (w, h) and a CRC-32 of (w, h) + pixels."""


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


def default_budget() -> int:
    return int(memory_limit_bytes() * BUDGET_SHARE)


SHM_DIR = "/dev/shm"
SHM_SHARE = 0.75
"""Share of the free space of /dev/shm the block may take (the rest: the DataLoader's own
batch transfers). Writing past a full /dev/shm kills the process (SIGBUS), so the budget is
capped by it: Docker's default /dev/shm is 64 MiB; our pods mount a memory-backed one."""


def shm_free_bytes() -> int | None:
    """Free bytes in /dev/shm (None where there is none to ask)."""
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def capped_budget(budget: int) -> int:
    """`budget`, lowered (and logged) to what /dev/shm can hold."""
    free = shm_free_bytes()
    if free is None or budget <= free * SHM_SHARE:
        return budget
    capped = int(free * SHM_SHARE)
    log.warning(
        "keep_in_memory: %s has %d MiB free, so the decoded-image budget is %d MiB instead "
        "of %d MiB (give the container a bigger %s to keep more)",
        SHM_DIR,
        free >> 20,
        capped >> 20,
        budget >> 20,
        SHM_DIR,
    )
    return capped


@dataclass(frozen=True)
class Kept:
    """A decoded example resized to cover its bucket: image, original (w, h), mask."""

    image: Image.Image
    original_wh: tuple[int, int]
    mask: Image.Image | None = None


@dataclass(frozen=True)
class Slot:
    """Where one example lives in the block: its number (header position), pixel offset,
    kept (h, w) and whether an `L` mask follows the RGB pixels."""

    number: int
    offset: int
    hw: tuple[int, int]
    mask: bool

    @property
    def size(self) -> int:
        h, w = self.hw
        return h * w * (4 if self.mask else 3)


def plan_slots(
    wanted: Iterable[tuple[int, tuple[int, int], bool]], budget: int
) -> tuple[dict[int, Slot], int]:
    """Slots for (index, kept (h, w), has mask) in order, while they fit `budget` bytes
    (header included); returns them and the block's size."""
    items = list(wanted)
    header = len(items) * (1 + _META.size)
    slots: dict[int, Slot] = {}
    offset = header
    for index, hw, mask in items:
        slot = Slot(len(slots), offset, hw, mask)
        if offset + slot.size > budget:
            log.warning(
                "keep_in_memory: the decoded-image budget (%d MiB) holds %d of %s; "
                "the others are decoded on every draw",
                budget >> 20,
                len(slots),
                count(len(items), "image"),
            )
            break
        slots[index] = slot
        offset += slot.size
    return slots, offset


class DecodedImages:
    """Decoded images by example index in a block shared by the processes that load data.
    Only examples given a slot (those that fit the budget) are kept; a decoded image of
    another size than its slot's is not kept either. The block is unlinked when the object
    that created it is collected or its process exits (never by a worker's copy)."""

    def __init__(self, slots: dict[int, Slot], size: int, budget: int) -> None:
        self.slots, self.budget = slots, budget
        self._header = len(slots)
        self._shm = SharedMemory(create=True, size=max(1, size))
        self._shm.buf[: self._header] = bytes(self._header)
        self._release = weakref.finalize(self, _release, self._shm, os.getpid())

    @classmethod
    def planned(
        cls, wanted: Iterable[tuple[int, tuple[int, int], bool]], budget: int | None = None
    ) -> DecodedImages:
        budget = capped_budget(default_budget() if budget is None else budget)
        slots, size = plan_slots(wanted, budget)
        return cls(slots, size, budget)

    @property
    def name(self) -> str:
        """The block's name (under /dev/shm on Linux)."""
        return self._shm.name

    @property
    def size(self) -> int:
        """Bytes reserved (at most the budget)."""
        return self._shm.size if self.slots else 0

    @property
    def used(self) -> int:
        """Bytes of the examples kept so far."""
        return sum(s.size for s in self.slots.values() if self._ready(s))

    def __len__(self) -> int:
        return bytes(self._shm.buf[: self._header]).count(_READY)

    def _ready(self, slot: Slot) -> bool:
        return self._shm.buf[slot.number] == _READY

    def get(self, index: int) -> Kept | None:
        slot = self.slots.get(index)
        if slot is None or not self._ready(slot):
            return None
        buf, (h, w) = self._shm.buf, slot.hw
        meta = self._header + slot.number * _META.size
        ow, oh, crc = _META.unpack_from(buf, meta)
        data = bytes(buf[slot.offset : slot.offset + slot.size])
        if zlib.crc32(data, zlib.crc32(bytes(buf[meta : meta + 8]))) != crc:
            return None  # not (yet) visible whole to this process: decode it again
        view = memoryview(data)
        image = Image.frombytes("RGB", (w, h), view[: h * w * 3])
        mask = Image.frombytes("L", (w, h), view[h * w * 3 :]) if slot.mask else None
        return Kept(image, (ow, oh), mask)

    def put(self, index: int, kept: Kept) -> None:
        slot = self.slots.get(index)
        if slot is None or self._ready(slot) or not _fits(slot, kept):
            return
        data = kept.image.tobytes() + (kept.mask.tobytes() if kept.mask is not None else b"")
        wh = struct.pack("<ii", *kept.original_wh)
        buf, meta = self._shm.buf, self._header + slot.number * _META.size
        buf[slot.offset : slot.offset + slot.size] = data
        _META.pack_into(buf, meta, *kept.original_wh, zlib.crc32(data, zlib.crc32(wh)))
        buf[slot.number] = _READY  # last: readers take only complete slots

    def close(self) -> None:
        """Release the block now (unlinked if this process created it)."""
        self._release()

    def __getstate__(self) -> dict[str, object]:
        """A worker started by spawn / forkserver attaches to the same block by name."""
        return {"slots": self.slots, "budget": self.budget, "name": self._shm.name}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.slots, self.budget = state["slots"], state["budget"]  # type: ignore[assignment]
        self._header = len(self.slots)
        self._shm = SharedMemory(name=str(state["name"]))
        self._release = weakref.finalize(self, _release, self._shm, None)


def _fits(slot: Slot, kept: Kept) -> bool:
    """Whether `kept` is what `slot` was planned for (RGB at its size; a mask if planned)."""
    h, w = slot.hw
    if kept.image.mode != "RGB" or kept.image.size != (w, h):
        return False
    if (kept.mask is not None) != slot.mask:
        return False
    return kept.mask is None or (kept.mask.mode == "L" and kept.mask.size == (w, h))


def _release(shm: SharedMemory, owner: int | None) -> None:
    """Unmap the block; unlink it too in the process that created it (not in forked
    workers, which inherit this finalizer)."""
    with contextlib.suppress(BufferError):
        shm.close()
    if owner == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            shm.unlink()
