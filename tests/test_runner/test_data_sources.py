"""Every dataset type, from a local folder, from S3 (a real SeaweedFS server) and from GCS
(fake-gcs-server; the files put there through its JSON API, see tests/gcs_emulator.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_fixtures import (
    lora_config,
    ti_config,
    upload_tree,
    write_hf_dataset,
    write_image_dir,
    write_jsonl,
)
from gcs_emulator import FakeGCS
from s3server import S3Server

from kubetune.dataset.sources import build_source
from runner.data import build_train_dataloader

SIZES = [(40, 32), (32, 48), (64, 64), (50, 30), (36, 36)]


@pytest.fixture(params=["local", "s3", "gs"])
def where(request: pytest.FixtureRequest, tmp_path: Path):
    """Returns a function: local folder → URI of the same files (itself, or uploaded to S3 or
    GCS)."""
    if request.param == "local":
        return lambda local: str(local)
    if request.param == "gs":
        gcs: FakeGCS = request.getfixturevalue("gcs_env")
        gcs_bucket = gcs.create_bucket()

        def to_gs(local: Path) -> str:
            gcs.upload_tree(gcs_bucket, f"datasets/{local.name}", local)
            return f"gs://{gcs_bucket}/datasets/{local.name}"

        return to_gs
    server: S3Server = request.getfixturevalue("s3_env")
    bucket = request.getfixturevalue("s3_bucket")

    def to_s3(local: Path) -> str:
        prefix = f"datasets/{local.name}"
        upload_tree(server.client(), bucket, prefix, local)
        return f"s3://{bucket}/{prefix}"

    return to_s3


def _epoch(cfg, batch_size: int = 2) -> list[dict]:
    loader = build_train_dataloader(cfg, seed=1, batch_size=batch_size, device_is_cuda=False)
    batches = list(loader)
    assert len(batches) == len(loader)
    for batch in batches:
        b = len(batch["id"])
        assert batch["pixel_values"].shape == (b, 3, 32, 32)
        assert batch["pixel_values"].dtype == torch.float32
        assert batch["pixel_values"].min() >= -1.0 and batch["pixel_values"].max() <= 1.0
        assert batch["original_size_hw"].shape == (b, 2)
        assert batch["crop_top_left_yx"].shape == (b, 2)
        assert batch["original_size_hw"].dtype == torch.long
    return batches


def _captions_by_id(batches: list[dict]) -> dict[str, str]:
    return {i: c for b in batches for i, c in zip(b["id"], b["caption"], strict=True)}


def test_caption_dir_dataset(where, tmp_path: Path) -> None:
    expected = write_image_dir(tmp_path / "capdir", SIZES, exts=(".png", ".jpg", ".webp", ".bmp"))
    uri = where(tmp_path / "capdir")
    cfg = lora_config(
        {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": uri}, caption_prefix="trigger"
    )
    got = _captions_by_id(_epoch(cfg))
    assert got == {name: f"trigger {cap}" for name, cap in expected.items()}


def test_image_dir_dataset_with_templates(where, tmp_path: Path) -> None:
    expected = write_image_dir(tmp_path / "imgdir", SIZES, captions=False)
    uri = where(tmp_path / "imgdir")
    cfg = ti_config(
        {"type": "IMAGE_DIR_DATASET", "dataset_dir": uri}, caption_templates=["a photo of {}"]
    )
    got = _captions_by_id(_epoch(cfg))
    assert got == dict.fromkeys(expected, "a photo of <cat>")


def test_jsonl_dataset(where, tmp_path: Path) -> None:
    expected = write_jsonl(tmp_path / "js", SIZES)
    uri = where(tmp_path / "js")
    cfg = lora_config(
        {
            "type": "IMAGE_CAPTION_JSONL_DATASET",
            "jsonl_path": f"{uri}/data.jsonl",
            "keep_in_memory": True,
        }
    )
    loader = build_train_dataloader(cfg, seed=1, batch_size=2, device_is_cuda=False)
    first = list(loader)
    assert _captions_by_id(first) == expected
    second = list(loader)  # keep_in_memory: served from memory, same examples
    assert sorted(_captions_by_id(second)) == sorted(expected)


def test_jsonl_with_absolute_and_s3_image_uris(
    s3_env: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    rows = write_jsonl(tmp_path / "js", SIZES[:2])
    client = s3_env.client()
    upload_tree(client, s3_bucket, "elsewhere", tmp_path / "js" / "images")
    lines = [
        f'{{"image": "s3://{s3_bucket}/elsewhere/pic-000.jpg", "text": "remote"}}',
        f'{{"image": "{tmp_path / "js" / "images" / "pic-001.jpg"}", "text": "absolute"}}',
    ]
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines))
    cfg = lora_config(
        {"type": "IMAGE_CAPTION_JSONL_DATASET", "jsonl_path": str(tmp_path / "mixed.jsonl")}
    )
    got = _captions_by_id(_epoch(cfg))
    assert sorted(got.values()) == ["absolute", "remote"] and len(rows) == 2


def test_jsonl_on_s3_with_image_uris_on_gcs(
    s3_env: S3Server, s3_bucket: str, gcs_env: FakeGCS, tmp_path: Path
) -> None:
    """One dataset across two clouds: each image URI opens the store of its own scheme with
    that cloud's environment (the S3 endpoint never reaches GCS)."""
    write_jsonl(tmp_path / "js", SIZES[:2])
    bucket = gcs_env.create_bucket()
    gcs_env.upload_tree(bucket, "elsewhere", tmp_path / "js" / "images")
    lines = [f'{{"image": "gs://{bucket}/elsewhere/pic-00{i}.jpg", "text": "gcs {i}"}}'
             for i in range(2)]  # fmt: skip
    (tmp_path / "s3" / "mixed.jsonl").parent.mkdir()
    (tmp_path / "s3" / "mixed.jsonl").write_text("\n".join(lines))
    upload_tree(s3_env.client(), s3_bucket, "ds", tmp_path / "s3")
    cfg = lora_config(
        {"type": "IMAGE_CAPTION_JSONL_DATASET", "jsonl_path": f"s3://{s3_bucket}/ds/mixed.jsonl"}
    )
    assert sorted(_captions_by_id(_epoch(cfg)).values()) == ["gcs 0", "gcs 1"]


