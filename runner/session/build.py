"""``build_session``: the one builder of a run. From the loaded base model and checked data
(``runner.session.load.Loaded``) and the run's store, it picks the resume point and the seed,
makes the typed settings once (``runner.session.settings``) and builds every piece (data
loader, pipeline, optimizer, checkpointer, progress, validator, loop); ``Session`` holds
them, runs the loop and publishes ``final/``."""

from __future__ import annotations

import hashlib
import logging
import math
import random
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState

from kubetune.checkpoint.publish import CheckpointManager, publish_folder
from kubetune.config import PipelineConfig, config_to_yaml, output_uri
from kubetune.dataset.index import save_index, save_shared_index, shared_index_store
from kubetune.dataset.preflight import PreflightReport
from kubetune.errors import DataError, ProcessGroupError
from kubetune.humanize import count
from kubetune.layout import CONFIG_KEY, FINAL, describe_dataset, final_key, step_name
from kubetune.storage import ObjectStore
from runner.checkpoint.state import (
    Checkpointer,
    LoopState,
    ResumePoint,
    fetch_latest,
    fetch_step,
)
from runner.models.loading import Components
from runner.pipelines import TrainingPipeline, build_pipeline
from runner.pipelines.base import enable_gradient_checkpointing
from runner.reporting.progress import (
    REMOTE_WRITE_EVERY_S,
    ProgressReporter,
    ProgressSettings,
    write_interval,
)
from runner.reporting.run_events import RunEvents
from runner.reporting.terminal import wants_bar
from runner.session import start_over
from runner.session.load import Loaded
from runner.session.settings import RunSettings, TrainingSettings, compat_info
from runner.training.compile import compile_for_training, training_shapes
from runner.training.distributed import Ranks, data_parallel
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


def plan_schedule(training: TrainingSettings, batches_per_epoch: int) -> Schedule:
    if batches_per_epoch == 0:
        raise DataError(
            "the dataset yields no batches", hint="add images or lower train_batch_size"
        )
    per_epoch = math.ceil(batches_per_epoch / training.gradient_accumulation_steps)
    total = training.max_train_steps or per_epoch * (training.max_train_epochs or 1)
    return Schedule(total, per_epoch)


def build_training(
    cfg: PipelineConfig,
    comps: Components,
    accelerator: Accelerator,
    total_steps: int,
    shapes: int = 2,
) -> tuple[TrainingPipeline, Any, Any]:
    """Pipeline (adapters / tokens added), optimizer and LR scheduler; ``shapes``: how many
    input shapes the steps see (``compile_unet`` compiles each once)."""
    pipeline = build_pipeline(cfg, comps, accelerator.device, total_steps=total_steps)
    tune_unet(comps.unet, accelerator.device)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing([comps.unet, *comps.text_encoders])
    if cfg.compile_unet:
        pipeline.compiled_unet = compile_for_training(comps.unet, shapes)
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
    events: RunEvents
    records: RunRecords
    _skips_unpublished: bool = field(default=False, init=False, repr=False)
    """A write of the skipped examples was refused (warned once)."""

    def run(self) -> RunResult:
        """Record the run (main process; only now: a failed start writes nothing), train
        from ``state`` and publish ``final/``."""
        self.loop.each(self._record)  # refused on rank 0: every rank stops with its error
        if self.settings.is_main:
            self.loader.on_checked = self.records.index_writer(self.store)
        self.events.started(self.state.step)
        try:
            self.loop.run(self.state)
        except BaseException:
            self.drain()  # let the last good checkpoint finish publishing before we fail
            raise
        return self.finish(self.records.output_uri)

    def note_bad(self, bad: list[str]) -> None:
        """Publish the skipped examples in progress.json at once (failed when too many).
        Best effort: it runs on rank 0 alone, mid-step, so a refused write is a warning
        (once), not rank 0 stopping alone while its peers train on into a lost peer; the
        record carries the skips at its next write, and too many skips stop every rank
        anyway (the loader's ``DataError``)."""
        self.progress.note(bad_images=len(bad), bad_image_examples=bad[:20])
        if not self.settings.is_main:
            return
        try:
            self.progress.write("failed" if len(bad) > self.loader.max_bad else None)
        except Exception as err:  # noqa: BLE001 - the run goes on; later writes retry
            if not self._skips_unpublished:
                log.warning("could not publish the skipped examples in progress.json "
                            "(training goes on; warned once): %s", err)  # fmt: skip
            self._skips_unpublished = True

    def drain(self) -> None:
        """Wait for an upload in flight, logging (not raising) its failure."""
        try:
            self.checkpointer.wait()
        except Exception as err:  # the original error matters more
            log.error("publishing the last checkpoint failed too: %s", err)

    def _record(self) -> None:
        if self.settings.is_main:
            self.records.write(self.store)

    def finish(self, uri: str) -> RunResult:
        """Wait for header checks still running, checkpoint the last step, wait for
        uploads, publish ``final/`` (rank 0's failure to is every rank's error)."""
        self.loader.end_checks()
        keys = self.loop.each(self._publish_last)
        log.info("training finished at step %d; outputs in %s", self.state.step, uri)
        return RunResult(self.state.step, uri, keys)

    def _publish_last(self) -> list[str]:
        state = self.state
        self.checkpointer.save(state)  # first: its weight comparison is every rank's
        self.checkpointer.wait()
        if not self.settings.is_main:
            return []
        keys = self._publish_final(state.step)
        self.progress.note(last_checkpoint_step=state.step)
        self.progress.finish("completed")
        return keys

    def _publish_final(self, step: int) -> list[str]:
        final = self.settings.work_dir / "final"
        shutil.rmtree(final, ignore_errors=True)
        with self.pipeline.averaged():
            exported = self.pipeline.export(final)
        names = [path.relative_to(final).as_posix() for path in exported]
        publish_folder(self.store, final, FINAL, step, {"weights": names})
        return [final_key(name) for name in names]


