"""`keep_in_memory`: decoded images kept at their bucket's scale give the same batches as
decoding every draw, and epochs after the first read and decode nothing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from data_fixtures import bucketed_dir_config as _cfg
from data_fixtures import write_image_dir

from kubetune.storage import LocalStore
from runner.data import build_train_dataloader
from runner.data.memory import DecodedImages, Kept

pytestmark = pytest.mark.timeout(120)
SIZES = [(288, 192), (192, 288), (240, 240), (360, 216), (216, 360), (192, 192)]


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts whole-object reads of the real local store."""
    counter: Counter[str] = Counter()
    original = LocalStore.get_bytes

    def counted(self: LocalStore, key: str) -> bytes:
        counter[f"{self.uri}/{key}"] += 1
        return original(self, key)

    monkeypatch.setattr(LocalStore, "get_bytes", counted)
    return counter


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts full image decodes by the loader (the real decoder still runs)."""
    import runner.data.train_dataset as loader_module

    counter: Counter[str] = Counter()
    original = loader_module.decode_image

    def counted(data: bytes, name: str, *args: Any, **kwargs: Any) -> Any:
        counter[name] += 1
        return original(data, name, *args, **kwargs)

    monkeypatch.setattr(loader_module, "decode_image", counted)
    return counter


def _epochs(cfg: object, n: int) -> tuple[list[list[dict]], object]:
    loader = build_train_dataloader(cfg, seed=3, batch_size=2, device_is_cuda=False)
    return [list(loader) for _ in range(n)], loader


def test_same_batches_as_decoding_every_draw(tmp_path: Path) -> None:
    write_image_dir(tmp_path / "d", SIZES, exts=(".png", ".jpg"))
    plain, _ = _epochs(_cfg(tmp_path / "d", keep=False), 2)
    kept, _ = _epochs(_cfg(tmp_path / "d", keep=True), 2)
    for a_epoch, b_epoch in zip(plain, kept, strict=True):
        for a, b in zip(a_epoch, b_epoch, strict=True):
            assert a["id"] == b["id"] and a["caption"] == b["caption"]
            assert torch.equal(a["pixel_values"], b["pixel_values"])
            assert torch.equal(a["crop_top_left_yx"], b["crop_top_left_yx"])
            assert torch.equal(a["original_size_hw"], b["original_size_hw"])


def test_later_epochs_read_and_decode_nothing(
    tmp_path: Path, reads: Counter[str], decodes: Counter[str]
) -> None:
    write_image_dir(tmp_path / "d", SIZES)
    loader = build_train_dataloader(
        _cfg(tmp_path / "d", keep=True), seed=3, batch_size=2, device_is_cuda=False
    )
    list(loader)
    first = sum(n for k, n in reads.items() if k.endswith(".png"))
    assert first == len(SIZES) and sum(decodes.values()) == len(SIZES)
    list(loader)
    list(loader)
    assert sum(n for k, n in reads.items() if k.endswith(".png")) == first
    assert sum(decodes.values()) == len(SIZES)  # each image decoded once, in the first epoch
    memory = loader.dataset.memory
    assert memory is not None and len(memory) == len(SIZES)
    buckets = {tuple(b["pixel_values"].shape[-2:]) for b in list(loader)}
    biggest = max(h * w for h, w in buckets)
    assert memory.used <= len(SIZES) * 3 * biggest * 3  # kept near bucket scale, not full


def test_budget_bounds_memory() -> None:
    """Only the slots that fit the whole budget (header included) are planned; the rest are
    never kept, and the shared block is no bigger than the budget."""
    from PIL import Image

    budget = 5 * 13 + 2 * 10 * 10 * 3  # header of 5 examples + two 10x10 RGB slots
    memory = DecodedImages.planned([(i, (10, 10), False) for i in range(5)], budget)
    for i in range(5):
        memory.put(i, Kept(Image.new("RGB", (10, 10), (i, i, i)), (10, 10)))
    assert len(memory) == 2 and memory.used == 600
    assert memory.size <= budget
    assert memory.get(2) is None and memory.get(1).image.getpixel((0, 0)) == (1, 1, 1)
    memory.close()


def test_a_decoded_image_of_another_size_than_its_slot_is_not_kept() -> None:
    from PIL import Image

    memory = DecodedImages.planned([(0, (10, 12), True), (1, (10, 10), False)], 10_000)
    memory.put(0, Kept(Image.new("RGB", (10, 10)), (10, 10), Image.new("L", (10, 10))))
    memory.put(1, Kept(Image.new("RGB", (10, 10)), (10, 10), Image.new("L", (10, 10))))
    assert len(memory) == 0
    memory.put(0, Kept(Image.new("RGB", (12, 10), 9), (24, 20), Image.new("L", (12, 10), 5)))
    got = memory.get(0)
    assert got is not None and got.original_wh == (24, 20)
    assert got.mask is not None and got.mask.getpixel((3, 3)) == 5
    memory.close()


_RSS_PROBE = """
import os
from PIL import Image
from runner.data.memory import DecodedImages, Kept
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
memory = DecodedImages.planned([(i, (1024, 1024), True) for i in range(40)], 2**40)
image, mask = Image.new("RGB", (1024, 1024), 7), Image.new("L", (1024, 1024), 9)
memory.put(0, Kept(image, (1024, 1024), mask))  # (Pillow's own buffers warmed up)
before = rss()
for i in range(1, 40):
    memory.put(i, Kept(image, (1024, 1024), mask))
print(rss() - before, memory.used - memory.slots[0].size)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux)")
def test_budget_counts_the_memory_really_held() -> None:
    """What the budget counts (3 bytes an RGB pixel, 1 a mask pixel) is what the kept images
    add to resident memory. In a fresh process: memory freed by earlier tests would hide
    the growth."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _RSS_PROBE], capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    grown, counted = map(int, out.stdout.split())
    assert abs(grown - counted) < 0.1 * counted, (grown, counted)


def test_the_budget_is_capped_by_the_free_space_of_dev_shm(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Writing past a full /dev/shm is a SIGBUS, so a small one (Docker's default 64 MiB)
    lowers the budget, said once. The free space is faked: making a small /dev/shm needs
    root; the block itself is real."""
    from PIL import Image

    from runner.data import memory as memory_module

    monkeypatch.setattr(memory_module, "shm_free_bytes", lambda: 1000)
    memory = DecodedImages.planned([(i, (10, 10), False) for i in range(5)], 10**9)
    assert memory.budget == 750 and memory.size <= 750
    assert len(memory.slots) == 2  # 5 * 13 header + 2 * 300 <= 750 < 3 * 300
    memory.put(1, Kept(Image.new("RGB", (10, 10)), (10, 10)))
    assert len(memory) == 1
    assert "/dev/shm has 0 MiB free" in caplog.text
    memory.close()
