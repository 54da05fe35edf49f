"""Noise-prediction losses: epsilon / v-prediction targets, an l2 / huber / smooth_l1
element loss, and optional Min-SNR weighting."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from runner.training.speed import to_device


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
    mask: torch.Tensor | None = None,
    loss_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The element loss (``element_loss``: squared error unless ``loss_type`` says
    otherwise) in float32, weighted per sample by min(SNR, gamma)/SNR when set (plus 1 for
    v-prediction, as invoke-training does).

    As in invoke-training: a ``mask`` [B,1,h,w] in [0, 1] (any size; nearest-resized to the
    latents) multiplies the per-element error before the mean over all elements; the Min-SNR
    weight and then ``loss_weight`` [B] (per-example weights) scale each sample's mean."""
    per_element = element_loss(model_pred, target, loss_type, huber_c)
    if mask is not None:
        mask = to_device(mask, per_element.device).to(per_element.dtype)
        per_element = per_element * F.interpolate(mask, size=per_element.shape[-2:], mode="nearest")
    per_sample = per_element.mean(dim=tuple(range(1, per_element.ndim)))
    if min_snr_gamma is not None:
        ratio = snr(scheduler, timesteps)
        clamped = torch.clamp(ratio, max=min_snr_gamma)
        # a zero-SNR timestep (zero_terminal_snr) gets the ratio's limit, 1, instead of 0/0
        weights = torch.where(ratio > 0, clamped / ratio, torch.ones_like(ratio))
        if prediction_type == "v_prediction":
            weights = weights + 1  # invoke-training floors the velocity weight at one
        per_sample = per_sample * weights
    if loss_weight is not None:
        per_sample = per_sample * to_device(loss_weight, per_sample.device).to(per_sample.dtype)
    return per_sample.mean()
