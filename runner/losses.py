"""Noise-prediction losses: epsilon / v-prediction targets with optional Min-SNR weighting."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha²/sigma² of each timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def training_target(
    scheduler: DDPMScheduler,
    prediction_type: str,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v_prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    prediction_type: str,
    min_snr_gamma: float | None,
    *,
    mask: torch.Tensor | None = None,
    loss_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error in float32, weighted per sample by min(SNR, gamma)/SNR when set
    (plus 1 for v-prediction, as invoke-training does).

    As in invoke-training: a ``mask`` [B,1,h,w] in [0, 1] (any size; nearest-resized to the
    latents) multiplies the per-element error before the mean over all elements; the Min-SNR
    weight and then ``loss_weight`` [B] (per-example weights) scale each sample's mean."""
    per_element = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    if mask is not None:
        mask = mask.to(device=per_element.device, dtype=per_element.dtype)
        per_element = per_element * F.interpolate(mask, size=per_element.shape[-2:], mode="nearest")
    per_sample = per_element.mean(dim=tuple(range(1, per_element.ndim)))
    if min_snr_gamma is not None:
        ratio = snr(scheduler, timesteps)
        weights = torch.clamp(ratio, max=min_snr_gamma) / ratio
        if prediction_type == "v_prediction":
            weights = weights + 1  # invoke-training floors the velocity weight at one
        per_sample = per_sample * weights
    if loss_weight is not None:
        per_sample = per_sample * loss_weight.to(device=per_sample.device, dtype=per_sample.dtype)
    return per_sample.mean()
