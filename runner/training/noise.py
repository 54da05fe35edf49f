"""How a training step noises its latents: offset noise, input perturbation, the timestep
sampling strategy and the zero-terminal-SNR schedule (the knobs of ``kubetune.config.extensions``).

Every random draw uses the step's generator and happens only when its knob is on, so a
config that leaves the knobs out consumes exactly the random numbers it did before.

With several processes (``Rows``) every draw is made for the whole global batch, on every
rank, from generators seeded alike, and each rank keeps its examples' rows: what an example
gets depends on its place in the global batch, never on the rank that trains it, and the
generators stay in step on all ranks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler
from torch import nn

from kubetune.config import PipelineConfig
from kubetune.config.extensions import DEFAULT_BIAS_MULTIPLIER, DEFAULT_BIAS_PORTION


@dataclass(frozen=True)
class Rows:
    """The rows of its global batch (``size`` examples) that a micro-batch holds, in order."""

    index: torch.Tensor | None
    """The rows (on the draws' device); None: all of them, in order."""
    size: int

    @classmethod
    def of(cls, batch: dict[str, Any], device: torch.device) -> Rows:
        """From the loader's ``rows`` / ``global_size``; a batch without them is whole."""
        if "rows" not in batch:
            return cls(None, len(batch["caption"]))
        rows, size = list(batch["rows"]), int(batch["global_size"])
        if rows == list(range(size)):  # host integers: no device sync
            return cls(None, size)
        return cls(torch.tensor(rows, device=device), size)

    def take(self, drawn: torch.Tensor) -> torch.Tensor:
        """This micro-batch's rows of a draw made for the whole global batch."""
        return drawn if self.index is None else drawn[self.index.to(drawn.device)]

    def randn(
        self, tail: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype
    ) -> torch.Tensor:
        shape = (self.size, *tail)
        drawn = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
        return self.take(drawn)


class DropoutRows:
    """The rows of the micro-batch being trained, for ``RowDropout`` (set by the pipeline's
    ``loss``; a plain attribute, read also by autograd's threads when gradient checkpointing
    recomputes a forward during backward)."""

    current: Rows | None = None


class RowDropout(nn.Module):
    """Dropout whose mask is drawn for the whole global batch (torch's RNG, seeded alike on
    every rank) and sliced to this process's rows: the mask an example gets does not depend
    on the rank. One process: the rows are the batch."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.p:
            return x
        rows = DropoutRows.current
        if rows is None or rows.size < x.shape[0]:
            rows = whole(x)
        keep = 1.0 - self.p
        mask = torch.empty((rows.size, *x.shape[1:]), device=x.device, dtype=x.dtype)
        return x * rows.take(mask.bernoulli_(keep)) / keep


def whole(tensor: torch.Tensor) -> Rows:
    """A micro-batch that is its whole global batch (one process)."""
    return Rows(None, tensor.shape[0])


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

    def offset(
        self, noise: torch.Tensor, generator: torch.Generator, rows: Rows | None = None
    ) -> torch.Tensor:
        """Offset noise: one extra gaussian value per (image, channel), scaled."""
        if not self.noise_offset:
            return noise
        rows = rows or whole(noise)
        extra = rows.randn((noise.shape[1], *([1] * (noise.ndim - 2))), generator, noise.dtype)
        return noise + self.noise_offset * extra.to(noise.device)

    def perturbed(
        self, noise: torch.Tensor, generator: torch.Generator, rows: Rows | None = None
    ) -> torch.Tensor:
        """The noise the latents are noised with (the target stays ``noise``)."""
        if not self.input_perturbation:
            return noise
        rows = rows or whole(noise)
        extra = rows.randn(tuple(noise.shape[1:]), generator, noise.dtype)
        return noise + self.input_perturbation * extra.to(noise.device)

    def timesteps(
        self, count: int | Rows, num_train_timesteps: int, generator: torch.Generator
    ) -> torch.Tensor:
        """Training timesteps in [0, num_train_timesteps) for ``count`` examples (or the
        rows of a global batch), on the generator's device, by the configured strategy."""
        device = generator.device
        if isinstance(count, int):
            count = Rows(None, count)
        size, total = count.size, num_train_timesteps
        if self.timestep_sampling == "uniform":
            drawn = torch.randint(0, total, (size,), generator=generator, device=device)
        elif self.timestep_sampling == "logit_normal":
            u = torch.sigmoid(torch.randn((size,), generator=generator, device=device))
            drawn = (u * num_train_timesteps).long().clamp_(max=num_train_timesteps - 1)
        else:
            cdf = bias_cdf(
                total, self.timestep_sampling, self.bias_multiplier, self.bias_portion, device
            )
            u = torch.rand((size,), generator=generator, device=device)
            drawn = torch.searchsorted(cdf, u, right=True).clamp_(max=total - 1)
        return count.take(drawn)


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
