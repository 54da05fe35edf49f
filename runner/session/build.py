"""``build_session``: the pieces of one run (model, data, pipeline, optimizer, checkpointer,
progress, validator, loop), built in one place from the run's typed settings; ``Session``
holds them and finishes the run (last checkpoint, ``final/``)."""

from __future__ import annotations

import logging
import math
import shutil
import threading
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

from kubetune.checkpoint.manifest import Manifest, file_entry
from kubetune.checkpoint.publish import CheckpointManager
from kubetune.config import PipelineConfig
from kubetune.dataset.preflight import PreflightReport
from kubetune.errors import DataError
from kubetune.layout import final_key, final_manifest_key, step_name, utc_now
from kubetune.storage import ObjectStore
from runner.checkpoint.state import Checkpointer, LoopState, ResumePoint
from runner.models.loading import Components, ModelSettings, load_model, to_dtype
from runner.pipelines import TrainingPipeline, build_pipeline
from runner.pipelines.base import enable_gradient_checkpointing
from runner.reporting.progress import ProgressReporter, ProgressSettings
from runner.reporting.run_events import RunEvents
from runner.session.settings import RunSettings
from runner.training.loop import GeneratorState, Loop, StepRunner
from runner.training.optim import build_lr_scheduler, build_optimizer
from runner.training.speed import tune_unet
from runner.training.validation import Validator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    step: int
    output_uri: str
    final_keys: list[str]


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    steps_per_epoch: int


def plan_schedule(cfg: PipelineConfig, batches_per_epoch: int) -> Schedule:
    if batches_per_epoch == 0:
        raise DataError(
            "the dataset yields no batches", hint="add images or lower train_batch_size"
        )
    per_epoch = math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)
    total = cfg.max_train_steps or per_epoch * (cfg.max_train_epochs or 1)
    return Schedule(total, per_epoch)


def place_models(comps: Components, weight_dtype: str, device: torch.device) -> None:
    """Frozen weights in ``weight_dtype`` on the device (SDXL's VAE stays float32 with
    float16 weights: it overflows in half precision)."""
    dtype = to_dtype(weight_dtype)
    for module in (comps.unet, *comps.text_encoders):
        module.to(device=device, dtype=dtype)
    vae_dtype = torch.float32 if (comps.is_sdxl and dtype == torch.float16) else dtype
    comps.vae.to(device=device, dtype=vae_dtype)


def load_base(settings: ModelSettings, device: torch.device) -> Components:
    """The base model (UNet, VAE, tokenizers, text encoders, base embeddings) loaded and placed
    on ``device``. Writes nothing to the run, so a run does it while its preflight runs."""
    comps = load_model(settings)
    place_models(comps, settings.weight_dtype, device)
    return comps


def build_training(
    cfg: PipelineConfig, comps: Components, accelerator: Accelerator, total_steps: int
) -> tuple[TrainingPipeline, Any, Any]:
    """Pipeline (adapters / tokens added), optimizer and LR scheduler."""
    pipeline = build_pipeline(cfg, comps, accelerator.device, total_steps=total_steps)
    tune_unet(comps.unet, accelerator.device)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing([comps.unet, *comps.text_encoders])
    if cfg.compile_unet:
        comps.unet.compile()
    optimizer = build_optimizer(cfg.optimizer, pipeline.param_groups(), accelerator.device)
    lr_scheduler = build_lr_scheduler(
        cfg.lr_scheduler, optimizer, warmup_steps=cfg.lr_warmup_steps, total_steps=total_steps
    )
    optimizer = accelerator.prepare(optimizer)
    pipeline.set_train(True)
    return pipeline, optimizer, lr_scheduler


@dataclass
class Session:
    """One run's pieces, all built by ``build_session``; ``state`` is where it resumes."""

    settings: RunSettings
    store: ObjectStore
    loader: Any
    pipeline: TrainingPipeline
    checkpointer: Checkpointer
    progress: ProgressReporter
    loop: Loop
    state: LoopState

    def note_bad(self, bad: list[str]) -> None:
        """Publish the skipped examples in progress.json at once (failed when too many)."""
        self.progress.note(bad_images=len(bad), bad_image_examples=bad[:20])
        if self.settings.is_main:
            self.progress.write("failed" if len(bad) > self.loader.max_bad else None)

    def drain(self) -> None:
        """Wait for an upload in flight, logging (not raising) its failure."""
        try:
            self.checkpointer.wait()
        except Exception as err:  # the original error matters more
            log.error("publishing the last checkpoint failed too: %s", err)

    def finish(self, uri: str) -> RunResult:
        """Checkpoint the last step, wait for uploads, publish ``final/``."""
        state = self.state
        self.checkpointer.save(state)
        self.checkpointer.wait()
        keys: list[str] = []
        if self.settings.is_main:
            keys = self._publish_final(state.step)
            self.progress.note(last_checkpoint_step=state.step)
            self.progress.finish("completed")
        log.info("training finished at step %d; outputs in %s", state.step, uri)
        return RunResult(state.step, uri, keys)

    def _publish_final(self, step: int) -> list[str]:
        final = self.settings.work_dir / "final"
        shutil.rmtree(final, ignore_errors=True)
        with self.pipeline.averaged():
            exported = self.pipeline.export(final)
        entries, keys = [], []
        for path in exported:
            entries.append(file_entry(final, path.relative_to(final).as_posix()))
            keys.append(final_key(entries[-1].key))
            self.store.put_file(keys[-1], path)
        weights = {"weights": [e.key for e in entries]}
        manifest = Manifest(step, utc_now(), tuple(entries), weights)
        self.store.put_bytes(final_manifest_key(), manifest.to_bytes())  # last: complete
        return keys