@dataclass(frozen=True)
class RunRecords:
    """What a started run records beside its checkpoints: the resolved config and the
    dataset index (with the run and, best-effort, beside the runs for later runs)."""

    output_uri: str
    config_yaml: str
    data: PreflightReport
    shared_index: ObjectStore | None

    def write(self, store: ObjectStore) -> None:
        """The config, and the index unless the header checks still run (``index_writer``)."""
        store.put_bytes(CONFIG_KEY, self.config_yaml.encode())
        if self.data.pending is None:
            self.write_index(store, self.data)

    def write_index(self, store: ObjectStore, data: PreflightReport) -> None:
        save_index(store, data)
        save_shared_index(self.shared_index, data)

    def index_writer(self, store: ObjectStore) -> Callable[[PreflightReport], None]:
        """What stores the index once header checks running beside training end."""
        return lambda data: self.write_index(store, data)


@dataclass(frozen=True)
class StartOptions:
    """How a run starts: its staging folder, resume or not, and its stop event (SIGTERM)."""

    work_dir: Path
    resume: bool = True
    force_restart: bool = False
    stop: threading.Event = field(default_factory=threading.Event)
    start_over: str | None = None
    """A cluster workload's start-over token (`runner.session.start_over`)."""


def build_session(
    cfg: PipelineConfig,
    loaded: Loaded,
    store: ObjectStore,
    events: RunEvents,
    options: StartOptions,
) -> Session:
    """Pick the resume point and the seed, make the run's settings, then build the loader,
    pipeline, optimizer, checkpointer, progress, validator and loop from them and restore the
    checkpoint into them (nothing is written)."""
    is_main, work = loaded.accelerator.is_main_process, options.work_dir
    manager = CheckpointManager(store, cfg.max_checkpoints)  # store: the retrying RunStore
    if is_main:
        manager.on_published = events.checkpoint
    restored, seed = _agreed_start(Ranks(PartialState()), manager, work, cfg, options)
    seed_everything(seed)
    settings = RunSettings.from_config(cfg, seed=seed, work_dir=work, is_main=is_main)
    records = RunRecords(output_uri(cfg), config_to_yaml(cfg), loaded.data, shared_index_store(cfg))
    return _assemble(cfg, settings, loaded, store, manager, restored, events, records, options.stop)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _new_seed(configured: int | None) -> int:
    return configured if configured is not None else random.SystemRandom().randrange(2**31)


def _agreed_start(
    ranks: Ranks,
    manager: CheckpointManager,
    work: Path,
    cfg: PipelineConfig,
    options: StartOptions,
) -> tuple[ResumePoint | None, int]:
    """The checkpoint to resume from and the seed, decided by rank 0 (which alone heals or
    discards checkpoints) and broadcast with its config's digest, or its error (e.g. a
    checkpoint of another config) raised on every rank; the other ranks check that they run
    the same config and download the chosen step (a rank that cannot stops every rank)."""
    compat, digest = compat_info(cfg), config_digest(cfg)
    restored: ResumePoint | None = None

    def choose() -> tuple[int | None, int, str]:
        nonlocal restored
        restored = _resume_point(manager, work, compat, options)
        seed = restored.info["seed"] if restored else _new_seed(cfg.seed)
        return (restored.step if restored else None, seed, digest)

    step, seed, main_digest = ranks.from_rank_0(choose)

    def fetch() -> ResumePoint | None:
        if main_digest != digest:
            raise ProcessGroupError(
                f"rank {ranks.index} was given another config than rank 0",
                hint="every node must run the same resolved config (one ConfigMap)",
            )
        if not ranks.is_main and step is not None:
            return fetch_step(manager, work, compat, step)
        return restored

    return ranks.each(fetch), seed


def config_digest(cfg: PipelineConfig) -> str:
    return hashlib.sha256(config_to_yaml(cfg).encode()).hexdigest()[:16]


