"""The dataset index: header-only preflight, reuse by a restarted run, invalidation of a
changed object, one listing for the whole run — counted through the real S3 server."""

from __future__ import annotations

import io
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import image_bytes, lora_config, upload_tree, write_image_dir, write_jsonl
from PIL import Image
from s3server import S3Server

from kubetune.dataset.headers import HEADER_BYTES
from kubetune.dataset.index import INDEX_KEY, DataIndex, save_index
from kubetune.layout import DATA_INDEX_KEY
from kubetune.storage import open_store
from kubetune.storage.cloud import CloudStore
from runner.data import build_train_dataloader, preflight

pytestmark = pytest.mark.timeout(120)


class Reads:
    """Counts the GETs and bytes the real CloudStore reads (the calls still go to the server)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.bytes = 0
        self.keys: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, kind: str, key: str, data: bytes) -> bytes:
        with self._lock:
            self.calls[kind] += 1
            self.bytes += len(data)
            self.keys[key] += 1
        return data


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Reads]:
    counter = Reads()
    get_bytes, get_range, list_ = CloudStore.get_bytes, CloudStore.get_range, CloudStore.list

    def counted_list(self: CloudStore, prefix: str = "") -> Iterator[object]:
        counter.calls["list"] += 1
        return list_(self, prefix)

    monkeypatch.setattr(
        CloudStore, "get_bytes", lambda s, k: counter.add("get", k, get_bytes(s, k))
    )
    monkeypatch.setattr(
        CloudStore,
        "get_range",
        lambda s, k, start, n: counter.add("range", k, get_range(s, k, start, n)),
    )
    monkeypatch.setattr(CloudStore, "list", counted_list)
    get_range_async = CloudStore.get_range_async

    async def counted_range_async(self: CloudStore, key: str, start: int, n: int) -> bytes:
        return counter.add("range", key, await get_range_async(self, key, start, n))

    monkeypatch.setattr(CloudStore, "get_range_async", counted_range_async)
    yield counter


def _big_jpeg(width: int, height: int, seed: int) -> bytes:
    """A JPEG far larger than HEADER_BYTES (noise does not compress)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95)
    return out.getvalue()


@pytest.fixture
def s3_jsonl(s3_env: S3Server, s3_bucket: str, tmp_path: Path) -> str:
    """An S3 JSONL dataset of 6 images of which 4 are bigger than one header read."""
    sizes = [(320, 200), (200, 320), (300, 300), (320, 200), (32, 48), (48, 32)]
    write_jsonl(tmp_path / "ds", sizes)
    for i, (w, h) in enumerate(sizes[:4]):
        (tmp_path / "ds" / "images" / f"pic-{i:03d}.jpg").write_bytes(_big_jpeg(w, h, i))
    upload_tree(s3_env.client(), s3_bucket, "ds", tmp_path / "ds")
    return f"s3://{s3_bucket}/ds"


def _cfg(jsonl_uri: str, tmp_path: Path) -> object:
    cfg = lora_config(
        {"type": "IMAGE_CAPTION_JSONL_DATASET", "jsonl_path": f"{jsonl_uri}/data.jsonl"},
        aspect_ratio_buckets={
            "target_resolution": 64,
            "start_dim": 32,
            "end_dim": 128,
            "divisible_by": 32,
        },
    )
    return cfg.model_copy(update={"base_output_dir": str(tmp_path / "run")})


def test_preflight_reads_headers_only(s3_jsonl: str, tmp_path: Path, reads: Reads) -> None:
    report = preflight(_cfg(s3_jsonl, tmp_path))
    images = [k for k in reads.keys if k.endswith(".jpg")]
    assert len(images) == 6 and all(reads.keys[k] == 1 for k in images)  # one read each
    assert reads.calls["get"] == 1  # the JSONL itself; every image is a ranged read
    assert reads.calls["range"] == 6
    jsonl = len(open_store(s3_jsonl).get_bytes("data.jsonl"))
    assert reads.bytes <= jsonl + 6 * HEADER_BYTES
    assert report.sizes_hw[:3] == [(200, 320), (320, 200), (300, 300)]
    assert report.scanned == 6 and report.reused == 0


