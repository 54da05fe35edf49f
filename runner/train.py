"""The training orchestrator: ``run(cfg)`` wires storage, checkpoints, models, data, the
pipeline for ``cfg.type``, optimizer and loop, resumes from the newest checkpoint, and
publishes the outputs. See docs/architecture.md for the run layout."""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import tempfile
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from runner.cadence import Cadence
from runner.checkpoint.manifest import Manifest, file_entry
from runner.checkpoint.publish import CheckpointManager
from runner.checkpoint.state import (
    Checkpointer,
    LoopState,
    ResumePoint,
    compat_info,
    fetch_latest,
)
from runner.config import PipelineConfig, config_to_yaml, output_uri
from runner.data.checks import PreflightReport
from runner.data.index import save_index, save_shared_index, shared_index_store
from runner.errors import DataError, UserError
from runner.layout import CONFIG_KEY, final_key, final_manifest_key, step_name, utc_now
from runner.lease import Lease, LeaseSettings
from runner.loop import GeneratorState, Loop, StepRunner
from runner.models.loading import Components, load_components_from_config, to_dtype
from runner.optim import build_lr_scheduler, build_optimizer
from runner.pipelines import TrainingPipeline, build_pipeline
from runner.pipelines.common import enable_gradient_checkpointing
from runner.progress import ProgressReporter, ProgressSettings
from runner.run_events import RunEvents, reported
from runner.run_store import RunStore
from runner.speed import enable_tf32, tune_unet
from runner.storage import ObjectStore, open_store
from runner.validation import ValidationSettings, Validator

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_accelerator(cfg: PipelineConfig) -> Accelerator:
    try:
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    except ValueError as err:
        raise UserError(
            f"mixed_precision {cfg.mixed_precision}: {err}",
            hint="use mixed_precision: no on this machine",
        ) from err
    enable_tf32(accelerator.device)
    return accelerator


def place_models(comps: Components, cfg: PipelineConfig, device: torch.device) -> None:
    """Frozen weights in ``weight_dtype`` on the device (SDXL's VAE stays float32 with
    float16 weights: it overflows in half precision)."""
    dtype = to_dtype(cfg.weight_dtype)
    for module in (comps.unet, *comps.text_encoders):
        module.to(device=device, dtype=dtype)
    vae_dtype = torch.float32 if (comps.is_sdxl and dtype == torch.float16) else dtype
    comps.vae.to(device=device, dtype=vae_dtype)


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


def _resume_point(
    manager: CheckpointManager,
    work_dir: Path,
    cfg: PipelineConfig,
    *,
    resume: bool,
    force_restart: bool,
    is_main: bool,
) -> ResumePoint | None:
    if resume and not force_restart:
        return fetch_latest(manager, work_dir, cfg, heal=is_main)
    if manager.latest() is not None:
        log.warning(
            "starting over: discarding the run's existing checkpoints (%s)",
            "--force-restart" if force_restart else "--no-resume",
        )
        manager.delete_all()
    return None


def run(
    cfg: PipelineConfig,
    *,
    resume: bool = True,
    force_restart: bool = False,
    stop: threading.Event | None = None,
    work_dir: str | Path | None = None,
    data: Future[PreflightReport] | None = None,
) -> RunResult:
    """Train ``cfg`` to completion (raises ``Preempted`` after a SIGTERM checkpoint).
    ``data``: the run's preflight, already started (``runner.data.checks.start_preflight``)."""
    from runner.data.checks import start_preflight

    # a bad dataset fails here, before anything is loaded or written; headers only, and none
    # for images that the index stored with the run (or the one beside the runs, from an
    # earlier run on the same data) already knows
    report = (data or start_preflight(cfg, process=False)).result()  # no fork: torch is loaded
    given = work_dir or os.environ.get("KUBETUNE_WORK_DIR")
    work = Path(given or tempfile.mkdtemp(prefix="kubetune-"))
    try:
        return _run(
            cfg,
            work,
            report,
            resume=resume,
            force_restart=force_restart,
            stop=stop,
        )
    finally:
        if not given:  # staged checkpoints are published (or the run failed): drop them
            shutil.rmtree(work, ignore_errors=True)