def _resume_point(
    manager: CheckpointManager, work_dir: Path, compat: dict[str, Any], options: StartOptions
) -> ResumePoint | None:
    """Rank 0's choice: the newest valid checkpoint (others set aside), or none (with
    --no-resume / --force-restart / a start-over token not carried out yet, after discarding
    the run's checkpoints)."""
    token = options.start_over
    fresh = start_over.pending(manager.store, token)
    if options.resume and not options.force_restart and not fresh:
        return fetch_latest(manager, work_dir, compat)
    why = "--force-restart" if options.force_restart else "--no-resume"
    if fresh:
        why = f"launcher submit --replace, start-over {token}"
    if manager.latest() is not None:
        log.warning("starting over: discarding the run's existing checkpoints (%s)", why)
        manager.delete_all()
    if fresh and token is not None:
        start_over.record(manager.store, token)
    return None


def _assemble(
    cfg: PipelineConfig,
    settings: RunSettings,
    loaded: Loaded,
    store: ObjectStore,
    manager: CheckpointManager,
    restored: ResumePoint | None,
    events: RunEvents,
    records: RunRecords,
    stop: threading.Event,
) -> Session:
    from runner.data import build_train_dataloader
    from runner.training.encoder_cache import PersistedCaches

    accelerator, comps, training = loaded.accelerator, loaded.comps, settings.training
    device, seed = accelerator.device, settings.seed
    loader = build_train_dataloader(
        cfg,
        seed=seed,
        batch_size=training.train_batch_size,
        device_is_cuda=device.type == "cuda",
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        data=loaded.data,
    )
    # the streaming order knows its epoch's length once every size is read: only a run
    # counted in epochs waits for that
    per_epoch = loader.estimated_len() if training.max_train_steps else len(loader)
    schedule = plan_schedule(training, per_epoch)
    dataset = dataset_summary(loader)
    per_epoch, in_all = count(schedule.steps_per_epoch, "step"), count(schedule.total_steps, "step")
    log.info("dataset: %s; %s per epoch, %s in all", describe_dataset(*dataset), per_epoch, in_all)
    torch.manual_seed(seed)  # LoRA init does not depend on what loading consumed
    shapes = training_shapes(loader.bucket_sizes())
    pipeline, optimizer, lr_scheduler = build_training(
        cfg, comps, accelerator, schedule.total_steps, shapes
    )
    ranks = Ranks(PartialState())
    if pipeline.latents.cache is not None or pipeline.text.cache is not None:
        # restored from the run's stored caches, the rest encoded; then encoders off the GPU;
        # a rank that fails to (rank 0 alone stores them) stops every rank with its error
        caches = PersistedCaches(settings.caches, pipeline, is_main=settings.is_main)
        ranks.each(lambda: caches.warm(loader))
    generator = torch.Generator(device).manual_seed(seed)
    runner = StepRunner(
        accelerator, pipeline, optimizer, lr_scheduler, generator, training.max_grad_norm
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
    progress.note(dataset_examples=dataset[0], dataset_buckets=dataset[1])
    validator = Validator(settings.validation, pipeline, out, device,
                          on_images=progress.log_images, autocast=accelerator.autocast)  # fmt: skip
    if ranks.several:  # header checks, skipped examples: settled by every rank together
        loader.together = ranks
    checkpointer.verify = ranks.check_same
    ranks.check_same(pipeline.trainable_parameters(), "after setup")
    runner.replica = data_parallel(pipeline, device)  # the engine's bucketed gradient sync
    loop = Loop(runner, loader, checkpointer, validator, progress, stop,
                schedule.total_steps, training.gradient_accumulation_steps, events,
                ranks if ranks.several else None)  # fmt: skip
    session = Session(settings, store, loader, pipeline, checkpointer, progress, loop, state,
                      events, records)  # fmt: skip
    loader.on_bad = session.note_bad
    if loader.bad:  # skipped before the restart: progress.json names them again
        session.note_bad(list(loader.bad))
    return session


def dataset_summary(loader: Any) -> tuple[int, dict[str, int]]:
    """(examples, examples per ``"<width>x<height>"`` bucket) of the run's loader (no
    buckets named while a streaming order is still reading the sizes)."""
    counts = loader.bucket_counts()
    return len(loader.dataset), {f"{w}x{h}": n for (h, w), n in counts.items()}


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
    # loaded: the downloaded copy would hold pod disk for the whole run (~15 GB for an SDXL
    # full fine-tune); a memory-mapped training state stays readable after the unlink
    shutil.rmtree(restored.folder, ignore_errors=True)
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
            log_every_n_steps=settings.training.log_every_n_steps,
            tensorboard_dir=settings.tensorboard_dir,
            upload_logs=True,
            write_every_s=write_interval(out.uri) if out is not None else REMOTE_WRITE_EVERY_S,
            bar=out is not None and wants_bar(),
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