def test_stored_index_is_reused_and_a_changed_object_rescanned(
    s3_env: S3Server, s3_jsonl: str, tmp_path: Path, reads: Reads
) -> None:
    cfg = _cfg(s3_jsonl, tmp_path)
    run_store = open_store(str(tmp_path / "run"))
    save_index(run_store, preflight(cfg, run_store=run_store))
    assert run_store.exists(INDEX_KEY)
    reads.calls.clear()
    reads.keys.clear()

    again = preflight(cfg, run_store=run_store)  # a restarted run: no image read at all
    assert again.reused == 6 and again.scanned == 0
    assert not [k for k in reads.keys if k.endswith(".jpg")]

    bucket, prefix = s3_jsonl[len("s3://") :].split("/", 1)
    new = image_bytes(40, 24, ".jpg", seed=99)  # same key, new content and shape
    s3_env.client().put_object(Bucket=bucket, Key=f"{prefix}/images/pic-002.jpg", Body=new)
    changed = preflight(cfg, run_store=run_store)
    assert changed.reused == 5 and changed.scanned == 1
    assert [k for k in reads.keys if k.endswith(".jpg")] == ["images/pic-002.jpg"]
    assert changed.sizes_hw[2] == (24, 40)


def test_one_listing_and_no_image_read_before_the_first_batch(
    s3_jsonl: str, tmp_path: Path, reads: Reads
) -> None:
    cfg = _cfg(s3_jsonl, tmp_path)
    run_store = open_store(str(tmp_path / "run"))
    save_index(run_store, preflight(cfg, run_store=run_store))
    reads.calls.clear()
    reads.keys.clear()
    data = preflight(cfg, run_store=run_store)
    loader = build_train_dataloader(cfg, seed=0, batch_size=2, device_is_cuda=False, data=data)
    assert reads.calls["list"] == 1  # one listing for preflight, buckets and loader
    assert not [k for k in reads.keys if k.endswith(".jpg")]
    batch = next(iter(loader))
    read = [k for k in reads.keys if k.endswith(".jpg")]
    assert 1 <= len(read) <= 2 + 2 * 2  # the first batch (+ at most two prefetched)
    assert batch["pixel_values"].shape[0] >= 1


def test_index_round_trip_and_local_versions(tmp_path: Path) -> None:
    write_image_dir(tmp_path / "d", [(40, 20), (20, 30)])
    cfg = lora_config({"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": str(tmp_path / "d")})
    report = preflight(cfg)
    assert report.index is not None
    index = DataIndex.from_bytes(report.index.to_bytes())
    assert index.entries == report.index.entries
    run_store = open_store(str(tmp_path / "run"))
    save_index(run_store, report)
    (tmp_path / "d" / "img-001.txt").write_text("a new caption, longer", encoding="utf-8")
    again = preflight(cfg, run_store=run_store)
    assert (again.reused, again.scanned) == (1, 1)  # a changed caption file rescans its example
    assert again.source is not None and again.source.records[1].caption == "a new caption, longer"


