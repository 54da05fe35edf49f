"""Optimizer and learning-rate schedule from the typed config sections."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from typing import Any

import torch
from diffusers.optimization import get_scheduler
from packaging.version import Version
from torch.optim.lr_scheduler import LRScheduler

from kubetune.config import AdamOptimizerConfig, ProdigyOptimizerConfig
from kubetune.errors import UserError

log = logging.getLogger(__name__)
ParamGroups = list[dict[str, Any]]


EIGHT_BIT_ON_CPU = "0.50"
"""The first bitsandbytes release whose 8-bit optimizers run on the CPU (0.49 refuses CPU
tensors: "All input tensors need to be on the same GPU")."""


def bitsandbytes_version() -> str | None:
    """The installed bitsandbytes version (read without importing it), or None."""
    try:
        return importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_optimizer(cfg: AdamOptimizerConfig | ProdigyOptimizerConfig, device_type: str) -> None:
    """Raise ``UserError`` now if ``cfg`` cannot be built on ``device_type`` (8-bit AdamW
    without a bitsandbytes that runs there, a missing prodigyopt): a run checks this before it
    loads the model, so a misplaced pod fails in seconds instead of after a multi-GB
    download."""
    if isinstance(cfg, ProdigyOptimizerConfig):
        _need("prodigyopt", "optimizer Prodigy needs prodigyopt",
              "pip install prodigyopt, or use optimizer_type: AdamW")  # fmt: skip
        return
    if not cfg.use_8bit:
        return
    version = bitsandbytes_version()
    if version is None:
        raise UserError("optimizer.use_8bit needs bitsandbytes: pip install 'kubetune[adam8bit]'",
                        hint="or set optimizer.use_8bit: false")  # fmt: skip
    if device_type == "cuda":
        return
    if device_type != "cpu":
        raise UserError(
            f"optimizer.use_8bit needs a CUDA GPU or the CPU (training runs on {device_type})",
            hint="set optimizer.use_8bit: false",
        )
    if Version(version) < Version(EIGHT_BIT_ON_CPU):
        raise UserError(
            f"optimizer.use_8bit on the CPU needs bitsandbytes >= {EIGHT_BIT_ON_CPU} "
            f"(installed: {version})",
            hint="pip install -U 'kubetune[adam8bit]', run on a GPU node (job.gpus), or set "
            "optimizer.use_8bit: false",
        )


def _need(module: str, message: str, hint: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UserError(message, hint=hint)


def build_optimizer(
    cfg: AdamOptimizerConfig | ProdigyOptimizerConfig, groups: ParamGroups, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA; 8-bit with bitsandbytes when asked) or Prodigy.

    Each group carries its own ``lr``; groups without one use ``cfg.learning_rate``.
    """
    groups = [{"lr": cfg.learning_rate, **g} for g in groups]
    if isinstance(cfg, ProdigyOptimizerConfig):
        return _prodigy(cfg, groups)
    kwargs = dict(
        lr=cfg.learning_rate,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.epsilon,
        weight_decay=cfg.weight_decay,
    )
    if cfg.use_8bit:
        check_optimizer(cfg, device.type)
        return _adamw_8bit(groups, kwargs)
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **kwargs)


def _adamw_8bit(groups: ParamGroups, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(
            "optimizer.use_8bit needs bitsandbytes: pip install 'kubetune[adam8bit]'",
            hint="or set optimizer.use_8bit: false",
        ) from None
    return bnb.optim.AdamW8bit(groups, **kwargs)


def _prodigy(cfg: ProdigyOptimizerConfig, groups: ParamGroups) -> torch.optim.Optimizer:
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise UserError(
            "optimizer Prodigy needs prodigyopt",
            hint="pip install prodigyopt, or use optimizer_type: AdamW",
        ) from None
    return Prodigy(
        groups,
        lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        use_bias_correction=cfg.use_bias_correction,
        safeguard_warmup=cfg.safeguard_warmup,
    )


def build_lr_scheduler(
    name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int
) -> LRScheduler:
    """diffusers' scheduler factory, stepped once per optimizer step."""
    return get_scheduler(
        name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps
    )
