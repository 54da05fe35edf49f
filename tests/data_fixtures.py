"""Helpers for the runner.data tests: real small images, datasets, configs, S3 uploads."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kubetune.config import (
    SdLoraConfig,
    SdTextualInversionConfig,
    SdxlLoraAndTextualInversionConfig,
)

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}
BUCKETS = {"target_resolution": 64, "start_dim": 32, "end_dim": 128, "divisible_by": 16}
"""Aspect-ratio buckets around 64 px (the bucket and sharding tests)."""
BUCKET_SIZES = [(96, 48), (100, 50), (48, 96), (50, 110), (64, 64), (70, 70), (80, 60), (60, 80),
                (120, 40), (40, 120), (66, 64), (90, 45), (45, 90)]  # fmt: skip
"""Wide, tall and square images of several shapes, for ``write_image_dir``."""


def image_bytes(
    width: int,
    height: int,
    ext: str = ".png",
    seed: int = 0,
    exif_orientation: int | None = None,
    mode: str = "RGB",
) -> bytes:
    """A small random-noise image encoded as `ext`."""
    rng = np.random.default_rng(seed)
    channels = 4 if mode == "RGBA" else 3
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    img = Image.fromarray(array, mode)
    out = io.BytesIO()
    kwargs: dict[str, Any] = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    img.save(out, FORMATS[ext], **kwargs)
    return out.getvalue()


def write_image_dir(
    root: Path,
    sizes: list[tuple[int, int]],
    *,
    captions: bool = True,
    exts: tuple[str, ...] = (".png",),
) -> dict[str, str]:
    """img-000.png ... (with same-named .txt captions); returns {file name: caption}."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (w, h) in enumerate(sizes):
        ext = exts[i % len(exts)]
        name = f"img-{i:03d}{ext}"
        (root / name).write_bytes(image_bytes(w, h, ext, seed=i))
        caption = f"caption {i}"
        if captions:
            (root / f"img-{i:03d}.txt").write_text(caption, encoding="utf-8")
        out[name] = caption
    return out


def write_jsonl(
    root: Path, sizes: list[tuple[int, int]], name: str = "data.jsonl", subdir: str = "images"
) -> dict[str, str]:
    """A JSONL dataset with images under `subdir/`; returns {image path: caption}."""
    (root / subdir).mkdir(parents=True, exist_ok=True)
    rows = {}
    for i, (w, h) in enumerate(sizes):
        rel = f"{subdir}/pic-{i:03d}.jpg"
        (root / rel).write_bytes(image_bytes(w, h, ".jpg", seed=100 + i))
        rows[rel] = f"a jsonl caption {i}"
    lines = [json.dumps({"image": k, "text": v}) for k, v in rows.items()]
    (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return rows


def write_hf_dataset(root: Path, sizes: list[tuple[int, int]]) -> dict[str, str]:
    """A `datasets` dataset saved with save_to_disk; returns {id: caption}."""
    import datasets

    images = [
        {"bytes": image_bytes(w, h, ".png", seed=200 + i), "path": None}
        for i, (w, h) in enumerate(sizes)
    ]
    texts = [f"hf caption {i}" for i in range(len(sizes))]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": images, "text": texts}, features=features).save_to_disk(
        str(root)
    )
    return {f"{root}[{i}]": t for i, t in enumerate(texts)}


def upload_tree(client: Any, bucket: str, prefix: str, local: Path) -> None:
    """Copy every file under `local` to s3://bucket/prefix/..."""
    for path in sorted(local.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(local).as_posix()}"
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


_COMMON = {
    "base_output_dir": "/tmp/kubetune-test-out",
    "max_train_steps": 10,
    "save_every_n_steps": 5,
}


def lora_config(dataset: dict[str, Any], **loader: Any) -> SdLoraConfig:
    data = {**_COMMON, "data_loader": {"dataset": dataset, "resolution": 32, **loader}}
    return SdLoraConfig.model_validate(data)


def ti_config(dataset: dict[str, Any], **loader: Any) -> SdTextualInversionConfig:
    if "caption_templates" not in loader:
        loader.setdefault("caption_preset", "object")
    data = {
        **_COMMON,
        "placeholder_token": "<cat>",
        "initializer_token": "cat",
        "data_loader": {"dataset": dataset, "resolution": 32, **loader},
    }
    return SdTextualInversionConfig.model_validate(data)


def lora_ti_config(
    dataset: dict[str, Any], num_vectors: int = 2, **loader: Any
) -> SdxlLoraAndTextualInversionConfig:
    if "caption_templates" not in loader:
        loader.setdefault("caption_preset", "object")
    data = {
        **_COMMON,
        "placeholder_token": "<tok>",
        "initializer_token": "cat",
        "num_vectors": num_vectors,
        "train_text_encoder": False,
        "data_loader": {"dataset": dataset, "resolution": 32, **loader},
    }
    return SdxlLoraAndTextualInversionConfig.model_validate(data)


def all_batches(loader: Any) -> list[dict[str, Any]]:
    return list(loader)


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth grey pattern (so bilinear resizes stay comparable) with a sharp edge."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = (xx * rng.uniform(1, 3) + yy * rng.uniform(1, 3)) % 256
    base[:, : width // 3] = 0
    return base.astype(np.uint8)


def _save(array: np.ndarray, path: Path, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array, "L")
    img = img.convert(mode)
    img.save(path, "JPEG" if path.suffix == ".jpg" else "PNG")


def write_masked_jsonl(root: Path, sizes: list[tuple[int, int]], *, absolute: bool = False) -> Path:
    """Images whose every channel equals their mask (PNG, lossless), with a `mask` column."""
    lines = []
    for i, (w, h) in enumerate(sizes):
        grey = _pattern(w, h, seed=i)
        _save(grey, root / "images" / f"im-{i}.png", "RGB")
        _save(grey, root / "masks" / f"im-{i}.png", "L" if i % 2 else "RGBA")
        mask = root / "masks" / f"im-{i}.png"
        row = {
            "image": f"images/im-{i}.png",
            "text": f"caption {i}",
            "mask": str(mask) if absolute and i % 2 else f"masks/im-{i}.png",
        }
        lines.append(json.dumps(row))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root / "data.jsonl"


def bucketed_dir_config(root: Path, keep: bool, workers: int = 0) -> object:
    """A caption-dir dataset at `root` with random flips and 32-96 px buckets (target 48),
    `keep_in_memory` as given, `workers` DataLoader workers."""
    return lora_config(
        {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": str(root), "keep_in_memory": keep},
        random_flip=True,
        center_crop=False,
        dataloader_num_workers=workers,
        aspect_ratio_buckets={
            "target_resolution": 48,
            "start_dim": 32,
            "end_dim": 96,
            "divisible_by": 16,
        },
    )
