"""One module per training type; ``build_pipeline`` picks it from the config's ``type``."""

from __future__ import annotations

import torch

from runner.config import (
    PipelineConfig,
    SdLoraConfig,
    SdTextualInversionConfig,
    SdxlLoraAndTextualInversionConfig,
    SdxlLoraConfig,
    SdxlTextualInversionConfig,
)
from runner.models.loading import Components
from runner.pipelines.common import TrainingPipeline


def build_pipeline(
    cfg: PipelineConfig, comps: Components, device: torch.device, *, total_steps: int
) -> TrainingPipeline:
    """The training pipeline for ``cfg.type`` (adds LoRA layers / tokens to ``comps``)."""
    from runner.pipelines.lora import LoraPipeline
    from runner.pipelines.lora_ti import LoraAndTextualInversionPipeline
    from runner.pipelines.textual_inversion import TextualInversionPipeline

    if isinstance(cfg, SdxlLoraAndTextualInversionConfig):
        return LoraAndTextualInversionPipeline(cfg, comps, device, total_steps=total_steps)
    if isinstance(cfg, (SdLoraConfig, SdxlLoraConfig)):
        return LoraPipeline(cfg, comps, device)
    if isinstance(cfg, (SdTextualInversionConfig, SdxlTextualInversionConfig)):
        return TextualInversionPipeline(cfg, comps, device)
    raise TypeError(f"no pipeline for {type(cfg).__name__}")


__all__ = ["TrainingPipeline", "build_pipeline"]