def test_hf_dataset_saved_to_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    expected = write_hf_dataset(tmp_path / "hf", SIZES)
    cfg = lora_config(
        {"type": "HF_HUB_IMAGE_CAPTION_DATASET", "dataset_name": str(tmp_path / "hf")}
    )
    assert _captions_by_id(_epoch(cfg)) == expected


def test_s3_listing_is_paginated_and_holds_no_bytes(
    s3_env: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    write_image_dir(tmp_path / "many", [(8, 8)] * 25, captions=False)
    upload_tree(s3_env.client(), s3_bucket, "many", tmp_path / "many")
    cfg = ti_config({"type": "IMAGE_DIR_DATASET", "dataset_dir": f"s3://{s3_bucket}/many"})
    source = build_source(cfg.data_loader.dataset, None, need_captions=False)
    assert len(source) == 25 and "_memory" not in vars(source)  # no bytes kept, ever
    assert source.fetch(3).data == (tmp_path / "many" / "img-003.png").read_bytes()
    assert [r.size for r in source.records] == [
        (tmp_path / "many" / f"img-{i:03d}.png").stat().st_size for i in range(25)
    ]  # sizes and ETags come from the listing


def test_worker_processes_give_the_same_batches(tmp_path: Path) -> None:
    write_image_dir(tmp_path / "d", SIZES)
    base = {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": str(tmp_path / "d")}
    results = []
    for workers in (0, 1):
        cfg = lora_config(base, dataloader_num_workers=workers, random_flip=True, center_crop=False)
        loader = build_train_dataloader(cfg, seed=3, batch_size=2, device_is_cuda=False)
        results.append(list(loader))
    for a, b in zip(*results, strict=True):
        assert a["id"] == b["id"]
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["crop_top_left_yx"], b["crop_top_left_yx"])
