"""Progress for humans (one log line every N steps, readable in ``kubectl logs``) and for the
launcher (``progress.json`` in the run's output location), plus TensorBoard scalars.

The loss stays on the device between log lines: one host sync per log line, not per step.
The periodic ``progress.json`` / history / TensorBoard uploads run on a background thread
(best-effort: a failure is logged and the next write retries); ``write`` with a state and
``finish`` publish on the caller's thread, after any upload in flight.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kubetune.humanize import duration
from kubetune.layout import PROGRESS_KEY, ProgressRecord, RunState, log_key, utc_now
from kubetune.storage import ObjectStore
from runner.reporting.history import History
from runner.reporting.terminal import step_bar

log = logging.getLogger("runner.reporting.progress")


@dataclass(frozen=True)
class ProgressSettings:
    total_steps: int
    steps_per_epoch: int
    log_every_n_steps: int = 10
    write_every_s: float = 30.0
    """At most one progress.json upload per this many seconds (0: at every log line, what a
    local run does: a local write is cheap)."""
    tensorboard_dir: Path | None = None
    upload_logs: bool = False
    """Copy the TensorBoard files to ``logs/`` in the store on each write (remote stores)."""
    bar: bool = False
    """Draw a progress bar on the terminal (``runner.reporting.terminal``)."""


REMOTE_WRITE_EVERY_S = 30.0


def write_interval(store_uri: str) -> float:
    """Seconds between progress.json uploads: none for a local folder (a write is cheap, and
    `launcher status` then matches the log), ``REMOTE_WRITE_EVERY_S`` for object storage."""
    return REMOTE_WRITE_EVERY_S if "://" in store_uri else 0.0


class ProgressReporter:
    """Call ``update`` after every optimizer step; ``finish(state)`` at the end."""

    def __init__(
        self, settings: ProgressSettings, store: ObjectStore | None, *, start_step: int = 0
    ) -> None:
        self.s, self.store = settings, store
        self.start_step = start_step
        self._loss_sum: torch.Tensor | None = None
        self._window_steps = 0
        self._window_images = 0
        self._window_start = time.perf_counter()
        self._last_write = 0.0
        self._last_logs = 0.0
        self.record = ProgressRecord(step=start_step, total_steps=settings.total_steps)
        self._writer = self._tensorboard(settings.tensorboard_dir)
        self.history = History(store, start_step=start_step)
        self._lrs: dict[str, float] = {}
        self._uploader = ThreadPoolExecutor(1, thread_name_prefix="progress-upload")
        self._upload: Future[None] | None = None
        self._bar = step_bar(settings.total_steps, start_step) if settings.bar else None

    @staticmethod
    def _tensorboard(folder: Path | None) -> Any:
        if folder is None:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed; no event files will be written")
            return None
        return SummaryWriter(str(folder))

    def update(
        self,
        step: int,
        epoch: int,
        loss: torch.Tensor,
        lr: float,
        images: int,
        lrs: dict[str, float] | None = None,
    ) -> None:
        """``lrs``: every optimizer param group's rate by group name (TensorBoard)."""
        self._lrs = lrs or {}
        detached = loss.detach()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._window_steps += 1
        self._window_images += images
        if self._bar is not None:
            self._bar.update(1)
        if step % self.s.log_every_n_steps == 0 or step == self.s.total_steps:
            self._emit(step, epoch, lr)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (validation) is not training time: img/s and the ETA leave it
        out."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._window_start += time.perf_counter() - started

    def _emit(self, step: int, epoch: int, lr: float) -> None:
        assert self._loss_sum is not None
        loss = float(self._loss_sum.item()) / self._window_steps  # the one sync per line
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        ips = self._window_images / elapsed
        eta = round((self.s.total_steps - step) * elapsed / self._window_steps, 1)
        epoch += 1  # counted from 1 everywhere: log line, progress.json, history
        log.info(
            "step %d/%d epoch %d loss %.4f lr %.3g %.2f img/s ETA %s",
            step,
            self.s.total_steps,
            epoch,
            loss,
            lr,
            ips,
            duration(eta),
        )
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {loss:.4f}, {ips:.2f} img/s", refresh=False)
        self.note(
            step=step,
            epoch=epoch,
            loss=loss,
            lr=lr,
            images_per_second=ips,
            eta_seconds=eta,
        )
        self.history.append(step=step, epoch=epoch, loss=loss, lr=lr, images_per_second=ips)
        if self._writer is not None:
            self._writer.add_scalar("train/loss", loss, step)
            self._writer.add_scalar("train/lr", lr, step)
            for name, value in self._lrs.items():
                self._writer.add_scalar(f"lr/{name}", value, step)
            self._writer.add_scalar("train/images_per_sec", ips, step)
        self._loss_sum, self._window_steps, self._window_images = None, 0, 0
        self._window_start = time.perf_counter()
        if time.monotonic() - self._last_write >= self.s.write_every_s:
            self.write_in_background()

    def log_images(self, step: int, images: list[list[Any]]) -> None:
        """Validation images to TensorBoard (as invoke-training): one image batch per prompt,
        tag ``validation/prompt-<i>``; ``images`` holds rows of same-size PIL images."""
        if self._writer is None:
            return
        import numpy as np

        for i, row in enumerate(images):
            batch = np.stack([np.asarray(image.convert("RGB")) for image in row])
            self._writer.add_images(f"validation/prompt-{i}", batch, step, dataformats="NHWC")
        self._wait_upload()  # one uploader of the log files at a time
        self._writer.flush()
        self._upload_logs()

    def note(self, **fields: Any) -> None:
        """Set record fields (e.g. last_checkpoint_step) without writing; validated."""
        self.record = ProgressRecord.model_validate({**self.record.model_dump(), **fields})

    def write(self, state: RunState | None = None) -> None:
        """Publish progress.json (all-or-nothing put) on this thread, after any upload in
        flight."""
        self._wait_upload()
        self.note(updated_at=utc_now(), **({"state": state} if state else {}))
        self._last_write = time.monotonic()
        self._publish(self.record.to_bytes(), self.history.to_bytes())

    def write_in_background(self) -> None:
        """Publish a snapshot of the record and history on the upload thread (skipped while
        the previous one is still uploading: the next due write carries newer figures)."""
        if self._upload is not None and not self._upload.done():
            return
        self.note(updated_at=utc_now())
        self._last_write = time.monotonic()
        snapshot = (self.record.to_bytes(), self.history.to_bytes())
        logs = self._last_write - self._last_logs >= REMOTE_WRITE_EVERY_S  # at most every 30 s
        self._last_logs = self._last_write if logs else self._last_logs
        self._upload = self._uploader.submit(self._publish_logged, *snapshot, logs)

    def _publish_logged(self, record: bytes, history: bytes, logs: bool) -> None:
        try:
            self._publish(record, history, logs)
        except Exception as err:  # best-effort: the next write retries
            log.warning("publishing progress failed (retried at the next write): %s", err)

    def _publish(self, record: bytes, history: bytes, logs: bool = True) -> None:
        """progress.json and the history; with ``logs``, the TensorBoard files too."""
        if self.store is not None:
            self.history.publish(history)
            self.store.put_bytes(PROGRESS_KEY, record)
        if self._writer is not None and logs:
            self._writer.flush()
            self._upload_logs()

    def flush(self) -> None:
        """Wait until the last background write has landed (readers see it after this)."""
        self._wait_upload()

    def _wait_upload(self) -> None:
        if self._upload is not None:
            self._upload.result()  # never raises: _publish_logged logs
            self._upload = None

    def _upload_logs(self) -> None:
        folder = self.s.tensorboard_dir
        if not (self.s.upload_logs and self.store is not None and folder is not None):
            return
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                self.store.put_file(log_key(path.relative_to(folder).as_posix()), path)

    def history_records(self) -> list[dict[str, Any]]:
        """The metric history so far (for the run report)."""
        return self.history.records

    def finish(self, state: RunState, **fields: Any) -> None:
        """The run's last record: ``state`` and ``fields`` (a failed run's ``error`` and
        ``exit_code``), published on this thread; then the bar and TensorBoard close."""
        self.note(**fields)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.write(state)
        self._uploader.shutdown(wait=True)
        if self._writer is not None:
            self._writer.close()
            self._upload_logs()
            self._writer = None
