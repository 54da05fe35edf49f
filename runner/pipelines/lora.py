"""SD1.5 / SDXL LoRA: peft adapters on the UNet and (optionally) the text encoder(s)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import ModelMixin
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from kubetune.config import (
    FluxLoraConfig,
    SdLoraConfig,
    SdxlLoraAndTextualInversionConfig,
    SdxlLoraConfig,
)
from kubetune.config.pipelines import INVOKE_LORA_ALPHA
from runner.checkpoint.exporters import LoraExport, export_lora
from runner.models.loading import Components
from runner.pipelines.base import TrainingPipeline
from runner.training.noise import RowDropout
from runner.training.optim import ParamGroups

LoraConfigs = SdLoraConfig | SdxlLoraConfig | SdxlLoraAndTextualInversionConfig
ADAPTER = "default"


def add_lora(
    module: nn.Module,
    *,
    rank: int,
    alpha: float,
    targets: list[str],
    use_dora: bool = False,
    dropout: float = 0.0,
) -> None:
    """Add a float32 peft LoRA adapter to ``module``'s ``targets`` with peft's default
    initialisation (Kaiming-uniform A, zero B), as invoke-training does; DoRA's magnitude
    vectors too when ``use_dora``."""
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, use_dora=use_dora, lora_dropout=dropout
    )
    if isinstance(module, ModelMixin):
        module.add_adapter(config)
    else:  # transformers' add_adapter insists on a newer peft than diffusers needs
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
        module.peft_config = {ADAPTER: config}
    for name, param in module.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
    for layer in module.modules():  # masks that do not depend on the rank
        dropouts = getattr(layer, "lora_dropout", None)
        dropout = dropouts[ADAPTER] if isinstance(dropouts, nn.ModuleDict) else None
        if isinstance(dropout, nn.Dropout):
            dropouts[ADAPTER] = RowDropout(dropout.p)


def add_loras(
    modules: dict[str, nn.Module],
    cfg: LoraConfigs | FluxLoraConfig,
    alpha: float,
    *,
    denoiser: str,
    denoiser_targets: Sequence[str],
) -> None:
    """A LoRA adapter on each of ``modules`` (name → module), with the config's rank, DoRA
    and dropout: ``denoiser_targets`` on the module named ``denoiser`` (the UNet or FLUX's
    transformer), the config's text-encoder targets on the others."""
    for name, module in modules.items():
        targets = denoiser_targets if name == denoiser else cfg.text_encoder_lora_target_modules
        add_lora(
            module,
            rank=cfg.lora_rank_dim,
            alpha=alpha,
            targets=list(dict.fromkeys(targets)),  # peft keeps them as a set
            use_dora=cfg.use_dora,
            dropout=cfg.lora_dropout,
        )


def lora_parameters(module: nn.Module, prefix: str) -> dict[str, nn.Parameter]:
    return {f"{prefix}.{n}": p for n, p in module.named_parameters() if "lora_" in n}


def all_lora_parameters(modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """The LoRA parameters of every module, keyed ``<module name>.<parameter name>``."""
    return {k: p for name, m in modules.items() for k, p in lora_parameters(m, name).items()}


class LoraPart:
    """The LoRA half of a pipeline (also used by LoRA + TI): which modules carry adapters,
    their learning rates, and their export."""

    def __init__(self, cfg: LoraConfigs, comps: Components) -> None:
        self.cfg = cfg
        self.comps = comps
        self.alpha = float(cfg.lora_alpha or INVOKE_LORA_ALPHA)
        self.modules: dict[str, nn.Module] = {}
        if cfg.train_unet:
            self.modules["unet"] = comps.unet
        if cfg.train_text_encoder:
            self.modules["text_encoder"] = comps.text_encoder
            if comps.text_encoder_2 is not None:
                self.modules["text_encoder_2"] = comps.text_encoder_2
        add_loras(
            self.modules,
            cfg,
            self.alpha,
            denoiser="unet",
            denoiser_targets=cfg.unet_lora_target_modules,
        )

    def _lr(self, name: str) -> float:
        cfg = self.cfg
        base = cfg.optimizer.learning_rate
        if name == "unet":
            return cfg.unet_learning_rate or base
        te = cfg.text_encoder_learning_rate or base
        if isinstance(cfg, SdLoraConfig):
            return te
        own = (
            cfg.text_encoder_1_learning_rate
            if name == "text_encoder"
            else cfg.text_encoder_2_learning_rate
        )
        return own or te

    def param_groups(self) -> ParamGroups:
        """One group per module, in invoke-training's order and names: unet, then
        text_encoder (SD) or text_encoder_1, text_encoder_2 (SDXL)."""
        return [
            {"params": list(lora_parameters(m, n).values()), "lr": self._lr(n), "name": group}
            for n, m in self.modules.items()
            for group in [self._group(n)]
        ]

    def _group(self, name: str) -> str:
        if self.comps.is_sdxl and name == "text_encoder":
            return "text_encoder_1"
        return name

    def parameters(self) -> dict[str, nn.Parameter]:
        return all_lora_parameters(self.modules)

    def export(self, out_dir: Path) -> list[Path]:
        return export_lora(
            LoraExport(
                modules=self.modules,
                alpha=self.alpha,
                rank=self.cfg.lora_rank_dim,
                is_sdxl=self.comps.is_sdxl,
            ),
            out_dir,
            self.cfg.lora_checkpoint_format,
        )


class LoraPipeline(TrainingPipeline):
    """SD_LORA and SDXL_LORA."""

    def __init__(
        self, cfg: SdLoraConfig | SdxlLoraConfig, comps: Components, device: torch.device
    ) -> None:
        super().__init__(cfg, comps, device, cache_text=cfg.cache_text_encoder_outputs)
        self.lora = LoraPart(cfg, comps)
        self.train_text_encoders = cfg.train_text_encoder
        self.lora_dropout = cfg.lora_dropout

    def param_groups(self) -> ParamGroups:
        return self.lora.param_groups()

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return self.lora.parameters()

    def trained_modules(self) -> list[nn.Module]:
        return list(self.lora.modules.values())

    def export(self, out_dir: Path) -> list[Path]:
        return self.lora.export(out_dir)
