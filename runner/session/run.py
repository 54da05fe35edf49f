"""``run(cfg)``: the pod's (and ``--local``'s) whole run, in the order a run must happen.

1. the data preflight starts (or was started by ``python -m runner``) while the accelerator
   and base model load (``runner.session.load``); a bad dataset fails before any write;
2. the main process takes the run's single-writer lease; every write goes through a
   ``RunStore`` guarded by it;
3. ``runner.session.build.build_session`` picks the resume point and seed and builds every
   component from the run's typed settings;
4. ``Session.run`` writes the resolved config and dataset index, trains and publishes
   ``final/``. See docs/architecture.md."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import torch

from kubetune.config import PipelineConfig, output_uri
from kubetune.config.advice import precision_warnings
from kubetune.dataset.preflight import PreflightReport
from kubetune.storage import open_store
from kubetune.storage.lease import Lease
from kubetune.storage.run_store import RunStore
from runner.reporting.run_events import RunEvents, reported
from runner.session import start_over
from runner.session.build import RunResult, StartOptions, build_session
from runner.session.load import load_then_join
from runner.session.settings import lease_settings, model_settings, process_group_timeout
from runner.training.distributed import Ranks, start_processes
from runner.training.optim import check_optimizer

log = logging.getLogger(__name__)


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
    else it starts here, in a thread (torch is loaded: no fork). With several processes only
    global rank 0 runs it (``data`` is ignored elsewhere) and shares its report (and, with
    ``aspect_ratio_buckets.order: streaming``, the sizes as its checks read them)."""
    from kubetune.dataset.preflight import start_preflight

    ranks = Ranks(
        start_processes(process_group_timeout(cfg))
    )  # first: the process group, with its timeout
    events = RunEvents(cfg, is_main=ranks.is_main)
    for line in precision_warnings(cfg):  # what `launcher validate` warns about
        log.warning(line)
    # from the first line: a run that fails to start notifies too
    with reported(events, ranks.leave_failure):
        check_optimizer(cfg.optimizer, "cuda" if torch.cuda.is_available() else "cpu")
        pending = None  # several processes: global rank 0 alone runs the preflight
        if ranks.is_main:
            pending = data or start_preflight(cfg, process=False)
        with _work_folder(work_dir, ranks) as work:
            loaded = load_then_join(cfg.mixed_precision, model_settings(cfg), pending, ranks)
            with _held_run_store(cfg, ranks, events) as store:
                token = start_over.requested_token()
                options = StartOptions(
                    work, resume, force_restart, stop or threading.Event(), token
                )
                return build_session(cfg, loaded, store, events, options).run()


@contextmanager
def _work_folder(given: str | Path | None, ranks: Ranks) -> Iterator[Path]:
    """Where checkpoints are staged: ``work_dir`` / ``$KUBETUNE_WORK_DIR`` (kept), else a
    temporary folder removed at the end (its checkpoints are published, or the run failed).
    The ranks of one node share ``$KUBETUNE_WORK_DIR``: all but rank 0 use a subfolder."""
    given = given or os.environ.get("KUBETUNE_WORK_DIR")
    work = Path(given or tempfile.mkdtemp(prefix="kubetune-"))
    if given and not ranks.is_main:
        work = work / f"rank-{ranks.index}"
    try:
        yield work
    finally:
        if not given:
            shutil.rmtree(work, ignore_errors=True)


@contextmanager
def _held_run_store(cfg: PipelineConfig, ranks: Ranks, events: RunEvents) -> Iterator[RunStore]:
    """The run's store, written through a ``RunStore``; the main process (the one writer)
    holds the run lease meanwhile (refused, e.g. held by another runner: every rank stops with
    that error), and its final report and webhook go out while it does."""
    raw = open_store(output_uri(cfg), cfg.storage)
    lease = ranks.each(lambda: Lease(raw, lease_settings(cfg)).acquire() if ranks.is_main else None)
    try:
        store = RunStore(raw, guard=lease.check if lease else None)
        if ranks.is_main:
            events.bind(store)
        with reported(events, ranks.leave_failure):
            yield store
    finally:
        if lease is not None:
            lease.release()