def _run(
    cfg: PipelineConfig,
    work: Path,
    data: PreflightReport,
    *,
    resume: bool,
    force_restart: bool,
    stop: threading.Event | None,
) -> RunResult:
    accelerator = make_accelerator(cfg)
    uri = output_uri(cfg)
    raw = open_store(uri, cfg.storage)
    lease = None
    if accelerator.is_main_process:  # the one process that writes holds the run's lease
        settings = LeaseSettings(cfg.lease_timeout_seconds, cfg.lease_wait_seconds)
        lease = Lease(raw, settings).acquire()
    try:
        store = RunStore(raw, guard=lease.check if lease else None)
        events = RunEvents(cfg, store if accelerator.is_main_process else None)
        with reported(events):  # the final report and webhook, whatever the outcome
            return _run_with(
                cfg,
                work,
                data,
                accelerator,
                store,
                uri,
                events,
                resume=resume,
                force_restart=force_restart,
                stop=stop,
            )
    finally:
        if lease is not None:
            lease.release()


def _run_with(
    cfg: PipelineConfig,
    work: Path,
    data: PreflightReport,
    accelerator: Accelerator,
    store: ObjectStore,
    uri: str,
    events: RunEvents,
    *,
    resume: bool,
    force_restart: bool,
    stop: threading.Event | None,
) -> RunResult:
    is_main = accelerator.is_main_process
    manager = CheckpointManager(store, cfg.max_checkpoints)  # store: the retrying RunStore
    if is_main:
        manager.on_published = events.checkpoint
    restored = _resume_point(
        manager, work, cfg, resume=resume, force_restart=force_restart, is_main=is_main
    )
    seed = (
        restored.info["seed"]
        if restored
        else (cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**31))
    )
    seed_everything(seed)
    session = _Session(cfg, accelerator, store, manager, work, seed)
    state = session.prepare(restored, data)
    if is_main:  # only once the model and data loaded: a failed start writes nothing
        store.put_bytes(CONFIG_KEY, config_to_yaml(cfg).encode())
        save_index(store, data)
        save_shared_index(shared_index_store(cfg), data)
    loop = session.loop(stop or threading.Event(), events)
    events.started(state.step)
    try:
        loop.run(state)
    except BaseException:
        session.drain()  # let the last good checkpoint finish publishing before we fail
        raise
    return session.finish(state, uri)


