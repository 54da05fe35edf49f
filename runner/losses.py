"""Noise-prediction losses: epsilon / v-prediction targets, an l2 / huber / smooth_l1
element loss, and optional Min-SNR weighting."""

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


def element_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: float = 0.1
) -> torch.Tensor:
    """Per-element loss in float32: squared error (``l2``) or pseudo-Huber,
    ``2c(sqrt(d² + c²) - c)`` (``huber``) / ``2(sqrt(d² + c²) - c)`` (``smooth_l1``)."""
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    root = torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c
    if loss_type == "huber":
        return 2 * huber_c * root
    if loss_type == "smooth_l1":
        return 2 * root
    raise ValueError(f"unknown loss_type {loss_type!r}")


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    prediction_type: str,
    min_snr_gamma: float | None,
    *,
    loss_type: str = "l2",
    huber_c: float = 0.1,
) -> torch.Tensor:
    """The element loss (``element_loss``) averaged per sample, weighted per sample by
    min(SNR, gamma)/SNR when set (divided by SNR+1 for v-prediction, Hang et al. 2023)."""
    per_sample = element_loss(model_pred, target, loss_type, huber_c)
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
    if min_snr_gamma is None:
        return per_sample.mean()
    ratio = snr(scheduler, timesteps)
    weights = torch.clamp(ratio, max=min_snr_gamma)
    weights = weights / (ratio + 1) if prediction_type == "v_prediction" else weights / ratio
    return (per_sample * weights).mean()
