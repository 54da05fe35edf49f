"""DreamBooth data (`DREAMBOOTH_SD_DATA_LOADER`): the instance and class image folders as
one source with fixed captions and per-example loss weights (listed only, no image read)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.config.data import DreamboothSDDataLoaderConfig
from kubetune.dataset.sources import Source, build_source, merge_sources

INSTANCE, CLASS = "instance", "class"


@dataclass(frozen=True)
class DreamBoothData:
    """The instance and class folders as one `Source` (instance examples first)."""

    source: Source
    num_instance: int
    loss_weights: list[float]
    """Each example's loss weight: 1.0 (instance) or class_data_loss_weight (class)."""


def dreambooth_source(
    cfg: DreamboothSDDataLoaderConfig, storage: Any | None = None
) -> DreamBoothData:
    """Instance images (indices ``0 .. num_instance-1``), then class images, each captioned
    with its set's fixed caption; ids are ``instance/<file>`` / ``class/<file>``. Listed only."""
    parts = [
        (
            INSTANCE,
            build_source(cfg.instance_dataset, storage, need_captions=False),
            cfg.instance_caption,
            1.0,
        )
    ]
    if cfg.class_dataset is not None:
        source = build_source(cfg.class_dataset, storage, need_captions=False)
        parts.append((CLASS, source, cfg.class_caption or "", cfg.class_data_loss_weight))
    merged = merge_sources([(name, source, caption) for name, source, caption, _ in parts])
    weights = [weight for _, source, _, weight in parts for _ in range(len(source))]
    return DreamBoothData(merged, len(parts[0][1]), weights)
