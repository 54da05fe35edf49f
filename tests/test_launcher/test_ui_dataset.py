"""The UI's dataset preview on real data, local, on a real S3 server (SeaweedFS) and on a GCS
emulator (fake-gcs-server, with the run's outputs on GCS: `storage.provider: gcs`): count,
thumbnails with captions, the bucket histogram, the bad images the header preflight finds;
a missing bucket or an invalid form is a one-line error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from data_fixtures import upload_tree, write_image_dir
from gcs_emulator import FakeGCS
from s3server import S3Server

from kubetune.errors import KubetuneError, UserError
from launcher.ui.dataset_preview import preview
from launcher.ui.security import UiSettings

SIZES = [(64, 64), (96, 64), (64, 96), (128, 64), (64, 64)]
BUCKETS = {"target_resolution": 64, "start_dim": 32, "end_dim": 128, "divisible_by": 16}


def write_dataset(root: Path) -> Path:
    write_image_dir(root, SIZES)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "broken.txt").write_text("a broken image")
    return root


def form_values(dataset_dir: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "SD_LORA",
        "base_output_dir": "/tmp/kubetune-ui-preview-out",
        "max_train_steps": 10,
        "save_every_n_steps": 5,
        "data_loader": {
            "type": "IMAGE_CAPTION_SD_DATA_LOADER",
            "dataset": {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": dataset_dir},
            "aspect_ratio_buckets": BUCKETS,
        },
        **extra,
    }


def check(result: dict[str, Any]) -> None:
    assert result["count"] == len(SIZES) + 1
    assert [t["caption"] for t in result["thumbnails"]] == [f"caption {i}" for i in range(5)]
    assert all(t["data"].startswith("data:image/jpeg;base64,") for t in result["thumbnails"])
    assert sum(b["count"] for b in result["buckets"]) == len(SIZES)
    labels = {b["label"]: b["count"] for b in result["buckets"]}
    assert labels["64x64"] == 2 and len(labels) >= 3  # 1:1, 2:3, 3:2, 1:2 land apart
    assert result["bad_count"] == 1 and "broken.png" in result["bad"][0]


def test_preview_of_a_local_dataset(tmp_path: Path) -> None:
    check(preview(form_values(str(write_dataset(tmp_path / "data"))), UiSettings()))


def test_preview_of_an_s3_dataset(tmp_path: Path, s3_env: S3Server, s3_bucket: str) -> None:
    upload_tree(s3_env.client(), s3_bucket, "photos", write_dataset(tmp_path / "data"))
    storage = {"bucket": s3_bucket, "endpoint_url": s3_env.endpoint}
    check(preview(form_values(f"s3://{s3_bucket}/photos", storage=storage), UiSettings()))


def test_preview_of_a_gcs_dataset(tmp_path: Path, gcs_env: FakeGCS) -> None:
    bucket = gcs_env.create_bucket()
    gcs_env.upload_tree(bucket, "photos", write_dataset(tmp_path / "data"))
    storage = {"provider": "gcs", "bucket": bucket, "endpoint_url": gcs_env.endpoint}
    check(preview(form_values(f"gs://{bucket}/photos", storage=storage), UiSettings()))


def test_a_missing_bucket_and_an_invalid_form_are_one_line(s3_env: S3Server) -> None:
    storage = {"bucket": "no-such-bucket-here", "endpoint_url": s3_env.endpoint}
    values = form_values("s3://no-such-bucket-here/photos", storage=storage)
    with pytest.raises(KubetuneError) as err:
        preview(values, UiSettings())
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="fix the config first: max_train_steps"):
        preview(form_values("/nowhere", max_train_steps=0), UiSettings())


def test_beyond_loopback_the_dataset_must_be_under_the_roots(tmp_path: Path) -> None:
    settings = UiSettings(host="10.1.2.3", roots=[tmp_path / "root"])
    with pytest.raises(UserError, match="outside the folders"):
        preview(form_values(str(write_dataset(tmp_path / "data"))), settings)
