"""SDXL_FINETUNE: every UNet weight trains; the text encoders and VAE stay frozen.

As invoke-training: the UNet trains in ``weight_dtype`` with ``mixed_precision: no`` (bf16
weights and 8-bit AdamW are what fit one 24 GB GPU) and in float32 under mixed precision.
Conditioning and loss are ``TrainingPipeline``'s (the same SDXL code as the LoRA types).
Checkpoints keep the exact trained weights in their own dtype (``trainable.safetensors``)
beside the ``save_checkpoint_format`` outputs in ``save_dtype``; both are streamed to disk one
tensor at a time (``runner.checkpoint.safetensors_stream``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kubetune.config import SdxlFinetuneConfig
from kubetune.errors import UserError
from runner.checkpoint.diffusers_export import export_sdxl_pipeline, export_unet
from runner.models.loading import Components, to_dtype
from runner.pipelines.base import TrainingPipeline
from runner.training.optim import ParamGroups

PREFIX = "unet."


def train_dtype(cfg: SdxlFinetuneConfig) -> torch.dtype:
    """float32 under mixed precision (autocast computes in half), else ``weight_dtype``."""
    return torch.float32 if cfg.mixed_precision != "no" else to_dtype(cfg.weight_dtype)


class SdxlFinetunePipeline(TrainingPipeline):
    """The full UNet as one parameter group named ``unet`` (invoke-training's ``lr/unet``)."""

    def __init__(self, cfg: SdxlFinetuneConfig, comps: Components, device: torch.device) -> None:
        if not comps.is_sdxl:
            raise UserError(
                f"SDXL_FINETUNE needs an SDXL base model; {comps.source or cfg.model} "
                "is SD 1.x/2.x",
                hint="set model to an SDXL model (e.g. stabilityai/stable-diffusion-xl-base-1.0)",
            )
        super().__init__(cfg, comps, device, cache_text=cfg.cache_text_encoder_outputs)
        self.cfg: SdxlFinetuneConfig = cfg
        comps.unet.to(dtype=train_dtype(cfg))
        comps.unet.requires_grad_(True)
        self._params = {f"{PREFIX}{n}": p for n, p in comps.unet.named_parameters()}

    def param_groups(self) -> ParamGroups:
        params = list(self._params.values())
        return [{"params": params, "lr": self.cfg.optimizer.learning_rate, "name": "unet"}]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return self._params

    def trainable_dtype(self) -> torch.dtype | None:
        """Checkpoints keep the UNet in its training dtype: exact, and half the size of
        float32 when it trains in bf16."""
        return None

    def export(self, out_dir: Path) -> list[Path]:
        dtype = to_dtype(self.cfg.save_dtype)
        if self.cfg.save_checkpoint_format == "full_diffusers":
            return export_sdxl_pipeline(self.comps, out_dir, dtype)
        return export_unet(self.comps.unet, out_dir, dtype)
