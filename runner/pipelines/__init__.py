"""One module per training type; ``build_pipeline`` picks it from the config's ``type``."""

from __future__ import annotations

import torch

from kubetune.config import (
    FluxLoraConfig,
    PipelineConfig,
    SdLoraConfig,
    SdTextualInversionConfig,
    SdxlFinetuneConfig,
    SdxlLoraAndTextualInversionConfig,
    SdxlLoraConfig,
    SdxlTextualInversionConfig,
)
from runner.models.loading import Components
from runner.pipelines.base import TrainingPipeline
from runner.training.ema import EmaWeights


def build_pipeline(
    cfg: PipelineConfig, comps: Components, device: torch.device, *, total_steps: int
) -> TrainingPipeline:
    """The training pipeline for ``cfg.type`` (adds LoRA layers / tokens to ``comps``)."""
    from runner.pipelines.flux_lora import FluxLoraPipeline
    from runner.pipelines.lora import LoraPipeline
    from runner.pipelines.lora_ti import LoraAndTextualInversionPipeline
    from runner.pipelines.sdxl_finetune import SdxlFinetunePipeline
    from runner.pipelines.textual_inversion import TextualInversionPipeline

    pipeline: TrainingPipeline
    if isinstance(cfg, SdxlLoraAndTextualInversionConfig):
        pipeline = LoraAndTextualInversionPipeline(cfg, comps, device, total_steps=total_steps)
    elif isinstance(cfg, (SdLoraConfig, SdxlLoraConfig)):
        pipeline = LoraPipeline(cfg, comps, device)
    elif isinstance(cfg, (SdTextualInversionConfig, SdxlTextualInversionConfig)):
        pipeline = TextualInversionPipeline(cfg, comps, device)
    elif isinstance(cfg, FluxLoraConfig):
        pipeline = FluxLoraPipeline(cfg, comps, device)  # type: ignore[arg-type]
    elif isinstance(cfg, SdxlFinetuneConfig):
        pipeline = SdxlFinetunePipeline(cfg, comps, device)
    else:
        raise TypeError(f"no pipeline for {type(cfg).__name__}")
    if cfg.ema_decay is not None:
        place = torch.device("cpu") if cfg.ema_on_cpu else None
        pipeline.ema = EmaWeights(pipeline.trainable_parameters(), cfg.ema_decay, place)
    return pipeline


__all__ = ["TrainingPipeline", "build_pipeline"]
