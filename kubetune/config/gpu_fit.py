"""Will the run fit its GPU? A rough, torch-free estimate of one training process's GPU
memory, compared with the GPU the Job asks for (``job.gpu_memory_gib`` or the memory in a
``nvidia.com/gpu.product`` node selector such as ``NVIDIA-A100-SXM4-80GB``).

``launcher validate`` warns only when the estimate clearly exceeds the GPU (by more than
``MARGIN``): the figures are arithmetic on parameter counts and token counts (weights in
``weight_dtype``, float32 LoRA weights with their gradients and two Adam moments, activations
per token and block), not measurements; docs/coming-from-invoke-training.md gives them for
invoke-training's sample configs. Types register an estimator in ``ESTIMATORS``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

GIB = 2**30
MARGIN = 1.1
"""Warn when the estimate exceeds the GPU's memory by more than this factor."""
OVERHEAD_GIB = 1.5
"""CUDA context, allocator slack and kernels' workspaces."""
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Parameter counts of FLUX.1-dev's components (schnell: the same without the guidance MLP).
FLUX_TRANSFORMER = 11.9e9
FLUX_T5_XXL = 4.89e9  # the encoder with its embedding (T5 v1.1 XXL)
FLUX_CLIP_L = 0.123e9
FLUX_VAE = 0.084e9
FLUX_BLOCKS, FLUX_WIDTH = 57, 3072  # 19 double + 38 single blocks, hidden width
FLUX_LORA_PARAMS_PER_RANK = 3.5e6  # the default flux_lora_target_modules at rank 1
# Bytes kept per token, hidden unit and block: with gradient checkpointing only each block's
# input (and one block's recomputation); without, every intermediate of every block.
ACTIVATION_FACTOR = {True: 1.2, False: 16.0}
# GPU products whose label does not spell out the memory.
KNOWN_GPUS = {
    "T4": 16,
    "A10G": 24,
    "A10": 24,
    "L4": 24,
    "L40": 48,
    "L40S": 48,
    "A40": 48,
    "RTX-4090": 24,
    "RTX-A6000": 48,
    "H100": 80,
    "H200": 141,
    "B200": 180,
}


def gpu_memory_gib(job: Any) -> float | None:
    """The GPU memory the Job asks for: ``job.gpu_memory_gib``, else read from a
    ``*gpu.product`` node selector (``…-80GB…`` or a known product name)."""
    if job is None:
        return None
    if job.gpu_memory_gib is not None:
        return float(job.gpu_memory_gib)
    for key, value in job.node_selector.items():
        if key.endswith("gpu.product"):
            return product_memory_gib(value)
    return None


def product_memory_gib(product: str) -> float | None:
    """``NVIDIA-A100-SXM4-40GB`` → 40; ``NVIDIA-A10G`` → 24; unknown → None."""
    found = re.search(r"(\d+)\s*GB", product, re.IGNORECASE)
    if found:
        return float(found.group(1))
    name = re.sub(r"^(NVIDIA|Tesla)[-_ ]", "", product, flags=re.IGNORECASE).upper()
    best = max((k for k in KNOWN_GPUS if name.startswith(k)), key=len, default=None)
    return float(KNOWN_GPUS[best]) if best else None


def flux_lora_gib(cfg: Any) -> dict[str, float] | None:
    """FLUX_LORA's peak GPU memory by part, in GiB (None for the tiny built-in model): the
    larger of a training step and validation (which brings cached-away encoders back unless
    enable_cpu_offload_during_validation, which keeps one model on the GPU at a time)."""
    if str(cfg.model).startswith("builtin:"):
        return None
    size = DTYPE_BYTES[cfg.weight_dtype]
    transformer = FLUX_TRANSFORMER * size / GIB
    encoders = (FLUX_T5_XXL + FLUX_CLIP_L) * size / GIB
    vae = FLUX_VAE * size / GIB
    lora = FLUX_LORA_PARAMS_PER_RANK * cfg.lora_rank_dim * cfg.train_transformer * 16 / GIB
    tokens = _image_tokens(cfg.data_loader) + cfg.t5_tokenizer_max_length
    factor = ACTIVATION_FACTOR[bool(cfg.gradient_checkpointing)]
    per_sample = FLUX_BLOCKS * tokens * FLUX_WIDTH * size * factor / GIB
    train = {"transformer": transformer, "LoRA + Adam": lora}
    if not cfg.cache_text_encoder_outputs:
        train["text encoders"] = encoders
    if not cfg.cache_vae_outputs:
        train["VAE"] = vae
    train["activations"] = per_sample * cfg.train_batch_size
    train["overhead"] = OVERHEAD_GIB
    if not cfg.validation_prompts:
        return train
    validate = {"transformer": transformer, "LoRA + Adam": lora, "overhead": OVERHEAD_GIB}
    if not cfg.enable_cpu_offload_during_validation:
        validate.update({"text encoders (validation)": encoders, "VAE": vae})
    return validate if sum(validate.values()) > sum(train.values()) else train


