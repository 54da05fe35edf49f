"""``RunSettings``: every component's typed settings, built from the config in one place.

Components take their own frozen settings (``ModelSettings``, ``CheckpointSettings``,
``CacheSettings``, ``ValidationSettings``, ``LeaseSettings``), never the whole
``PipelineConfig``; this module is where the config is read for them. (The per-type
pipeline, optimizer and data-loader builders take their config sections directly: those
sections are their typed settings.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from kubetune.config import PipelineConfig
from kubetune.storage.lease import LeaseSettings
from runner.checkpoint.state import CheckpointSettings
from runner.models.loading import ModelSettings
from runner.training.encoder_cache import CacheSettings
from runner.training.validation import ValidationSettings

log = logging.getLogger(__name__)


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
    log_every_n_steps: int
    tensorboard_dir: Path | None
    """Where TensorBoard event files go (``report_to: tensorboard | all``, main process)."""

    @classmethod
    def from_config(
        cls, cfg: PipelineConfig, *, seed: int, work_dir: Path, is_main: bool
    ) -> RunSettings:
        model = ModelSettings.from_config(cfg)
        return cls(
            seed=seed,
            is_main=is_main,
            work_dir=work_dir,
            model=model,
            checkpoint=CheckpointSettings.from_config(
                cfg, seed=seed, work_dir=work_dir, is_main=is_main
            ),
            caches=CacheSettings.from_config(cfg, model, work_dir),
            validation=ValidationSettings.from_config(cfg),
            log_every_n_steps=cfg.log_every_n_steps,
            tensorboard_dir=_tensorboard_dir(cfg, work_dir, is_main),
        )


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