class _Session:
    """The pieces of one run, built in order; split out of ``run`` to keep it readable."""

    def __init__(
        self,
        cfg: PipelineConfig,
        accelerator: Accelerator,
        store: ObjectStore,
        manager: CheckpointManager,
        work: Path,
        seed: int,
    ) -> None:
        self.cfg, self.accelerator, self.store = cfg, accelerator, store
        self.manager, self.work, self.seed = manager, work, seed
        self.is_main = accelerator.is_main_process

    def prepare(self, restored: ResumePoint | None, data: PreflightReport) -> LoopState:
        from runner.data import build_train_dataloader
        from runner.encoder_cache import PersistedCaches

        cfg, device = self.cfg, self.accelerator.device
        comps = load_components_from_config(cfg)
        place_models(comps, cfg, device)
        self.loader = build_train_dataloader(
            cfg,
            seed=self.seed,
            batch_size=cfg.train_batch_size,
            device_is_cuda=device.type == "cuda",
            num_processes=self.accelerator.num_processes,
            process_index=self.accelerator.process_index,
            data=data,
        )
        self.schedule = plan_schedule(cfg, len(self.loader))
        torch.manual_seed(self.seed)  # LoRA init does not depend on what loading consumed
        self.pipeline, optimizer, lr_scheduler = build_training(
            cfg, comps, self.accelerator, self.schedule.total_steps
        )
        if self.pipeline.latents.cache is not None or self.pipeline.text.cache is not None:
            # restored from the run's stored caches, the rest encoded; then encoders off the GPU
            PersistedCaches(cfg, self.pipeline, self.work, is_main=self.is_main).warm(self.loader)
        self.generator = torch.Generator(device).manual_seed(self.seed)
        self.runner = StepRunner(
            self.accelerator,
            self.pipeline,
            optimizer,
            lr_scheduler,
            self.generator,
            cfg.max_grad_norm,
        )
        objects: dict[str, Any] = {
            "optimizer": optimizer,
            "lr_scheduler": lr_scheduler,
            "generator": GeneratorState(self.generator),
            "data": self.loader.sampler,  # the data cursor (epoch, position): its one owner
        }
        if self.accelerator.scaler is not None:
            objects["scaler"] = self.accelerator.scaler
        if self.pipeline.ema is not None:
            objects["ema"] = self.pipeline.ema
        self.checkpointer = Checkpointer(
            Cadence(cfg.save_every_n_steps, cfg.save_every_n_epochs),
            self.manager,
            self.work,
            compat_info(cfg),
            self.pipeline,
            objects,
            seed=self.seed,
            is_main=self.is_main,
        )
        self.restored = restored
        if restored is None:
            return LoopState()
        state = self.checkpointer.restore(restored.folder)
        log.info(
            "resumed from checkpoint %s (epoch %d)%s",
            step_name(state.step),
            self.loader.epoch + 1,
            "".join(f"; set aside {step_name(a.step)} ({a.reason})" for a in restored.set_aside),
        )
        return state

    def loop(self, stop: threading.Event, events: RunEvents) -> Loop:
        cfg, out = self.cfg, self.store if self.is_main else None
        tb_dir = None
        if cfg.report_to in ("tensorboard", "all") and self.is_main:
            tb_dir = self.work / "logs"
        elif cfg.report_to is not None:
            log.warning(
                "report_to: %s is not supported; progress goes to progress.json and the log only",
                cfg.report_to,
            )
        self.progress = ProgressReporter(
            ProgressSettings(
                self.schedule.total_steps,
                self.schedule.steps_per_epoch,
                log_every_n_steps=cfg.log_every_n_steps,
                tensorboard_dir=tb_dir,
                upload_logs=True,
            ),
            out,
            start_step=self.restored.step if self.restored is not None else 0,
        )
        events.attach(self.progress)
        if self.restored is not None:
            self.progress.note(
                step=self.restored.step,
                resumed_from=self.restored.step,
                set_aside=self.restored.set_aside,
                last_checkpoint_step=self.restored.step,
            )
        self.loader.on_bad = self._note_bad
        validator = Validator(
            ValidationSettings.from_config(cfg, self.seed),
            self.pipeline,
            out,
            self.accelerator.device,
            on_images=self.progress.log_images,
        )
        return Loop(
            self.runner,
            self.loader,
            self.checkpointer,
            validator,
            self.progress,
            stop,
            self.schedule.total_steps,
            cfg.gradient_accumulation_steps,
            events,
        )

    def _note_bad(self, bad: list[str]) -> None:
        """Publish the skipped examples in progress.json at once (failed when too many)."""
        self.progress.note(bad_images=len(bad), bad_image_examples=bad[:20])
        if self.is_main:
            self.progress.write("failed" if len(bad) > self.loader.max_bad else None)

    def drain(self) -> None:
        """Wait for an upload in flight, logging (not raising) its failure."""
        try:
            self.checkpointer.wait()
        except Exception as err:  # the original error matters more
            log.error("publishing the last checkpoint failed too: %s", err)

    def finish(self, state: LoopState, uri: str) -> RunResult:
        """Checkpoint the last step, wait for uploads, publish ``final/``."""
        self.checkpointer.save(state)
        self.checkpointer.wait()
        keys: list[str] = []
        if self.is_main:
            final = self.work / "final"
            shutil.rmtree(final, ignore_errors=True)
            with self.pipeline.averaged():
                exported = self.pipeline.export(final)
            entries = []
            for path in exported:
                entries.append(file_entry(final, path.relative_to(final).as_posix()))
                keys.append(final_key(entries[-1].key))
                self.store.put_file(keys[-1], path)
            weights = {"weights": [e.key for e in entries]}
            manifest = Manifest(state.step, utc_now(), tuple(entries), weights)
            self.store.put_bytes(final_manifest_key(), manifest.to_bytes())  # last: complete
            self.progress.note(last_checkpoint_step=state.step)
            self.progress.finish("completed")
        log.info("training finished at step %d; outputs in %s", state.step, uri)
        return RunResult(state.step, uri, keys)