def _image_tokens(loader: Any) -> int:
    """Latent tokens of the largest training image: one per 16×16 pixels."""
    buckets = loader.aspect_ratio_buckets
    if buckets is not None:
        side = buckets.target_resolution
        return (side // 16) ** 2
    res = loader.resolution
    h, w = (res, res) if isinstance(res, int) else res
    return (h // 16) * (w // 16)


# SDXL base 1.0's parameter counts: UNet; CLIP-L (123 M) + OpenCLIP-G with projection (695 M).
SDXL_UNET = 2.567e9
SDXL_TEXT_ENCODERS = 0.817e9
SDXL_VAE = 0.084e9
SDXL_ACTIVATIONS_GIB = {True: 1.5, False: 12.0}
"""Activations kept per 1024×1024 training image in 16-bit, with / without gradient
checkpointing: set so that invoke-training's "1x24gb" fine-tune samples (batch 4,
checkpointing, bf16 + 8-bit AdamW) come to ~22 GiB; an assumption, not a measurement."""


def _optimizer_bytes(optimizer: Any, param_bytes: int) -> float:
    """Optimizer state per trained parameter: AdamW two moments in the parameter's dtype
    (bitsandbytes' 8-bit: one byte each), Prodigy four tensors."""
    if optimizer.optimizer_type == "Prodigy":
        return 4 * param_bytes
    return 2 if optimizer.use_8bit else 2 * param_bytes


def sdxl_finetune_gib(cfg: Any) -> dict[str, float] | None:
    """SDXL_FINETUNE's GPU memory by part, in GiB (None for a built-in tiny model). The UNet
    trains in weight_dtype without mixed precision, in float32 with it."""
    if str(cfg.model).startswith("builtin:"):
        return None
    size = DTYPE_BYTES[cfg.weight_dtype]
    train = 4 if cfg.mixed_precision != "no" else size
    parts = {"UNet": SDXL_UNET * train / GIB, "gradients": SDXL_UNET * train / GIB}
    parts["optimizer"] = SDXL_UNET * _optimizer_bytes(cfg.optimizer, train) / GIB
    if cfg.ema_decay is not None and not cfg.ema_on_cpu:
        parts["EMA"] = SDXL_UNET * 4 / GIB
    if not cfg.cache_text_encoder_outputs:
        parts["text encoders"] = SDXL_TEXT_ENCODERS * size / GIB
    if not cfg.cache_vae_outputs:
        parts["VAE"] = SDXL_VAE * 4 / GIB
    tokens = _image_tokens(cfg.data_loader) / (1024 // 16) ** 2  # in 1024² images
    act = 2 if cfg.mixed_precision != "no" or size == 2 else 4
    per_image = SDXL_ACTIVATIONS_GIB[bool(cfg.gradient_checkpointing)] * tokens * act / 2
    parts["activations"] = per_image * cfg.train_batch_size
    parts["overhead"] = OVERHEAD_GIB
    return parts


ESTIMATORS: dict[str, Callable[[Any], dict[str, float] | None]] = {
    "FLUX_LORA": flux_lora_gib,
    "SDXL_FINETUNE": sdxl_finetune_gib,
}


def gpu_fit_warnings(cfg: Any) -> list[str]:
    """One line when the estimate clearly exceeds the Job's GPU memory, naming the parts."""
    estimate = ESTIMATORS.get(cfg.type)
    have = gpu_memory_gib(cfg.job)
    parts = estimate(cfg) if estimate is not None and have is not None else None
    if not parts or have is None:
        return []
    need = sum(parts.values())
    if need <= have * MARGIN:
        return []
    detail = ", ".join(f"{name} {gib:.1f}" for name, gib in parts.items())
    return [
        f"job: {cfg.type} needs about {need:.0f} GiB of GPU memory per process ({detail}; an "
        f"estimate) but the GPU has {have:.0f} GiB: {_advice(cfg)}"
    ]


def _advice(cfg: Any) -> str:
    tips = []
    if not getattr(cfg, "gradient_checkpointing", True):
        tips.append("gradient_checkpointing: true")
    if not getattr(cfg, "cache_text_encoder_outputs", True):
        tips.append("cache_text_encoder_outputs: true (text encoders leave the GPU)")
    optimizer = getattr(cfg, "optimizer", None)
    if cfg.type == "SDXL_FINETUNE" and optimizer.optimizer_type == "AdamW":
        if not optimizer.use_8bit:
            tips.append("optimizer.use_8bit: true")
        if cfg.mixed_precision != "no":
            tips.append("mixed_precision: no (the UNet then trains in weight_dtype)")
    if cfg.train_batch_size > 1:
        tips.append("a smaller train_batch_size with gradient_accumulation_steps")
    tips.append("or a larger GPU")
    return "try " + ", ".join(tips)
