"""Bad input: each gives a DataError naming the file or line, up front, never a hang."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_fixtures import (
    image_bytes,
    lora_config,
    ti_config,
    upload_tree,
    write_hf_dataset,
    write_image_dir,
    write_jsonl,
)
from s3server import S3Server

from kubetune.errors import DataError
from runner.data import build_train_dataloader, preflight, verify_data

pytestmark = pytest.mark.timeout(60)


def _capdir(path: Path) -> object:
    return lora_config({"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": str(path)})


def _jsonl(path: Path) -> object:
    return lora_config({"type": "IMAGE_CAPTION_JSONL_DATASET", "jsonl_path": str(path)})


def test_good_dataset_passes_and_reports_sizes(tmp_path: Path) -> None:
    write_image_dir(tmp_path / "d", [(40, 20), (20, 30)])
    report = preflight(_capdir(tmp_path / "d"))
    assert report.num_examples == 2 and report.sizes_hw == [(20, 40), (30, 20)]


def test_missing_image_in_jsonl(tmp_path: Path) -> None:
    write_jsonl(tmp_path, [(16, 16), (16, 16)])
    (tmp_path / "images" / "pic-001.jpg").unlink()
    with pytest.raises(DataError, match=r"images/pic-001\.jpg: file not found"):
        preflight(_jsonl(tmp_path / "data.jsonl"))


def test_truncated_image_names_the_file_and_counts_the_rest(tmp_path: Path) -> None:
    write_image_dir(tmp_path / "d", [(64, 64)] * 3)
    for name in ("img-001.png", "img-002.png"):
        path = tmp_path / "d" / name
        path.write_bytes(path.read_bytes()[:300])
    assert preflight(_capdir(tmp_path / "d")).num_examples == 3  # headers are intact
    with pytest.raises(DataError, match=r"img-001\.png: cannot decode.* \(and 1 more"):
        verify_data(_capdir(tmp_path / "d"))  # the full decode of `launcher validate --data`


def test_unreadable_image(tmp_path: Path) -> None:
    write_image_dir(tmp_path / "d", [(16, 16)])
    (tmp_path / "d" / "img-000.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"img-000\.png: not a readable image"):
        preflight(_capdir(tmp_path / "d"))


def test_non_utf8_caption(tmp_path: Path) -> None:
    write_image_dir(tmp_path / "d", [(16, 16)])
    (tmp_path / "d" / "img-000.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(DataError, match=r"img-000\.txt: caption is not valid UTF-8"):
        preflight(_capdir(tmp_path / "d"))


def test_missing_caption_file(tmp_path: Path) -> None:
    write_image_dir(tmp_path / "d", [(16, 16)] * 2)
    (tmp_path / "d" / "img-001.txt").unlink()
    with pytest.raises(DataError, match=r"img-001\.png: no caption file img-001\.txt"):
        preflight(_capdir(tmp_path / "d"))


def test_empty_dataset_and_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images")
    cfg = ti_config({"type": "IMAGE_DIR_DATASET", "dataset_dir": str(tmp_path / "empty")})
    with pytest.raises(DataError, match="empty: the dataset is empty"):
        preflight(cfg)
    with pytest.raises(DataError, match="empty: the dataset is empty"):
        build_train_dataloader(cfg, seed=0, batch_size=1, device_is_cuda=False)
    with pytest.raises(DataError, match="nope: no such folder"):
        preflight(_capdir(tmp_path / "nope"))


def test_jsonl_line_not_json_names_the_line(tmp_path: Path) -> None:
    write_jsonl(tmp_path, [(16, 16)] * 2)
    path = tmp_path / "data.jsonl"
    path.write_text(path.read_text() + "\n{not json\n")
    with pytest.raises(DataError, match=r"data\.jsonl:4: not valid JSON"):
        preflight(_jsonl(path))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('{"image": "images/pic-000.jpg", "text": "a"}, {"image": "x.jpg", "text": "b"}',
         r"data\.jsonl:3: not valid JSON \(Extra data\)"),
        ('{"image": "images/pic-000.jpg", "text": "a split\nline"}',
         r"data\.jsonl:3: not valid JSON \(Unterminated string"),
        ('["images/pic-000.jpg"]', r"data\.jsonl:3: expected a JSON object, got list"),
    ],
    ids=["two-objects", "split-string", "not-an-object"],
)  # fmt: skip
def test_jsonl_lines_that_join_into_valid_json_still_name_the_line(
    tmp_path: Path, extra: str, message: str
) -> None:
    """The lines are parsed as one array first; a file whose lines are not one object each
    (even where they join into valid JSON) is still refused naming its first bad line."""
    write_jsonl(tmp_path, [(16, 16)] * 2)
    path = tmp_path / "data.jsonl"
    path.write_text(path.read_text() + extra + "\n")
    with pytest.raises(DataError, match=message):
        preflight(_jsonl(path))


def test_jsonl_paths_are_keys_whatever_their_form(tmp_path: Path) -> None:
    """Plain relative paths are used as keys as they are; others are normalised first."""
    write_jsonl(tmp_path, [(16, 16)] * 3)
    path = tmp_path / "data.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["image"] = "./images//pic-001.jpg"
    rows[2]["image"] = str(tmp_path / "images" / "pic-002.jpg")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = preflight(_jsonl(path)).source
    assert source is not None
    assert [r.image_key for r in source.records] == [
        "images/pic-000.jpg",
        "images/pic-001.jpg",
        str(tmp_path / "images" / "pic-002.jpg").lstrip("/"),
    ]
    assert [r.store for r in source.records] == [0, 0, 1]


def test_jsonl_missing_column_names_the_line(tmp_path: Path) -> None:
    write_jsonl(tmp_path, [(16, 16)])
    path = tmp_path / "data.jsonl"
    path.write_text(path.read_text() + json.dumps({"image": "images/pic-000.jpg"}) + "\n")
    with pytest.raises(DataError, match=r"data\.jsonl:2: missing column 'text'"):
        preflight(_jsonl(path))


def test_hf_missing_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_hf_dataset(tmp_path / "hf", [(16, 16)])
    cfg = lora_config(
        {
            "type": "HF_HUB_IMAGE_CAPTION_DATASET",
            "dataset_name": str(tmp_path / "hf"),
            "caption_column": "caption",
        }
    )
    with pytest.raises(DataError, match=r"hf: missing column 'caption'"):
        preflight(cfg)


def test_oversized_image_is_refused(tmp_path: Path) -> None:
    write_image_dir(tmp_path / "d", [(64, 64)])
    with pytest.raises(DataError, match=r"img-000\.png: image is 64x64"):
        preflight(_capdir(tmp_path / "d"), max_pixels=1000)


def test_s3_key_escaping_the_dataset_prefix(
    s3_env: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    root = tmp_path / "js"
    write_jsonl(root, [(16, 16)])
    lines = (
        (root / "data.jsonl").read_text()
        + json.dumps({"image": "../secret/pic.jpg", "text": "x"})
        + "\n"
    )
    (root / "data.jsonl").write_text(lines)
    upload_tree(s3_env.client(), s3_bucket, "ds", root)
    s3_env.client().put_object(Bucket=s3_bucket, Key="secret/pic.jpg", Body=image_bytes(8, 8))
    cfg = lora_config(
        {"type": "IMAGE_CAPTION_JSONL_DATASET", "jsonl_path": f"s3://{s3_bucket}/ds/data.jsonl"}
    )
    with pytest.raises(
        DataError,
        match=r"data\.jsonl:2: image path '\.\./secret/pic\.jpg' "
        r"escapes the dataset folder",
    ):
        preflight(cfg)


def test_s3_missing_object_and_bad_caption(
    s3_env: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    write_image_dir(tmp_path / "d", [(16, 16)] * 2)
    (tmp_path / "d" / "img-001.txt").write_bytes(b"\xff\xfe bad")
    upload_tree(s3_env.client(), s3_bucket, "d", tmp_path / "d")
    cfg = lora_config({"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": f"s3://{s3_bucket}/d"})
    with pytest.raises(DataError, match=rf"s3://{s3_bucket}/d/img-001\.txt: caption is not"):
        preflight(cfg)
