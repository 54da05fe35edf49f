"""``RunSettings``: every component's typed settings, made from the config here and only here.

Components take their own frozen settings (``ModelSettings``, ``CheckpointSettings``,
``CacheSettings``, ``ValidationSettings``, ``LeaseSettings``, ``TrainingSettings``), never the
whole ``PipelineConfig``: this module is where the config is read for them. (The per-type
pipeline, optimizer and data-loader builders take their config sections directly: those
sections are their typed settings.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kubetune.config import FluxLoraConfig, PipelineConfig, output_uri
from kubetune.storage.lease import LeaseSettings
from runner.checkpoint.state import COMPAT_FIELDS, CheckpointSettings
from runner.data.cache import cache_namespace
from runner.data.transforms import resolution_hw
from runner.models.loading import ModelSettings
from runner.training.cadence import Cadence
from runner.training.distributed import DEFAULT_TIMEOUT_MINUTES
from runner.training.encoder_cache import CacheSettings
from runner.training.validation import ValidationSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingSettings:
    """The loop's own fields: batch, accumulation, gradient clipping, logging cadence."""

    train_batch_size: int
    gradient_accumulation_steps: int
    max_grad_norm: float | None
    max_train_steps: int | None
    max_train_epochs: int | None
    log_every_n_steps: int


@dataclass(frozen=True)
class RunSettings:
    """The settings of one run's components (``seed``: the run's, restored on resume)."""

    seed: int
    is_main: bool
    work_dir: Path
    model: ModelSettings
    checkpoint: CheckpointSettings
    caches: CacheSettings
    validation: ValidationSettings
    training: TrainingSettings
    tensorboard_dir: Path | None
    """Where TensorBoard event files go (``report_to: tensorboard | all``, main process)."""

    @classmethod
    def from_config(
        cls, cfg: PipelineConfig, *, seed: int, work_dir: Path, is_main: bool
    ) -> RunSettings:
        model = model_settings(cfg)
        return cls(
            seed=seed,
            is_main=is_main,
            work_dir=work_dir,
            model=model,
            checkpoint=checkpoint_settings(cfg, seed=seed, work_dir=work_dir, is_main=is_main),
            caches=cache_settings(cfg, model, work_dir),
            validation=validation_settings(cfg),
            training=training_settings(cfg),
            tensorboard_dir=_tensorboard_dir(cfg, work_dir, is_main),
        )


def model_settings(cfg: PipelineConfig) -> ModelSettings:
    """The base model fields: what ``runner.models.loading.load_model`` reads (those every
    type has, then FLUX's or SD's own)."""
    every_type = ModelSettings(
        cfg.model,
        hf_variant=cfg.hf_variant,
        weight_dtype=cfg.weight_dtype,
        single_file_config=cfg.single_file_config,
        storage=cfg.storage,
    )
    if isinstance(cfg, FluxLoraConfig):
        return replace(
            every_type,
            family="flux",
            transformer_path=cfg.transformer_path,
            text_encoder_1_path=cfg.text_encoder_1_path,
            text_encoder_2_path=cfg.text_encoder_2_path,
        )
    return replace(
        every_type,
        vae_model=cfg.vae_model,
        prediction_type=cfg.prediction_type,
        base_embeddings=cfg.base_embeddings,
    )


def training_settings(cfg: PipelineConfig) -> TrainingSettings:
    return TrainingSettings(
        train_batch_size=cfg.train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_grad_norm=cfg.max_grad_norm,
        max_train_steps=cfg.max_train_steps,
        max_train_epochs=cfg.max_train_epochs,
        log_every_n_steps=cfg.log_every_n_steps,
    )


