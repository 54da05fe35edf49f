"""GPU speed settings for training, each a no-op off CUDA so CPU runs stay bit-exact:
TF32 matmuls (Ampere+), PyTorch SDPA attention, channels_last UNet, pinned non-blocking
host→device copies. See docs/benchmarks.md for what they are measured against."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def enable_tf32(device: torch.device) -> bool:
    """TF32 for float32 matmuls / convolutions on Ampere or newer (LoRA's fp32 parts)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def ensure_sdpa(unet: nn.Module) -> None:
    """Make every attention layer use ``F.scaled_dot_product_attention`` (flash /
    memory-efficient kernels); diffusers' default, restored if something replaced it. A FLUX
    transformer keeps its own processor (SDPA already; AttnProcessor2_0 cannot run it)."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    processors = getattr(unet, "attn_processors", {})
    fast = (AttnProcessor2_0, FluxAttnProcessor)
    slow = sorted({type(p).__name__ for p in processors.values() if not isinstance(p, fast)})
    if slow:
        log.warning("attention processors %s replaced by SDPA (AttnProcessor2_0)", slow)
        unet.set_attn_processor(AttnProcessor2_0())


def use_channels_last(unet: nn.Module, device: torch.device) -> bool:
    """channels_last UNet weights on CUDA: cuDNN's NHWC convolutions (tensor cores) avoid
    layout transposes around every conv; on CPU the layout stays as loaded."""
    if device.type != "cuda":
        return False
    unet.to(memory_format=torch.channels_last)
    return True


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host→device copy that does not stall the stream: from pinned memory, non-blocking
    (a pageable copy makes the host wait for the GPU). A tensor already on ``device`` is
    returned as is; other moves off CUDA are plain ``.to``."""
    if tensor.device == device or (
        device.type == "cuda" and device.index is None and tensor.is_cuda
    ):
        return tensor
    if device.type != "cuda" or tensor.device.type == "cuda":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def tune_unet(unet: nn.Module, device: torch.device) -> None:
    """SDPA attention everywhere; channels_last on CUDA."""
    ensure_sdpa(unet)
    use_channels_last(unet, device)
