"""`keep_in_memory` with DataLoader workers: one shared block for the main process and all
workers, so with 2 workers epochs after the first fetch and decode nothing, batches are the
same as decoding every draw, and no /dev/shm segment outlives the loader or the process."""

from __future__ import annotations

import functools
import gc
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from data_fixtures import bucketed_dir_config, write_image_dir
from PIL import Image

from kubetune.storage import LocalStore
from runner.data import build_train_dataloader
from runner.data.memory import DecodedImages, Kept

_cfg = functools.partial(bucketed_dir_config, workers=2)

pytestmark = pytest.mark.timeout(120)
SIZES = [(288, 192), (192, 288), (240, 240), (360, 216), (216, 360), (192, 192), (200, 300)]
SHM = Path("/dev/shm")


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Appends "fetch <key>" / "decode <name>" lines to a file from whichever process
    (forked workers inherit the patch; counters in memory would stay in the worker). The
    real store and decoder still run."""
    import runner.data.train_dataset as loader_module

    log = tmp_path / "events.log"
    get_bytes, decode = LocalStore.get_bytes, loader_module.decode_image

    def note(line: str) -> None:
        with open(log, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def counted_get(self: LocalStore, key: str) -> bytes:
        note(f"fetch {key}")
        return get_bytes(self, key)

    def counted_decode(data: bytes, name: str, *args: Any, **kwargs: Any) -> Any:
        note(f"decode {name}")
        return decode(data, name, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "get_bytes", counted_get)
    monkeypatch.setattr(loader_module, "decode_image", counted_decode)
    return log


def _counts(log: Path) -> Counter[str]:
    text = log.read_text(encoding="utf-8") if log.exists() else ""
    lines = [line for line in text.splitlines() if not line.endswith(".txt")]
    return Counter(line.split(" ", 1)[0] for line in lines)


def test_two_workers_fetch_and_decode_each_image_once(tmp_path: Path, events: Path) -> None:
    write_image_dir(tmp_path / "d", SIZES, exts=(".png", ".jpg"))
    loader = build_train_dataloader(
        _cfg(tmp_path / "d", keep=True), seed=3, batch_size=2, device_is_cuda=False
    )
    events.unlink(missing_ok=True)  # (preflight's reads are not the loader's)
    per_epoch = []
    for _ in range(3):
        before = _counts(events)
        assert len(list(loader)) > 0
        per_epoch.append(_counts(events) - before)
    n = len(SIZES)
    assert [(c["fetch"], c["decode"]) for c in per_epoch] == [(n, n), (0, 0), (0, 0)]
    assert len(loader.dataset.memory) == n


def _batches(cfg: object, epochs: int) -> list[list[dict]]:
    loader = build_train_dataloader(cfg, seed=3, batch_size=2, device_is_cuda=False)
    return [list(loader) for _ in range(epochs)]


def test_same_batches_as_decoding_every_draw_with_workers(tmp_path: Path) -> None:
    write_image_dir(tmp_path / "d", SIZES, exts=(".png", ".jpg"))
    plain = _batches(_cfg(tmp_path / "d", keep=False, workers=0), 3)
    kept = _batches(_cfg(tmp_path / "d", keep=True), 3)
    for a_epoch, b_epoch in zip(plain, kept, strict=True):
        assert len(a_epoch) == len(b_epoch)
        for a, b in zip(a_epoch, b_epoch, strict=True):
            assert a["id"] == b["id"] and a["caption"] == b["caption"]
            assert torch.equal(a["pixel_values"], b["pixel_values"])
            assert torch.equal(a["crop_top_left_yx"], b["crop_top_left_yx"])
            assert torch.equal(a["original_size_hw"], b["original_size_hw"])


def test_no_shm_segment_outlives_the_loader(tmp_path: Path) -> None:
    write_image_dir(tmp_path / "d", SIZES[:4])
    loader = build_train_dataloader(
        _cfg(tmp_path / "d", keep=True), seed=3, batch_size=2, device_is_cuda=False
    )
    list(loader)
    list(loader)
    name = loader.dataset.memory.name.lstrip("/")
    assert (SHM / name).exists()
    del loader
    gc.collect()
    assert not (SHM / name).exists()


_RUN_AND_EXIT = """
import sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from data_fixtures import lora_config
from runner.data import build_train_dataloader
cfg = lora_config({"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": sys.argv[1],
                   "keep_in_memory": True}, dataloader_num_workers=2)
loader = build_train_dataloader(cfg, seed=1, batch_size=2, device_is_cuda=False)
list(loader)
print(loader.dataset.memory.name, flush=True)
"""


@pytest.mark.slow
def test_no_shm_segment_outlives_the_process(tmp_path: Path) -> None:
    """A run that ends holding its loader (workers alive) leaves nothing in /dev/shm."""
    write_image_dir(tmp_path / "d", [(40, 40)] * 4)
    here = str(Path(__file__).parents[1])
    out = subprocess.run(
        [sys.executable, "-c", _RUN_AND_EXIT, str(tmp_path / "d"), here],
        capture_output=True, text=True, timeout=100, check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    name = out.stdout.split()[-1].lstrip("/")
    assert name.startswith("psm_") and not (SHM / name).exists(), out.stderr[-2000:]


def test_a_copy_attached_by_name_shares_the_images_and_does_not_unlink() -> None:
    """What a spawn / forkserver worker gets: the pickled store attaches to the same block;
    dropping that copy leaves the block to its creator."""
    memory = DecodedImages.planned([(0, (4, 6), False), (1, (4, 6), False)], 10_000)
    memory.put(0, Kept(Image.new("RGB", (6, 4), (1, 2, 3)), (12, 8)))
    copy = pickle.loads(pickle.dumps(memory))
    got = copy.get(0)
    assert got is not None and got.image.getpixel((5, 3)) == (1, 2, 3)
    assert got.original_wh == (12, 8)
    copy.put(1, Kept(Image.new("RGB", (6, 4), (7, 7, 7)), (6, 4)))
    assert memory.get(1) is not None and memory.get(1).image.getpixel((0, 0)) == (7, 7, 7)
    name = memory.name.lstrip("/")
    del copy
    gc.collect()
    assert (SHM / name).exists()
    memory.close()
    assert not (SHM / name).exists()


def test_a_slot_seen_half_written_is_not_used() -> None:
    """A reader that sees the ready flag before all of the slot's bytes (possible between
    processes on a weakly ordered CPU, simulated here by changing a byte after the write)
    decodes again rather than use wrong pixels."""
    memory = DecodedImages.planned([(0, (4, 6), True)], 10_000)
    memory.put(0, Kept(Image.new("RGB", (6, 4), (1, 2, 3)), (12, 8), Image.new("L", (6, 4), 4)))
    assert memory.get(0) is not None
    offset = memory.slots[0].offset + memory.slots[0].size - 1  # the mask's last pixel
    memory._shm.buf[offset] ^= 0xFF
    assert memory.get(0) is None
    memory.close()
