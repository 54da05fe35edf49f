"""SDXL LoRA + Textual Inversion (pivotal tuning): LoRA adapters and new token vectors train
together with their own learning rates; the vectors may stop after a fraction of the steps."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from kubetune.config import SdxlLoraAndTextualInversionConfig
from runner.models.loading import Components
from runner.pipelines.base import TrainingPipeline
from runner.pipelines.lora import LoraPart
from runner.pipelines.textual_inversion import TextualInversionPart
from runner.training.optim import ParamGroups


class LoraAndTextualInversionPipeline(TrainingPipeline):
    """SDXL_LORA_AND_TEXTUAL_INVERSION."""

    def __init__(
        self,
        cfg: SdxlLoraAndTextualInversionConfig,
        comps: Components,
        device: torch.device,
        *,
        total_steps: int,
    ) -> None:
        super().__init__(cfg, comps, device)
        self.cfg: SdxlLoraAndTextualInversionConfig = cfg
        self.ti = TextualInversionPart(cfg, comps)
        self.lora = LoraPart(cfg, comps)
        self.lora_dropout = cfg.lora_dropout
        self.ti.set_trainable(cfg.train_ti)
        ratio = cfg.ti_train_steps_ratio
        self.ti_steps = total_steps if ratio is None else math.ceil(ratio * total_steps)
        self.train_text_encoders = True
        self.trained_set_changes = cfg.train_ti  # the vectors freeze part way (DDP is told)

    def param_groups(self) -> ParamGroups:
        groups = self.lora.param_groups()
        if self.cfg.train_ti:
            groups += self.ti.param_groups(self.cfg.textual_inversion_learning_rate)
        return groups

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        params = self.lora.parameters()
        if self.cfg.train_ti:
            params.update(self.ti.parameters())
        return params

    def trained_modules(self) -> list[nn.Module]:
        return [*self.lora.modules.values(), *self.ti.embeddings]

    def before_step(self, step: int) -> None:
        """Freeze the vectors once ``ti_train_steps_ratio`` of the steps are done."""
        super().before_step(step)
        if self.cfg.train_ti:
            self.ti.set_trainable(step < self.ti_steps)

    def after_optimizer_step(self) -> None:
        """invoke-training keeps normalising the vectors even after the TI pivot."""
        if self.cfg.train_ti:
            self.ti.pull_towards_table_std()
        super().after_optimizer_step()  # the EMA

    def export(self, out_dir: Path) -> list[Path]:
        return self.lora.export(out_dir) + self.ti.export(out_dir)
