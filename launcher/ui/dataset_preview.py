"""The dataset preview of the form's config (local, s3://, gs:// or az://): how many examples,
thumbnails of the first few with their captions, the aspect-ratio bucket histogram and the bad
images the header preflight finds. Listings and image headers only, plus the few thumbnails
shown: the dataset is never downloaded."""

from __future__ import annotations

import base64
import io
from collections import Counter
from typing import Any

from kubetune.config import parse_config
from kubetune.errors import UserError
from launcher.ui.configs import FORM_NAME, generate
from launcher.ui.security import UiSettings, checked_path

THUMBNAILS = 12
THUMB_SIDE = 128
MAX_BAD_SHOWN = 50


def preview(values: Any, settings: UiSettings) -> dict[str, Any]:
    """What the page shows of the dataset; a config or dataset problem is a one-line error."""
    from kubetune.dataset.preflight import check_headers

    checked = generate(values, settings.roots[0])
    if not checked["valid"]:
        first = checked["problems"][0]["text"] if checked["problems"] else "invalid config"
        raise UserError(f"fix the config first: {first}")
    cfg = parse_config(checked["yaml"], name=FORM_NAME)
    if settings.restricted:
        for path in _local_dataset_paths(cfg.data_loader):
            checked_path(settings, path, "dataset")
    report, errors = check_headers(cfg)
    source = report.source
    good = [i for i, hw in enumerate(report.sizes_hw) if hw != (0, 0)]
    title, buckets = _histogram(cfg.data_loader, [report.sizes_hw[i] for i in good])
    return {
        "count": report.num_examples,
        "source": source.name if source is not None else "",
        "thumbnails": [_thumbnail(source, i) for i in good[:THUMBNAILS]] if source else [],
        "bucket_title": title,
        "buckets": buckets,
        "bad": [str(e) for e in errors[:MAX_BAD_SHOWN]],
        "bad_count": len(errors),
    }


def _local_dataset_paths(loader: Any) -> list[str]:
    paths = []
    for name in ("dataset", "instance_dataset", "class_dataset"):
        dataset = getattr(loader, name, None)
        for attr in ("dataset_dir", "jsonl_path"):
            value = getattr(dataset, attr, None)
            if isinstance(value, str) and "://" not in value:
                paths.append(value)
    return paths


def _histogram(loader: Any, sizes_hw: list[tuple[int, int]]) -> tuple[str, list[dict[str, Any]]]:
    """Images per aspect-ratio bucket (as the runner assigns them), or per aspect ratio when
    the config has no buckets."""
    from kubetune.dataset.buckets import assign_buckets, build_buckets

    cfg = getattr(loader, "aspect_ratio_buckets", None)
    if cfg is None:
        counts = Counter(f"{w / h:.2f}" for h, w in sizes_hw)
        title = (
            "aspect ratios, width / height (no bucketing: every image is cropped to the resolution)"
        )
        return title, [{"label": k, "count": counts[k]} for k in sorted(counts, key=float)]
    buckets = build_buckets(cfg)
    counts = Counter(assign_buckets(sizes_hw, buckets))
    title = f"aspect-ratio buckets (height x width, target {cfg.target_resolution})"
    return title, [
        {"label": f"{buckets[i][0]}x{buckets[i][1]}", "count": counts[i]} for i in sorted(counts)
    ]


def _thumbnail(source: Any, index: int) -> dict[str, Any]:
    """A small JPEG of one example as a data: URI, with its caption."""
    from PIL import Image

    example = source.fetch(index)
    try:
        with Image.open(io.BytesIO(example.data)) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMB_SIDE, THUMB_SIDE))
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=80)
        data = "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()
    except Exception:  # noqa: BLE001 - a thumbnail that fails shows as missing, not an error
        data = ""
    return {"id": example.id, "caption": example.caption, "data": data}
