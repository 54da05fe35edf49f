"""`use_masks` (invoke-training's masked loss), the data half: the JSONL `mask` column (relative,
absolute or s3:// paths), masks transformed exactly like their images, bad masks caught by
preflight naming the JSONL line, and the config rules."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from data_fixtures import upload_tree, write_masked_jsonl
from PIL import Image
from s3server import S3Server

from kubetune.config import SdLoraConfig, SdTextualInversionConfig, parse_config
from kubetune.errors import ConfigError, DataError
from runner.data import build_train_dataloader, preflight

pytestmark = pytest.mark.timeout(60)
_COMMON = {"base_output_dir": "/tmp/kubetune-test-out", "max_train_steps": 4}
_COMMON["save_every_n_steps"] = 2


def lora_cfg(jsonl: str, use_masks: bool = True, **loader: Any) -> SdLoraConfig:
    dataset = {"type": "IMAGE_CAPTION_JSONL_DATASET", "jsonl_path": jsonl}
    data = {"type": "IMAGE_CAPTION_SD_DATA_LOADER", "dataset": dataset, "resolution": 32}
    raw = {**_COMMON, "use_masks": use_masks, "data_loader": {**data, **loader}}
    return SdLoraConfig.model_validate(raw)


def ti_cfg(jsonl: str) -> SdTextualInversionConfig:
    dataset = {"type": "IMAGE_CAPTION_JSONL_DATASET", "jsonl_path": jsonl}
    raw = {
        **_COMMON,
        "use_masks": True,
        "placeholder_token": "<cat>",
        "initializer_token": "cat",
        "data_loader": {"dataset": dataset, "resolution": 32, "caption_preset": "object"},
    }
    return SdTextualInversionConfig.model_validate(raw)


def _batches(cfg: Any, epochs: int = 1) -> list[dict[str, Any]]:
    loader = build_train_dataloader(cfg, seed=3, batch_size=2, device_is_cuda=False)
    return [b for _ in range(epochs) for b in loader]


SIZES = [(48, 32), (32, 56), (40, 40), (70, 30)]


# --- reading the mask column -----------------------------------------------------------------


def test_batches_carry_masks_in_zero_one(tmp_path: Path) -> None:
    jsonl = write_masked_jsonl(tmp_path, SIZES, absolute=True)
    batches = _batches(lora_cfg(str(jsonl)))
    assert sum(len(b["id"]) for b in batches) == len(SIZES)
    for batch in batches:
        b = len(batch["id"])
        assert batch["mask"].shape == (b, 1, 32, 32) and batch["mask"].dtype == torch.float32
        assert batch["mask"].min() >= 0 and batch["mask"].max() <= 1
        assert (batch["mask"] == 0).any() and (batch["mask"] > 0.5).any()


def test_masks_are_ignored_without_use_masks(tmp_path: Path) -> None:
    jsonl = write_masked_jsonl(tmp_path, SIZES)
    (tmp_path / "masks" / "im-0.png").unlink()  # not read at all
    batches = _batches(lora_cfg(str(jsonl), use_masks=False))
    assert all("mask" not in b for b in batches)
    preflight(lora_cfg(str(jsonl), use_masks=False))


@pytest.mark.parametrize(
    "loader",
    [
        {"center_crop": False, "random_flip": True},
        {
            "center_crop": False,
            "random_flip": True,
            "aspect_ratio_buckets": {
                "target_resolution": 32,
                "start_dim": 16,
                "end_dim": 64,
                "divisible_by": 8,
            },
        },
    ],
    ids=["random-crop-flip", "buckets"],
)
def test_mask_gets_the_same_resize_crop_and_flip_as_its_image(
    tmp_path: Path, loader: dict[str, Any]
) -> None:
    """Each image equals its mask in every channel, so after the transforms pixel values must
    still equal 2·mask − 1 everywhere, whatever crop, flip and bucket each draw got."""
    jsonl = write_masked_jsonl(tmp_path, SIZES)
    flipped = 0
    for batch in _batches(lora_cfg(str(jsonl), **loader), epochs=4):
        expected = batch["mask"] * 2 - 1
        assert batch["mask"].shape[-2:] == batch["pixel_values"].shape[-2:]
        for channel in range(3):
            diff = (batch["pixel_values"][:, channel : channel + 1] - expected).abs().max()
            assert diff < 1.5 / 127.5
        # the zero band is on the left of every source mask: on the right only when flipped
        flipped += int((batch["mask"][..., -2:] == 0).flatten(1).all(1).sum())
    assert flipped > 0, "random_flip should have flipped some masks"


def test_ti_loader_reads_masks_without_captions(tmp_path: Path) -> None:
    jsonl = write_masked_jsonl(tmp_path, SIZES)
    rows = [json.loads(x) for x in jsonl.read_text().splitlines()]
    jsonl.write_text(
        "\n".join(json.dumps({k: v for k, v in r.items() if k != "text"}) for r in rows)
    )
    batches = _batches(ti_cfg(str(jsonl)))
    assert all(b["mask"].shape[1:] == (1, 32, 32) for b in batches)


def test_masks_from_s3(s3_env: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    """A JSONL on S3 with relative masks, and a local JSONL pointing at an s3:// mask."""
    jsonl = write_masked_jsonl(tmp_path / "js", SIZES[:2])
    upload_tree(s3_env.client(), s3_bucket, "masked", tmp_path / "js")
    batches = _batches(lora_cfg(f"s3://{s3_bucket}/masked/data.jsonl"))
    assert sum(len(b["id"]) for b in batches) == 2 and all("mask" in b for b in batches)
    row = json.loads(jsonl.read_text().splitlines()[0])
    row["mask"] = f"s3://{s3_bucket}/masked/masks/im-0.png"
    (tmp_path / "mixed.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "im-0.png").write_bytes((tmp_path / "js/images/im-0.png").read_bytes())
    assert preflight(lora_cfg(str(tmp_path / "mixed.jsonl"))).num_examples == 1
    assert "mask" in _batches(lora_cfg(str(tmp_path / "mixed.jsonl")))[0]


# --- bad masks: preflight names the JSONL line ---------------------------------------------


def _broken(tmp_path: Path, line: int, **change: Any) -> Path:
    jsonl = write_masked_jsonl(tmp_path, SIZES)
    rows = [json.loads(x) for x in jsonl.read_text().splitlines()]
    rows[line - 1].update(change)
    for key, value in change.items():
        if value is None:
            del rows[line - 1][key]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return jsonl


def test_missing_mask_file_names_the_line(tmp_path: Path) -> None:
    jsonl = _broken(tmp_path, 3, mask="masks/nope.png")
    with pytest.raises(DataError, match=r"data\.jsonl:3: mask .*nope\.png: file not found"):
        preflight(lora_cfg(str(jsonl)))


def test_line_without_mask_names_the_line(tmp_path: Path) -> None:
    jsonl = _broken(tmp_path, 2, mask=None)
    with pytest.raises(DataError, match=r"data\.jsonl:2: .*'mask'"):
        preflight(lora_cfg(str(jsonl)))


def test_unreadable_mask_names_the_line(tmp_path: Path) -> None:
    jsonl = write_masked_jsonl(tmp_path, SIZES)
    (tmp_path / "masks" / "im-3.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"data\.jsonl:4: mask .*im-3\.png: not a readable image"):
        preflight(lora_cfg(str(jsonl)))


def test_mask_of_another_size_names_the_line(tmp_path: Path) -> None:
    jsonl = write_masked_jsonl(tmp_path, SIZES)
    buf = io.BytesIO()
    Image.new("L", (10, 10)).save(buf, "PNG")
    (tmp_path / "masks" / "im-1.png").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match=r"data\.jsonl:2: mask .* is 10x10 but its image is 32x56"):
        preflight(lora_cfg(str(jsonl)))


def test_mask_path_escaping_the_folder_is_refused(tmp_path: Path) -> None:
    jsonl = _broken(tmp_path, 1, mask="../secret.png")
    with pytest.raises(DataError, match=r"data\.jsonl:1: .*escapes"):
        preflight(lora_cfg(str(jsonl)))


# --- config rules ----------------------------------------------------------------------------


def test_use_masks_needs_a_jsonl_dataset() -> None:
    text = (
        "type: SD_LORA\nbase_output_dir: o\nmax_train_steps: 2\nsave_every_n_steps: 1\n"
        "use_masks: true\n"
        "data_loader:\n  type: IMAGE_CAPTION_SD_DATA_LOADER\n"
        "  dataset: {type: IMAGE_CAPTION_DIR_DATASET, dataset_dir: d}\n"
    )
    with pytest.raises(ConfigError, match=r"use_masks: .*IMAGE_CAPTION_JSONL_DATASET"):
        parse_config(text, name="c.yaml")
    assert parse_config(text.replace("true", "false")).use_masks is False
