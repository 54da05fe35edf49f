"""The dataset index for every dataset type with listings (JSONL, caption folder, image
folder, DreamBooth instance + class folders), on local paths and on the real S3 server:
stored with the run, reused by a restart without reading an image, a changed object alone
re-read; and preflight memory that grows with the number of keys, not with their bytes.
(HF datasets have no listing: `test_data_index_shared.py` covers their fingerprint.)"""

from __future__ import annotations

import threading
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from data_fixtures import (
    image_bytes,
    lora_config,
    ti_config,
    upload_tree,
    write_image_dir,
    write_jsonl,
)
from test_data_index import _big_jpeg

from kubetune.config import SdLoraConfig
from kubetune.dataset.headers import HEADER_BYTES
from kubetune.dataset.index import save_index
from kubetune.storage import LocalStore, open_store
from kubetune.storage.cloud import CloudStore
from runner.data import preflight

pytestmark = pytest.mark.timeout(120)
SIZES = [(40, 24), (24, 40), (32, 32)]
IMAGE_SUFFIXES = (".png", ".jpg")


class ImageReads:
    """(store URI, key) of every image read (whole or ranged) by the real stores."""

    def __init__(self) -> None:
        self.keys: Counter[tuple[str, str]] = Counter()
        self.bytes = 0
        self._lock = threading.Lock()

    def add(self, store: Any, key: str, data: bytes) -> bytes:
        if key.endswith(IMAGE_SUFFIXES):
            with self._lock:
                self.keys[(store.uri, key)] += 1
                self.bytes += len(data)
        return data

    def clear(self) -> None:
        self.keys.clear()
        self.bytes = 0


@pytest.fixture
def image_reads(monkeypatch: pytest.MonkeyPatch) -> ImageReads:
    reads = ImageReads()
    for cls in (LocalStore, CloudStore):
        get_bytes, get_range = cls.get_bytes, cls.get_range

        def counted_get(s: Any, k: str, _get: Callable[..., bytes] = get_bytes) -> bytes:
            return reads.add(s, k, _get(s, k))

        def counted_range(
            s: Any, k: str, start: int, n: int, _range: Callable[..., bytes] = get_range
        ) -> bytes:
            return reads.add(s, k, _range(s, k, start, n))

        monkeypatch.setattr(cls, "get_bytes", counted_get)
        monkeypatch.setattr(cls, "get_range", counted_range)
    range_async = CloudStore.get_range_async

    async def counted_range_async(s: Any, k: str, start: int, n: int) -> bytes:
        return reads.add(s, k, await range_async(s, k, start, n))

    monkeypatch.setattr(CloudStore, "get_range_async", counted_range_async)
    return reads


def _dreambooth(instance: str, klass: str) -> SdLoraConfig:
    loader = {
        "type": "DREAMBOOTH_SD_DATA_LOADER",
        "resolution": 32,
        "instance_caption": "a photo of sks dog",
        "class_caption": "a photo of a dog",
        "instance_dataset": {"type": "IMAGE_DIR_DATASET", "dataset_dir": instance},
        "class_dataset": {"type": "IMAGE_DIR_DATASET", "dataset_dir": klass},
    }
    return SdLoraConfig.model_validate(
        {
            "base_output_dir": "/tmp/kubetune-test-out",
            "max_train_steps": 2,
            "save_every_n_steps": 2,
            "data_loader": loader,
        }  # fmt: skip
    )


def _dataset(kind: str, root: Path) -> tuple[Callable[[str], Any], str]:
    """Write `kind`'s files under `root`; returns (config for the dataset's URI, the path
    relative to `root` of the image that the test changes: the dataset's second example)."""
    if kind == "jsonl":
        write_jsonl(root, SIZES)
        dataset = {"type": "IMAGE_CAPTION_JSONL_DATASET"}
        return lambda uri: lora_config({**dataset, "jsonl_path": f"{uri}/data.jsonl"}), (
            "images/pic-001.jpg"
        )
    if kind == "caption_dir":
        write_image_dir(root, SIZES)
        dataset = {"type": "IMAGE_CAPTION_DIR_DATASET"}
        return lambda uri: lora_config({**dataset, "dataset_dir": uri}), "img-001.png"
    if kind == "image_dir":
        write_image_dir(root, SIZES, captions=False)
        dataset = {"type": "IMAGE_DIR_DATASET"}
        return lambda uri: ti_config({**dataset, "dataset_dir": uri}), "img-001.png"
    write_image_dir(root / "instance", SIZES[:1], captions=False)
    write_image_dir(root / "class", SIZES[1:], captions=False)
    return lambda uri: _dreambooth(f"{uri}/instance", f"{uri}/class"), "class/img-000.png"


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("kind", ["jsonl", "caption_dir", "image_dir", "dreambooth"])
def test_index_reused_by_a_restart_and_a_changed_object_reread(
    kind: str, where: str, tmp_path: Path, image_reads: ImageReads, request: pytest.FixtureRequest
) -> None:
    root = tmp_path / "ds"
    config_for, changed = _dataset(kind, root)
    uri = str(root)
    client = None
    if where == "s3":
        server, bucket = request.getfixturevalue("s3_env"), request.getfixturevalue("s3_bucket")
        client = server.client()
        upload_tree(client, bucket, "ds", root)
        uri = f"s3://{bucket}/ds"
    cfg = config_for(uri)
    run_store = open_store(str(tmp_path / "run"))
    first = preflight(cfg, run_store=run_store)
    save_index(run_store, first)
    assert (first.reused, first.scanned) == (0, len(SIZES))
    assert len(image_reads.keys) == len(SIZES)

    image_reads.clear()
    again = preflight(cfg, run_store=run_store)  # a restarted run
    assert (again.reused, again.scanned) == (len(SIZES), 0)
    assert image_reads.keys == Counter() and again.sizes_hw == first.sizes_hw

    new = image_bytes(20, 36, Path(changed).suffix, seed=9)  # same name, new size and bytes
    (root / changed).write_bytes(new)
    if client is not None:
        client.put_object(Bucket=uri.split("/")[2], Key=f"ds/{changed}", Body=new)
    image_reads.clear()
    rescanned = preflight(cfg, run_store=run_store)
    assert (rescanned.reused, rescanned.scanned) == (len(SIZES) - 1, 1)
    assert [key for _, key in image_reads.keys] == [Path(changed).name if kind != "jsonl"
                                                    else changed]  # fmt: skip
    assert rescanned.sizes_hw[1] == (36, 20)


def test_preflight_memory_grows_with_keys_not_bytes(tmp_path: Path) -> None:
    """24 noise JPEGs of ~330 KB (7.7 MB) indexed with a peak far below their bytes: only headers
    are read, and each is dropped once its size is known."""
    root = tmp_path / "big"
    write_image_dir(root, [(8, 8)] * 24)
    total = 0
    for i in range(24):
        data = _big_jpeg(600, 450, seed=i)
        (root / f"img-{i:03d}.png").unlink()
        (root / f"img-{i:03d}.jpg").write_bytes(data)
        (root / f"img-{i:03d}.txt").write_text(f"caption {i}")
        total += len(data)
    cfg = lora_config({"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": str(root)})
    preflight(cfg)  # warm imports and the fetch pool outside the measurement
    tracemalloc.start()
    try:
        report = preflight(cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.sizes_hw == [(450, 600)] * 24
    assert total > 6_000_000
    assert peak < 16 * HEADER_BYTES + 512 * 1024, (peak, total)  # 16 parallel reads
