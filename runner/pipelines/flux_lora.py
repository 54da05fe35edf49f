"""FLUX_LORA: peft LoRA on FLUX.1's transformer (and optionally its CLIP text encoder),
trained with flow matching as invoke-training's ``pipelines/flux/lora/train.py`` does.

One step: the VAE latents, ``(x - shift_factor) · scaling_factor``, packed into 2×2 patches
(``FluxPipeline._pack_latents``) with their position ids; a sigma per image from
``timestep_sampler`` (``shift``: sigmoid of a normal draw times ``sigmoid_scale``, then
``shift·s / (1 + (shift-1)·s)``; ``uniform``: one of the scheduler's 1000 sigmas); the noisy
input ``(1-σ)·x + σ·noise``; the transformer, given T5 hidden states, CLIP's pooled output,
``timestep = σ`` and FLUX.1-dev's guidance embedding set to ``guidance_scale``, predicts the
velocity ``noise - x``; the loss is its mean squared error (``loss_type`` may change the
element loss; ``use_masks`` weights it). Every random number comes from the step generator,
so a resumed run draws exactly what the uninterrupted one would.

Where kubetune differs from invoke-training on purpose (see docs/coming-from-invoke-training.md):
it subtracts the VAE's ``shift_factor`` as FluxPipeline does when decoding (invoke-training
only scales), its sigma has one value per image for any batch size (invoke-training's
broadcast works for batch 1 only), and masks weight the loss (invoke-training ignores them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from torch import nn

from kubetune.config import FluxLoraConfig
from kubetune.config.extensions import DEFAULT_HUBER_C
from kubetune.config.pipelines import INVOKE_LORA_ALPHA
from runner.checkpoint.flux_exporters import FluxLoraExport, export_flux_lora
from runner.models.flux import FluxComponents
from runner.pipelines.base import Batch, TextConditioner, TrainingPipeline
from runner.pipelines.lora import add_loras, all_lora_parameters, lora_parameters
from runner.training.losses import element_loss
from runner.training.memory_cache import BoundedCache
from runner.training.noise import Rows
from runner.training.optim import ParamGroups
from runner.training.speed import to_device


class FluxTextConditioner(TextConditioner):
    """Captions → (T5 hidden states [B, L, D], CLIP pooled output [B, P]), as invoke-training's
    ``encode_prompt``; cached per caption when asked (``TextConditioner.encode``)."""

    def __init__(
        self, comps: Any, clip_max: int, t5_max: int, cache: BoundedCache[str] | None
    ) -> None:
        super().__init__(comps, cache)
        self.clip_max, self.t5_max = clip_max, t5_max

    def _tokens(self, tokenizer: Any, captions: list[str], n: int, device: Any) -> torch.Tensor:
        ids = tokenizer(
            captions, padding="max_length", max_length=n, truncation=True, return_tensors="pt"
        ).input_ids
        return to_device(ids, device)

    def _encode(
        self, captions: list[str], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        comps = self.comps
        clip, t5 = comps.text_encoder, comps.text_encoder_2
        ids = self._tokens(comps.tokenizer, captions, self.clip_max, clip.device)
        pooled = clip(ids, output_hidden_states=False).pooler_output
        with torch.no_grad():  # T5 is never trained
            t5_ids = self._tokens(comps.tokenizer_2, captions, self.t5_max, t5.device)
            hidden = t5(t5_ids, output_hidden_states=False)[0]
        return hidden.to(device), pooled.to(device)


class FluxLoraPipeline(TrainingPipeline):
    """FLUX_LORA."""

    comps: FluxComponents

    def __init__(self, cfg: FluxLoraConfig, comps: FluxComponents, device: torch.device) -> None:
        super().__init__(cfg, comps, device)  # type: ignore[arg-type]
        self.flux = cfg
        self.text = FluxTextConditioner(
            comps,
            cfg.clip_tokenizer_max_length,
            cfg.t5_tokenizer_max_length,
            self.new_cache() if cfg.cache_text_encoder_outputs else None,
        )
        self.alpha = float(cfg.lora_alpha or INVOKE_LORA_ALPHA)
        self.modules: dict[str, nn.Module] = {}
        if cfg.train_transformer:
            self.modules["transformer"] = comps.transformer
        if cfg.train_text_encoder:
            self.modules["text_encoder_1"] = comps.text_encoder
        add_loras(
            self.modules,
            cfg,
            self.alpha,
            denoiser="transformer",
            denoiser_targets=cfg.flux_lora_target_modules,
        )
        self.train_text_encoders = cfg.train_text_encoder
        self.lora_dropout = cfg.lora_dropout

    # --- contract -------------------------------------------------------------------------
    def param_groups(self) -> ParamGroups:
        """Transformer first, then the text encoder, as invoke-training orders them."""
        base = self.flux.optimizer.learning_rate
        rates = {
            "transformer": self.flux.transformer_learning_rate or base,
            "text_encoder_1": self.flux.text_encoder_learning_rate or base,
        }
        return [
            {"params": list(lora_parameters(m, n).values()), "lr": rates[n], "name": n}
            for n, m in self.modules.items()
        ]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return all_lora_parameters(self.modules)

    def trained_modules(self) -> list[nn.Module]:
        return list(self.modules.values())

    def train_mode_modules(self) -> list[nn.Module]:
        """As the SD types, but T5 always stays in eval mode (its dropout is 0.1)."""
        modules = self.trained_modules()
        if self.cfg.gradient_checkpointing:
            modules = list(dict.fromkeys([*modules, self.comps.transformer]))
        return modules

    def export(self, out_dir: Path) -> list[Path]:
        lora = FluxLoraExport(self.modules, self.alpha, self.flux.lora_rank_dim)
        return export_flux_lora(lora, out_dir, self.flux.lora_checkpoint_format)

    # --- one micro-batch ------------------------------------------------------------------
    def _loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        device, transformer = self.device, self.comps.transformer
        rows = Rows.of(batch, device)  # draws for the whole global batch (several processes)
        latents = self._latents(batch, generator, rows)
        b, c, h, w = latents.shape
        packed = FluxPipeline._pack_latents(latents, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, packed.dtype)
        noise = rows.randn(tuple(packed.shape[1:]), generator, torch.float32).to(device)
        sigmas = rows.take(self._sigmas(rows.size, generator)).view(-1, 1, 1)
        noisy = (1.0 - sigmas) * packed + sigmas * noise
        with torch.set_grad_enabled(self.train_text_encoders and torch.is_grad_enabled()):
            hidden, pooled = self.text.encode(list(batch["caption"]), device)
        assert pooled is not None
        dtype = transformer.dtype
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((b,), float(self.flux.guidance_scale), device=device)
        pred = transformer(
            hidden_states=noisy.to(dtype),
            timestep=sigmas.flatten().to(dtype),
            guidance=guidance,
            pooled_projections=pooled.to(dtype),
            encoder_hidden_states=hidden.to(dtype),
            txt_ids=torch.zeros(hidden.shape[1], 3, device=device, dtype=dtype),
            img_ids=img_ids.to(dtype),
            return_dict=False,
        )[0]
        per_element = element_loss(
            pred, noise - packed, self.flux.loss_type, self.flux.huber_c or DEFAULT_HUBER_C
        )
        if batch.get("mask") is not None:
            per_element = per_element * self._packed_mask(batch["mask"], latents.shape)
        per_sample = per_element.mean(dim=(1, 2))
        share = batch.get("share")  # each example's part of its global batch's mean
        if share is not None and any(s != 1.0 for s in share):
            per_sample = per_sample * torch.tensor(share, device=per_sample.device)
        return per_sample.mean()

    def _latents(
        self, batch: Batch, generator: torch.Generator, rows: Rows | None = None
    ) -> torch.Tensor:
        """VAE latents as FluxPipeline expects them: (x - shift_factor) · scaling_factor."""
        config = self.comps.vae.config
        scaled = self.latents.sample(batch, self.device, generator, rows).float()
        return scaled - float(config.get("shift_factor") or 0.0) * config.scaling_factor

    def _sigmas(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """One sigma in (0, 1) per image, as invoke-training's ``get_noisy_latents``."""
        cfg, device = self.flux, self.device
        if cfg.timestep_sampler == "shift":
            s = (torch.randn(n, generator=generator, device=device) * cfg.sigmoid_scale).sigmoid()
            shift = cfg.discrete_flow_shift
            return s * shift / (1 + (shift - 1) * s)
        scheduler = self.comps.noise_scheduler
        u = torch.rand(n, generator=generator, device=device)
        index = (u * scheduler.config.num_train_timesteps).long().cpu()
        return scheduler.sigmas[index].to(device=device, dtype=torch.float32)

    def _packed_mask(self, mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The image mask at latent size (nearest), repeated per channel and packed."""
        b, c, h, w = shape
        small = F.interpolate(mask.to(self.device).float(), size=(h, w), mode="nearest")
        return FluxPipeline._pack_latents(small.expand(b, c, h, w), b, c, h, w)