def compat_info(cfg: PipelineConfig) -> dict[str, Any]:
    """The config fields that decide the shape/meaning of the trained weights: a checkpoint
    resumes only under a config that agrees on them."""
    dumped = cfg.model_dump(mode="json")
    info = {k: dumped[k] for k in COMPAT_FIELDS if k in dumped}
    info["ema"] = cfg.ema_decay is not None  # the checkpoint holds EMA state or not
    info["optimizer"] = optimizer_kind(cfg)  # its state's layout (8-bit AdamW's differs)
    return info


def optimizer_kind(cfg: PipelineConfig) -> str:
    """``AdamW``, ``AdamW-8bit`` or ``Prodigy``: what the saved optimizer state is."""
    opt = cfg.optimizer
    return f"{opt.optimizer_type}{'-8bit' if getattr(opt, 'use_8bit', False) else ''}"


def checkpoint_settings(
    cfg: PipelineConfig, *, seed: int, work_dir: Path, is_main: bool = True
) -> CheckpointSettings:
    cadence = Cadence(cfg.save_every_n_steps, cfg.save_every_n_epochs)
    return CheckpointSettings(cadence, work_dir, seed, compat_info(cfg), is_main)


def cache_settings(cfg: PipelineConfig, model: ModelSettings, work_dir: Path) -> CacheSettings:
    """Where the encoder caches live: the run folder for a local run, else a work folder
    mirrored to ``<run output>/cache`` so a restarted pod reuses them."""
    ident, out = model.identity(), output_uri(cfg)
    local = Path(out) / "cache" if cfg.storage is None else work_dir / "cache"
    mirror = f"{out}/cache" if cfg.storage is not None else None
    namespaces = {kind: cache_namespace(cfg, kind, ident) for kind in ("vae", "text")}
    return CacheSettings(local, namespaces, mirror, cfg.storage)


def validation_settings(cfg: PipelineConfig) -> ValidationSettings:
    height, width = resolution_hw(cfg.data_loader.resolution)
    # diffusers pipelines need sides divisible by 8 (invoke-training would fail here).
    height, width = max(8, height // 8 * 8), max(8, width // 8 * 8)
    return ValidationSettings(
        list(cfg.validation_prompts),
        cfg.negative_validation_prompts,
        cfg.num_validation_images_per_prompt,
        Cadence(cfg.validate_every_n_steps, cfg.validate_every_n_epochs),
        cfg.enable_cpu_offload_during_validation,
        cfg.seed,
        height,
        width,
        cfg.num_validation_inference_steps,
        _flux_validation_kwargs(cfg) if isinstance(cfg, FluxLoraConfig) else {},
    )


def _flux_validation_kwargs(cfg: FluxLoraConfig) -> dict[str, Any]:
    """T5 sees as many tokens as in training; negative prompts act through true CFG."""
    kwargs: dict[str, Any] = {"max_sequence_length": cfg.t5_tokenizer_max_length}
    if cfg.negative_validation_prompts is not None:
        kwargs["true_cfg_scale"] = cfg.validation_true_cfg_scale
    return kwargs


def process_group_timeout(cfg: PipelineConfig) -> float:
    """Minutes a rank waits in a collective (``job.process_group_timeout_minutes``; local
    runs: ``runner.training.distributed.DEFAULT_TIMEOUT_MINUTES``)."""
    job = cfg.job
    return job.process_group_timeout_minutes if job is not None else DEFAULT_TIMEOUT_MINUTES


def lease_settings(cfg: PipelineConfig) -> LeaseSettings:
    """The run lease's timings (needed before the seed is known, so outside ``RunSettings``)."""
    return LeaseSettings(cfg.lease_timeout_seconds, cfg.lease_wait_seconds)


def _tensorboard_dir(cfg: PipelineConfig, work_dir: Path, is_main: bool) -> Path | None:
    if cfg.report_to in ("tensorboard", "all"):
        return work_dir / "logs" if is_main else None
    if cfg.report_to is not None:
        log.warning(
            "report_to: %s is not supported; progress goes to progress.json and the log only",
            cfg.report_to,
        )
    return None
