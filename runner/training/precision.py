"""Mixed-precision boundaries: what must not run under the step's autocast.

A float32 VAE computes in float32 even inside ``accelerator.autocast()`` (bf16 / fp16): the
diffusers examples and invoke-training encode outside autocast (accelerate autocasts only the
prepared UNet's forward), and the SDXL VAE overflows to NaN in fp16. A VAE held in the weight
dtype computes in that dtype, as before.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn


def autocast_off(device: torch.device) -> AbstractContextManager[Any]:
    """Autocast disabled for ``device``'s type: modules compute in their own dtype."""
    return torch.autocast(device.type, enabled=False)


@contextmanager
def vae_decode_outside_autocast(vae: nn.Module) -> Iterator[None]:
    """For the block, ``vae.decode`` (as a diffusers pipeline calls it) runs with autocast
    off, its latents cast to the VAE's dtype; the method is restored afterwards."""
    original = vae.decode

    @functools.wraps(original)
    def decode(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with autocast_off(latents.device):
            return original(latents.to(vae.dtype), *args, **kwargs)

    vae.decode = decode  # an instance attribute shadows the method
    try:
        yield
    finally:
        del vae.decode
