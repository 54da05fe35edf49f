"""``LoaderSettings``: what the training DataLoader reads from a pipeline config, each field
read from the config type that has it (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.config.data import (
    DreamboothSDDataLoaderConfig,
    HFHubImageCaptionDatasetConfig,
    ImageCaptionSDDataLoaderConfig,
    TextualInversionSDDataLoaderConfig,
)
from kubetune.config.pipelines import (
    SdTextualInversionConfig,
    SdxlLoraAndTextualInversionConfig,
    SdxlTextualInversionConfig,
)
from kubetune.config.training_types import PipelineConfig

LoaderConfig = (
    ImageCaptionSDDataLoaderConfig
    | TextualInversionSDDataLoaderConfig
    | DreamboothSDDataLoaderConfig
)
_TI_TYPES = (
    SdTextualInversionConfig,
    SdxlTextualInversionConfig,
    SdxlLoraAndTextualInversionConfig,
)


@dataclass(frozen=True)
class LoaderSettings:
    """The ``data_loader`` section plus the fields the loader needs from elsewhere."""

    section: LoaderConfig
    """The config's ``data_loader`` (resolution, buckets, crop/flip, workers, captions)."""
    placeholder_token: str | None
    """The TI token the caption templates carry (None for LoRA). Captions hold it once; the
    text conditioner expands a multi-vector token to all its vectors when tokenizing."""
    caption_dropout_rate: float
    """0 for the TI loader, which has no such field."""
    keep_in_memory: bool
    """The dataset's (DreamBooth: the instance dataset's) ``keep_in_memory``; a Hugging Face
    dataset has none."""
    keep_class_in_memory: bool
    """DreamBooth: the class dataset's ``keep_in_memory`` (False elsewhere)."""

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> LoaderSettings:
        section = cfg.data_loader
        token = cfg.placeholder_token if isinstance(cfg, _TI_TYPES) else None
        if isinstance(section, DreamboothSDDataLoaderConfig):
            klass = section.class_dataset
            return cls(
                section,
                token,
                section.caption_dropout_rate,
                section.instance_dataset.keep_in_memory,
                klass is not None and klass.keep_in_memory,
            )
        dataset = section.dataset
        keep = not isinstance(dataset, HFHubImageCaptionDatasetConfig) and dataset.keep_in_memory
        rate = (
            section.caption_dropout_rate
            if isinstance(section, ImageCaptionSDDataLoaderConfig)
            else 0.0
        )
        return cls(section, token, rate, keep, False)

    def kept_indices(self, n: int, num_instance: int | None) -> range | None:
        """The example indices whose decoded images may be kept (None: none). DreamBooth
        examples are the ``num_instance`` instance images, then the class images."""
        first = n if num_instance is None else num_instance
        start = 0 if self.keep_in_memory else first
        stop = n if self.keep_class_in_memory else first
        return range(start, stop) if start < stop else None
