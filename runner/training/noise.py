"""How a training step noises its latents: offset noise, input perturbation, the timestep
sampling strategy and the zero-terminal-SNR schedule (the knobs of ``kubetune.config.extensions``).

Every random draw uses the step's generator and happens only when its knob is on, so a
config that leaves the knobs out consumes exactly the random numbers it did before.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from kubetune.config import PipelineConfig
from kubetune.config.extensions import DEFAULT_BIAS_MULTIPLIER, DEFAULT_BIAS_PORTION


@dataclass(frozen=True)
class NoiseSettings:
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    timestep_sampling: str = "uniform"
    bias_multiplier: float = DEFAULT_BIAS_MULTIPLIER
    bias_portion: float = DEFAULT_BIAS_PORTION

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> NoiseSettings:
        return cls(
            cfg.noise_offset,
            cfg.input_perturbation,
            cfg.timestep_sampling,
            cfg.timestep_bias_multiplier or DEFAULT_BIAS_MULTIPLIER,
            cfg.timestep_bias_portion or DEFAULT_BIAS_PORTION,
        )

    def offset(self, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Offset noise: one extra gaussian value per (image, channel), scaled."""
        if not self.noise_offset:
            return noise
        shape = (*noise.shape[:2], *([1] * (noise.ndim - 2)))
        extra = torch.randn(shape, generator=generator, device=noise.device, dtype=noise.dtype)
        return noise + self.noise_offset * extra

    def perturbed(self, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The noise the latents are noised with (the target stays ``noise``)."""
        if not self.input_perturbation:
            return noise
        extra = torch.randn(
            noise.shape, generator=generator, device=noise.device, dtype=noise.dtype
        )
        return noise + self.input_perturbation * extra

    def timesteps(
        self, count: int, num_train_timesteps: int, generator: torch.Generator
    ) -> torch.Tensor:
        """``count`` training timesteps in [0, num_train_timesteps), on the generator's
        device, drawn by the configured strategy."""
        device = generator.device
        if self.timestep_sampling == "uniform":
            return torch.randint(
                0, num_train_timesteps, (count,), generator=generator, device=device
            )
        if self.timestep_sampling == "logit_normal":
            u = torch.sigmoid(torch.randn((count,), generator=generator, device=device))
            return (u * num_train_timesteps).long().clamp_(max=num_train_timesteps - 1)
        cdf = bias_cdf(
            num_train_timesteps,
            self.timestep_sampling,
            self.bias_multiplier,
            self.bias_portion,
            device,
        )
        u = torch.rand((count,), generator=generator, device=device)
        return torch.searchsorted(cdf, u, right=True).clamp_(max=num_train_timesteps - 1)


@functools.lru_cache(maxsize=8)
def bias_cdf(
    total: int, strategy: str, multiplier: float, portion: float, device: torch.device
) -> torch.Tensor:
    """The cumulative distribution of ``bias_weights`` on ``device``, built once: a timestep
    is drawn as the first index whose CDF exceeds a uniform number (inverse CDF). Unlike
    ``torch.multinomial``, which reads its probabilities back to the host (``.item()``) when
    it draws one sample (batch 1), this never syncs, and no weights are copied per step."""
    weights = bias_weights(total, strategy, multiplier, portion).double()
    cdf = (weights.cumsum(0) / weights.sum()).float()
    return cdf.to(device)


def bias_weights(total: int, strategy: str, multiplier: float, portion: float) -> torch.Tensor:
    """Relative probability of each timestep: the earliest (low-noise) or latest
    (high-noise) ``portion`` of them weighs ``multiplier``, the rest 1."""
    weights = torch.ones(total, dtype=torch.float32)
    favoured = max(1, round(total * portion))
    if strategy == "earlier":
        weights[:favoured] = multiplier
    elif strategy == "later":
        weights[total - favoured :] = multiplier
    else:
        raise ValueError(f"unknown biased timestep strategy {strategy!r}")
    return weights


def zero_terminal_snr_scheduler(scheduler: DDPMScheduler) -> DDPMScheduler:
    """The same schedule with betas rescaled so the last timestep has zero SNR, and
    trailing timestep spacing for inference (Lin et al. 2023)."""
    return DDPMScheduler.from_config(
        scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing"
    )
