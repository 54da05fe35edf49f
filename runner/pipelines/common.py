"""What every training type shares: text conditioning, the noise-prediction loss of one
micro-batch, and the contract the loop and checkpointer rely on (``TrainingPipeline``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from runner.config import PipelineConfig
from runner.losses import diffusion_loss, training_target
from runner.models.loading import Components
from runner.optim import ParamGroups

Batch = dict[str, Any]


class TextConditioner:
    """Turns captions into UNet conditioning (SD: hidden states; SDXL: both encoders'
    penultimate hidden states concatenated, plus the pooled projection of encoder 2).

    Captions arrive final: multi-vector placeholders are already expanded by the data loader
    ("tok tok_1 tok_2", as diffusers' ``maybe_convert_prompt`` does at inference).
    """

    def __init__(self, comps: Components, *, cache: bool = False) -> None:
        self.comps = comps
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = (
            {} if cache else None)

    def _ids(self, tokenizer: Any, captions: list[str], device: torch.device) -> torch.Tensor:
        ids = tokenizer(captions, padding="max_length",
                        max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return ids.to(device)

    def encode(self, captions: list[str], device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states [B, 77, D], pooled [B, P] or None), cached per caption if asked."""
        if self.cache is None:
            return self._encode(captions, device)
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            hidden, pooled = self._encode(missing, device)
            for i, caption in enumerate(missing):
                self.cache[caption] = (hidden[i].detach(),
                                       None if pooled is None else pooled[i].detach())
        rows = [self.cache[c] for c in captions]
        pooled_rows = [p for _, p in rows]
        return (torch.stack([h for h, _ in rows]),
                None if pooled_rows[0] is None else torch.stack(pooled_rows))  # type: ignore

    def _encode(self, captions: list[str], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        comps = self.comps
        ids = self._ids(comps.tokenizer, captions, device)
        if not comps.is_sdxl:
            return comps.text_encoder(ids)[0], None
        out1 = comps.text_encoder(ids, output_hidden_states=True)
        out2 = comps.text_encoder_2(self._ids(comps.tokenizer_2, captions, device),
                                    output_hidden_states=True)
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        return hidden, out2.text_embeds


class LatentEncoder:
    """VAE encoding to the latent distribution (mean, std), optionally cached by example id;
    sampling uses the training generator so cached and uncached runs match."""

    def __init__(self, vae: nn.Module, *, cache: bool = False) -> None:
        self.vae = vae
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    @torch.no_grad()
    def _moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def sample(self, batch: Batch, device: torch.device, generator: torch.Generator
               ) -> torch.Tensor:
        if self.cache is None:
            mean, std = self._moments(batch["pixel_values"].to(device, non_blocking=True))
        else:
            ids = list(batch["id"])
            todo = [i for i, key in enumerate(ids) if key not in self.cache]
            if todo:
                pixels = batch["pixel_values"][todo].to(device, non_blocking=True)
                m, s = self._moments(pixels)
                for j, i in enumerate(todo):
                    self.cache[ids[i]] = (m[j], s[j])
            mean = torch.stack([self.cache[k][0] for k in ids])
            std = torch.stack([self.cache[k][1] for k in ids])
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
        latents = mean + std * noise
        return latents * self.vae.config.scaling_factor


def sdxl_time_ids(batch: Batch, height: int, width: int, device: torch.device) -> torch.Tensor:
    """SDXL micro-conditioning: original size, crop top-left, target size (6 per sample)."""
    n = len(batch["caption"])
    target = torch.tensor([[height, width]] * n, dtype=torch.long)
    ids = torch.cat([batch["original_size_hw"].long(), batch["crop_top_left_yx"].long(), target],
                    dim=1)
    return ids.to(device)


class TrainingPipeline:
    """Base class of the per-type pipelines.

    Subclasses add trainable parameters in ``__init__`` and implement ``param_groups``,
    ``trainable_parameters`` and ``export``. The loop calls ``loss`` per micro-batch,
    ``after_optimizer_step`` after each step and ``set_train``/``set_eval`` around validation.
    """

    def __init__(self, cfg: PipelineConfig, comps: Components, device: torch.device,
                 *, cache_text: bool = False) -> None:
        self.cfg = cfg
        self.comps = comps
        self.device = device
        self.text = TextConditioner(comps, cache=cache_text)
        self.latents = LatentEncoder(comps.vae, cache=cfg.cache_vae_outputs)
        self.prediction_type: str = comps.noise_scheduler.config.prediction_type
        self.train_text_encoders = False  # subclasses set True when gradients flow through

    # --- contract -------------------------------------------------------------------------
    def param_groups(self) -> ParamGroups:
        raise NotImplementedError

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter training may change, by a stable name (checkpoint keys)."""
        raise NotImplementedError

    def export(self, out_dir: Path) -> list[Path]:
        """Write the user-facing outputs (LoRA / embeddings files) into ``out_dir``."""
        raise NotImplementedError

    def before_step(self, step: int) -> None:
        """Hook before each optimizer step (``step`` counts completed steps)."""

    def after_optimizer_step(self) -> None:
        """Hook right after ``optimizer.step()``."""

    def trained_modules(self) -> list[nn.Module]:
        """Modules that hold trainable parameters (put in train mode, wrapped by accelerate)."""
        return [self.comps.unet]

    # --- shared behaviour -----------------------------------------------------------------
    def set_train(self, train: bool) -> None:
        for module in self.trained_modules():
            module.train(train)

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = self.trainable_parameters()
        missing = set(params) - set(state)
        if missing:
            raise KeyError(f"checkpoint lacks {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name].to(param.device, param.dtype))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().cpu().contiguous()
                for n, p in self.trainable_parameters().items()}

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """Noise-prediction loss of one micro-batch (float32 scalar)."""
        device = self.device
        latents = self.latents.sample(batch, device, generator)
        noise = torch.randn(latents.shape, generator=generator, device=device,
                            dtype=latents.dtype)
        scheduler = self.comps.noise_scheduler
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps,
                                  (latents.shape[0],), generator=generator, device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.set_grad_enabled(self.train_text_encoders and torch.is_grad_enabled()):
            hidden, pooled = self.text.encode(list(batch["caption"]), device)
        unet = self.comps.unet
        kwargs: dict[str, Any] = {}
        if pooled is not None:
            h, w = batch["pixel_values"].shape[-2:]
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(unet.dtype),
                                           "time_ids": sdxl_time_ids(batch, h, w, device)}
        pred = unet(noisy.to(unet.dtype), timesteps, hidden.to(unet.dtype),
                    return_dict=False, **kwargs)[0]
        target = training_target(scheduler, self.prediction_type, latents, noise, timesteps)
        return diffusion_loss(pred, target, timesteps, scheduler, self.prediction_type,
                              self.cfg.min_snr_gamma)


def enable_gradient_checkpointing(modules: list[nn.Module]) -> None:
    for module in modules:
        if hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing()
        elif hasattr(module, "gradient_checkpointing_enable"):
            module.gradient_checkpointing_enable()
