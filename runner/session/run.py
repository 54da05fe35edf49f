"""The training orchestrator: ``run(cfg)`` loads the base model while the data preflight
runs, joins the preflight, then takes the run lease, finds the checkpoint to resume from,
builds the session (``runner.session.build``) from the run's typed settings
(``runner.session.settings``), trains and publishes the outputs. Nothing is written to the
run before the preflight passed. See docs/architecture.md."""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState

from kubetune.checkpoint.publish import CheckpointManager
from kubetune.config import PipelineConfig, config_to_yaml, output_uri
from kubetune.dataset.index import save_index, save_shared_index, shared_index_store
from kubetune.dataset.preflight import PreflightReport
from kubetune.errors import UserError
from kubetune.layout import CONFIG_KEY
from kubetune.storage import ObjectStore, open_store
from kubetune.storage.lease import Lease
from kubetune.storage.run_store import RunStore
from runner.checkpoint.state import ResumePoint, fetch_latest
from runner.models.loading import Components, ModelSettings
from runner.reporting.run_events import RunEvents, reported
from runner.session.build import RunResult, build_session, load_base
from runner.session.settings import RunSettings, lease_settings
from runner.training.speed import enable_tf32

log = logging.getLogger(__name__)


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
    ``data``: the run's preflight, already started (``kubetune.dataset.preflight.start_preflight``);
    else it starts here, in a thread (torch is loaded: no fork)."""
    from kubetune.dataset.preflight import start_preflight

    events = RunEvents(cfg, is_main=PartialState().is_main_process)
    with reported(events):  # from the first line: a run that fails to start notifies too
        pending = data or start_preflight(cfg, process=False)
        given = work_dir or os.environ.get("KUBETUNE_WORK_DIR")
        work = Path(given or tempfile.mkdtemp(prefix="kubetune-"))
        try:
            return _run(
                cfg,
                work,
                pending,
                events,
                resume=resume,
                force_restart=force_restart,
                stop=stop,
            )
        finally:
            if not given:  # staged checkpoints are published (or the run failed): drop them
                shutil.rmtree(work, ignore_errors=True)


@dataclass(frozen=True)
class Loaded:
    """What a run has before its first write: the accelerator, the base model on its device
    and the checked data."""

    accelerator: Accelerator
    comps: Components
    data: PreflightReport


def load_then_join(cfg: PipelineConfig, pending: Future[PreflightReport]) -> Loaded:
    """What writes nothing to the run, done while the preflight (listing, header reads or the
    stored index) runs: the accelerator and the base model on its device. Then the
    preflight's report: a bad dataset fails here, before the lease or any other write. If
    loading fails, a failed preflight is still reported first, as when it ran first."""
    try:
        accelerator = make_accelerator(cfg)
        comps = load_base(ModelSettings.from_config(cfg), accelerator.device)
    except Exception:
        pending.result()  # a bad dataset's error, else the loading error below
        raise
    return Loaded(accelerator, comps, pending.result())


def _run(
    cfg: PipelineConfig,
    work: Path,
    pending: Future[PreflightReport],
    events: RunEvents,
    *,
    resume: bool,
    force_restart: bool,
    stop: threading.Event | None,
) -> RunResult:
    loaded = load_then_join(cfg, pending)
    is_main = loaded.accelerator.is_main_process
    uri = output_uri(cfg)
    raw = open_store(uri, cfg.storage)
    lease = None
    if is_main:  # the one process that writes holds the run's lease
        lease = Lease(raw, lease_settings(cfg)).acquire()
    try:
        store = RunStore(raw, guard=lease.check if lease else None)
        if is_main:
            events.bind(store)
        with reported(events):  # the final report and webhook while the lease is held
            return _run_with(
                cfg,
                work,
                loaded,
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
    loaded: Loaded,
    store: ObjectStore,
    uri: str,
    events: RunEvents,
    *,
    resume: bool,
    force_restart: bool,
    stop: threading.Event | None,
) -> RunResult:
    data, accelerator = loaded.data, loaded.accelerator
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
    settings = RunSettings.from_config(cfg, seed=seed, work_dir=work, is_main=is_main)
    session = build_session(cfg, settings, accelerator, loaded.comps, store, manager,
                            restored, data, events, stop or threading.Event())  # fmt: skip
    if is_main:  # only once the model and data loaded: a failed start writes nothing
        store.put_bytes(CONFIG_KEY, config_to_yaml(cfg).encode())
        save_index(store, data)
        save_shared_index(shared_index_store(cfg), data)
    events.started(session.state.step)
    try:
        session.loop.run(session.state)
    except BaseException:
        session.drain()  # let the last good checkpoint finish publishing before we fail
        raise
    return session.finish(uri)