def build_session(
    cfg: PipelineConfig,
    settings: RunSettings,
    accelerator: Accelerator,
    comps: Components,
    store: ObjectStore,
    manager: CheckpointManager,
    restored: ResumePoint | None,
    data: PreflightReport,
    events: RunEvents,
    stop: threading.Event,
) -> Session:
    """From the loaded base model (``load_base``) and the checked data, build the loader,
    pipeline, optimizer, checkpointer, progress, validator and loop, and restore ``restored``
    into them (nothing is written)."""
    from runner.data import build_train_dataloader
    from runner.training.encoder_cache import PersistedCaches

    device, seed = accelerator.device, settings.seed
    loader = build_train_dataloader(
        cfg,
        seed=seed,
        batch_size=cfg.train_batch_size,
        device_is_cuda=device.type == "cuda",
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        data=data,
    )
    schedule = plan_schedule(cfg, len(loader))
    torch.manual_seed(seed)  # LoRA init does not depend on what loading consumed
    pipeline, optimizer, lr_scheduler = build_training(
        cfg, comps, accelerator, schedule.total_steps
    )
    if pipeline.latents.cache is not None or pipeline.text.cache is not None:
        # restored from the run's stored caches, the rest encoded; then encoders off the GPU
        PersistedCaches(settings.caches, pipeline, is_main=settings.is_main).warm(loader)
    generator = torch.Generator(device).manual_seed(seed)
    runner = StepRunner(
        accelerator, pipeline, optimizer, lr_scheduler, generator, cfg.max_grad_norm
    )
    objects: dict[str, Any] = {
        "optimizer": optimizer,
        "lr_scheduler": lr_scheduler,
        "generator": GeneratorState(generator),
        "data": loader.sampler,  # the data cursor (epoch, position): its one owner
        "skipped": SkippedExamples(loader),  # so a resumed run keeps counting bad images
    }
    if accelerator.scaler is not None:
        objects["scaler"] = accelerator.scaler
    if pipeline.ema is not None:
        objects["ema"] = pipeline.ema
    checkpointer = Checkpointer(settings.checkpoint, manager, pipeline, objects)
    state = _restore(checkpointer, restored, loader)
    out = store if settings.is_main else None
    progress = _progress(settings, schedule, out, restored, events)
    validator = Validator(settings.validation, pipeline, out, device,
                          on_images=progress.log_images, autocast=accelerator.autocast)  # fmt: skip
    loop = Loop(runner, loader, checkpointer, validator, progress, stop,
                schedule.total_steps, cfg.gradient_accumulation_steps, events)  # fmt: skip
    session = Session(settings, store, loader, pipeline, checkpointer, progress, loop, state)
    loader.on_bad = session.note_bad
    if loader.bad:  # skipped before the restart: progress.json names them again
        session.note_bad(list(loader.bad))
    return session


class SkippedExamples:
    """The loader's skipped (unreadable) examples as a checkpoint entry."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def state_dict(self) -> dict[str, Any]:
        return {"examples": list(self.loader.bad)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.bad = dict.fromkeys(state.get("examples", []))


def _restore(checkpointer: Checkpointer, restored: ResumePoint | None, loader: Any) -> LoopState:
    if restored is None:
        return LoopState()
    state = checkpointer.restore(restored.folder)
    log.info(
        "resumed from checkpoint %s (epoch %d)%s",
        step_name(state.step),
        loader.epoch + 1,
        "".join(f"; set aside {step_name(a.step)} ({a.reason})" for a in restored.set_aside),
    )
    return state


def _progress(
    settings: RunSettings,
    schedule: Schedule,
    out: ObjectStore | None,
    restored: ResumePoint | None,
    events: RunEvents,
) -> ProgressReporter:
    progress = ProgressReporter(
        ProgressSettings(
            schedule.total_steps,
            schedule.steps_per_epoch,
            log_every_n_steps=settings.log_every_n_steps,
            tensorboard_dir=settings.tensorboard_dir,
            upload_logs=True,
        ),
        out,
        start_step=restored.step if restored is not None else 0,
    )
    events.attach(progress)
    if restored is not None:
        progress.note(
            step=restored.step,
            resumed_from=restored.step,
            set_aside=restored.set_aside,
            last_checkpoint_step=restored.step,
        )
    return progress