def test_long_exif_header_takes_a_second_ranged_read(
    s3_env: S3Server, s3_bucket: str, tmp_path: Path, reads: Reads
) -> None:
    """A JPEG whose EXIF block (40 KB, as a camera's with its thumbnail and maker notes) does
    not fit the first read: one more ranged read, of the rest of the header only (its size
    read from the JPEG markers), never the whole file; the EXIF orientation still swaps
    height and width."""
    exif = Image.Exif()
    exif[0x010E] = "x" * 40_000  # ImageDescription
    exif[0x0112] = 6  # rotated 90°: stored 320x200, shown 200x320
    out = io.BytesIO()
    pixels = np.random.default_rng(5).integers(0, 256, (200, 320, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(out, "JPEG", quality=95, exif=exif.tobytes())
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "long.jpg").write_bytes(out.getvalue())
    (tmp_path / "ds" / "long.txt").write_text("a long header")
    upload_tree(s3_env.client(), s3_bucket, "ds", tmp_path / "ds")
    cfg = lora_config({"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": f"s3://{s3_bucket}/ds"})
    report = preflight(cfg)
    assert report.sizes_hw == [(320, 200)]
    assert reads.calls["range"] == 2 and reads.keys["long.jpg"] == 2
    assert reads.calls["get"] == 1  # the caption file only
    header_end = _jpeg_scan_offset(out.getvalue())
    assert 40_000 < header_end < reads.bytes <= header_end + 8 * 1024 < len(out.getvalue())


def _jpeg_scan_offset(data: bytes) -> int:
    """Where the compressed data of a baseline JPEG starts (after its SOS segment)."""
    i = 2
    while data[i + 1] != 0xDA:
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")


def test_an_unreadable_stored_index_is_a_cache_miss_not_a_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The stored index only saves header reads: a store that fails reading it (retries
    exhausted) means a rescan with a warning, never a failed run."""
    from kubetune.dataset.index import load_index
    from kubetune.errors import StorageError
    from kubetune.storage import open_store

    class FailingReads:
        def __init__(self, inner: object) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def get_bytes(self, key: str) -> bytes:
            raise StorageError(f"read {key} failed after retries: 500 InternalError")

    with caplog.at_level("WARNING"):
        assert load_index(FailingReads(open_store(str(tmp_path)))) is None  # type: ignore[arg-type]
    assert "data index" in caplog.text and "500" in caplog.text


def test_cold_start_reads_headers_and_the_first_batches_only(
    s3_env: S3Server, s3_bucket: str, tmp_path: Path, reads: Reads
) -> None:
    """Bytes read before the first batch of a cold start (no stored index): the JSONL, one
    header read per image, and the images of the first batch plus the batches prefetched
    behind it (`PREFETCH_BATCHES`), not the dataset."""
    from runner.data.loader import PREFETCH_BATCHES

    sizes = [(320, 200), (200, 320)] * 12
    write_jsonl(tmp_path / "ds", sizes)
    images = {}
    for i, (w, h) in enumerate(sizes):
        images[f"images/pic-{i:03d}.jpg"] = data = _big_jpeg(w, h, seed=i)
        (tmp_path / "ds" / "images" / f"pic-{i:03d}.jpg").write_bytes(data)
    upload_tree(s3_env.client(), s3_bucket, "ds", tmp_path / "ds")
    cfg = _cfg(f"s3://{s3_bucket}/ds", tmp_path)
    batch_size = 2
    loader = build_train_dataloader(
        cfg, seed=0, batch_size=batch_size, device_is_cuda=False, data=preflight(cfg)
    )
    next(iter(loader))
    jsonl = (tmp_path / "ds" / "data.jsonl").stat().st_size
    most = batch_size * (1 + PREFETCH_BATCHES) * max(len(d) for d in images.values())
    assert reads.bytes <= jsonl + len(sizes) * HEADER_BYTES + most
    assert reads.bytes < sum(len(d) for d in images.values()) * 0.4
    assert reads.calls["list"] == 1


@pytest.mark.slow
def test_a_training_run_lists_its_dataset_once(
    s3_env: S3Server,
    s3_bucket: str,
    tmp_path: Path,
    reads: Reads,
    tiny_sd_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A whole run (preflight, buckets, loader, training steps) on an S3 dataset: one
    listing, one `Source` built from it, and each image's header read once (sizes for the
    buckets come from the index). The run stores the index; its restart, and a later run of
    another name on the same data, read no header."""
    from train_support import make_config, train, write_dataset

    import kubetune.dataset.preflight as checks
    import runner.data.loader as loader_module

    built: list[str] = []
    real_build = checks.build_source
    monkeypatch.setattr(
        checks, "build_source", lambda *a, **k: built.append("x") or real_build(*a, **k)
    )
    monkeypatch.setattr(loader_module, "preflight", lambda *a, **k: pytest.fail("second preflight"))
    upload_tree(s3_env.client(), s3_bucket, "ds", write_dataset(tmp_path / "local", n=4))
    cfg = make_config(
        "SD_LORA", tiny_sd_dir, tmp_path / "unused", tmp_path / "out", max_train_steps=2
    )
    data_loader = {**cfg.data_loader.model_dump(), "aspect_ratio_buckets": {
        "target_resolution": 64, "start_dim": 32, "end_dim": 128, "divisible_by": 32}}  # fmt: skip
    data_loader["dataset"] = {
        "type": "IMAGE_CAPTION_DIR_DATASET",
        "dataset_dir": f"s3://{s3_bucket}/ds",
    }
    cfg = type(cfg).model_validate({**cfg.model_dump(), "data_loader": data_loader})
    train(cfg)
    assert reads.calls["list"] == 1 and built == ["x"]
    assert reads.calls["range"] == 4  # one header read per image, none for the buckets
    assert (tmp_path / "out" / DATA_INDEX_KEY).is_file()

    for output in ("out", "later-run"):  # a restart, then another run on the same data
        reads.calls.clear()
        built.clear()
        again = {**cfg.model_dump(), "base_output_dir": str(tmp_path / output)}
        train(type(cfg).model_validate(again))
        assert reads.calls["list"] == 1 and built == ["x"] and reads.calls["range"] == 0


def _png_declaring(width: int, height: int, body: int) -> bytes:
    """A PNG whose header declares width x height pixels, followed by `body` bytes of
    (undecodable) image data: a decompression bomb as far as its header tells."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    noise = np.random.default_rng(1).integers(0, 256, body, dtype=np.uint8).tobytes()
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", header) + chunk(b"IDAT", noise) + chunk(b"IEND", b"")


def test_header_checks_refuse_bombs_and_formats_from_one_ranged_read(
    s3_env: S3Server, s3_bucket: str, tmp_path: Path, reads: Reads
) -> None:
    """A 300 KB PNG declaring 9000x9000 pixels (above the limit) and a GIF named .jpg are
    refused from their first ranged read: neither is read further."""
    from PIL import Image as PILImage

    from kubetune.dataset.preflight import verify_data
    from kubetune.errors import BadExamples

    write_image_dir(tmp_path / "ds", [(16, 16)] * 3)
    (tmp_path / "ds" / "img-001.png").write_bytes(_png_declaring(9000, 9000, 300_000))
    gif = io.BytesIO()
    PILImage.new("RGB", (16, 16)).save(gif, "GIF")
    (tmp_path / "ds" / "img-002.png").unlink()
    (tmp_path / "ds" / "img-002.jpg").write_bytes(gif.getvalue())
    (tmp_path / "ds" / "img-002.txt").write_text("a gif")
    upload_tree(s3_env.client(), s3_bucket, "ds", tmp_path / "ds")
    cfg = lora_config({"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": f"s3://{s3_bucket}/ds"})
    with pytest.raises(BadExamples) as err:
        preflight(cfg)
    assert "img-001.png: image is 9000x9000" in err.value.problems[0]
    assert "decompression-bomb guard" in err.value.problems[0]
    assert "img-002.jpg: unsupported image format GIF" in err.value.problems[1]
    assert reads.keys["img-001.png"] == 1 and reads.keys["img-002.jpg"] == 1
    assert reads.calls["range"] == 3 and reads.bytes < 3 * HEADER_BYTES + 100
    reads.keys.clear()
    with pytest.raises(BadExamples):
        verify_data(cfg)  # `launcher validate --data` does not download them either
    assert reads.keys["img-001.png"] == 1 and reads.keys["img-002.jpg"] == 1


def test_s3_headers_are_awaited_many_at_a_time_from_one_thread(
    s3_env: S3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a store with `Capability.ASYNC_READS` the first header reads are awaited, many in
    flight from one thread, and give the sizes and errors the thread pool gives."""
    import asyncio

    import kubetune.dataset.index as index_module

    sizes = [(40, 24), (24, 40), (32, 32), (48, 16)] * 6
    write_jsonl(tmp_path / "ds", sizes)
    (tmp_path / "ds/images/pic-005.jpg").write_bytes(b"not an image")
    upload_tree(s3_env.client(), s3_bucket, "ds", tmp_path / "ds")
    cfg = lora_config({"type": "IMAGE_CAPTION_JSONL_DATASET",
                       "jsonl_path": f"s3://{s3_bucket}/ds/data.jsonl"})  # fmt: skip
    seen = {"now": 0, "most": 0, "threads": set()}
    real = CloudStore.get_range_async

    async def watched(self: CloudStore, key: str, start: int, n: int) -> bytes:
        seen["now"] += 1
        seen["most"] = max(seen["most"], seen["now"])
        seen["threads"].add(threading.get_ident())
        await asyncio.sleep(0.01)  # the server here answers faster than the loop hands out
        try:
            return await real(self, key, start, n)
        finally:
            seen["now"] -= 1

    from kubetune.dataset.preflight import check_headers

    monkeypatch.setattr(CloudStore, "get_range_async", watched)
    awaited, awaited_bad = check_headers(cfg)
    assert seen["most"] > 4 and len(seen["threads"]) == 1
    monkeypatch.setattr(index_module, "reads_async", lambda *a: False)
    pooled, pooled_bad = check_headers(cfg)
    assert awaited.sizes_hw == pooled.sizes_hw and awaited.sizes_hw[5] == (0, 0)
    assert [str(e) for e in awaited_bad] == [str(e) for e in pooled_bad] != []
