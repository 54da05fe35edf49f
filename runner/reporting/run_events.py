"""What a run tells people besides its log: the run report (refreshed at each validation and
at the end) and webhook notifications (started, checkpoint, validation, succeeded, failed,
preempted). Both are best effort; nothing here raises into the training loop. Torch-free."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from kubetune.config import PipelineConfig, config_hash, config_to_yaml, output_uri, run_name
from kubetune.errors import Preempted, error_line, exit_code_for
from kubetune.layout import (
    PROGRESS_KEY,
    REPORT_KEY,
    ProgressRecord,
    checkpoint_key,
    final_key,
    utc_now,
    validation_key,
)
from kubetune.storage import LocalStore, ObjectStore, is_remote
from runner.reporting.notify import Notifier
from runner.reporting.report import ReportWriter

log = logging.getLogger(__name__)


class ProgressSource(Protocol):
    """What the events need from the progress reporter."""

    record: ProgressRecord

    def history_records(self) -> list[dict[str, Any]]: ...

    def finish(self, state: Any, **fields: Any) -> None: ...


class RunEvents:
    """Called by the run from its first line on (``reported`` around the whole start, so a run
    that fails before training still sends "failed"), then by the session and the loop.
    Only the main process notifies, and only once it holds the run's lease does it get the
    store (``bind``) that the report is written to."""

    def __init__(
        self, cfg: PipelineConfig, *, is_main: bool = True, notifier: Notifier | None = None
    ) -> None:
        self.cfg = cfg
        self.store: ObjectStore | None = None
        self.report: ReportWriter | None = None
        self.progress: ProgressSource | None = None
        self._started = self._finished = False
        context = {
            "run": run_name(cfg),
            "type": cfg.type,
            "config_hash": config_hash(cfg),
            "output_uri": _output_uri(cfg),
        }
        if notifier is not None:
            self.notifier = notifier
        else:
            self.notifier = Notifier(cfg.notify if is_main else None, context)

    def bind(self, store: ObjectStore) -> None:
        """The run's store (main process, lease held): the report goes there and payloads
        name its objects."""
        self.store = store
        self.report = ReportWriter(
            store,
            run=run_name(self.cfg),
            pipeline_type=self.cfg.type,
            prompts=list(self.cfg.validation_prompts),
            config_yaml=config_to_yaml(self.cfg),
        )

    def attach(self, progress: ProgressSource) -> None:
        """The progress reporter, once the loop has one (its record feeds every payload)."""
        self.progress = progress

    @property
    def record(self) -> dict[str, Any]:
        """The progress record as plain data (empty before the loop has one)."""
        return self.progress.record.model_dump() if self.progress is not None else {}

    def _url(self, key: str) -> str | None:
        """Full URI of a key (a folder keeps its trailing slash)."""
        if self.store is None:
            return None
        url = self.store.url(key.rstrip("/"))
        return url + "/" if key.endswith("/") else url

    def _fields(self, **extra: Any) -> dict[str, Any]:
        record = self.record
        fields = {k: record.get(k) for k in ("state", "step", "total_steps", "loss", "lr")}
        fields["report_uri"] = self._url(REPORT_KEY) if self._started else None
        return {**fields, **extra}

    def started(self, step: int) -> None:
        self._started = True
        self.notifier.emit("started", **self._fields(step=step, resumed=step > 0))

    def checkpoint(self, step: int) -> None:
        uri = self._url(checkpoint_key(step) + "/")
        self.notifier.emit("checkpoint", **self._fields(step=step, checkpoint_uri=uri))

    def validation(self, step: int) -> None:
        self._publish_report(self.record.get("state") or "running")
        uri = self._url(validation_key(step, "grid.png"))
        self.notifier.emit("validation", **self._fields(step=step, validation_uri=uri))

    def finished(
        self,
        state: str,
        error: str | None = None,
        exit_code: int | None = None,
        timeout: float = 10.0,
    ) -> None:
        """Final progress record of a failed run, report (if the run got as far as
        starting) and notification, once (the first outcome wins); waits at most ``timeout``
        s for the webhooks."""
        if self._finished:
            return
        self._finished = True
        if state == "failed":
            self._record_failure(error, exit_code)
        if self._started:
            self._publish_report(state)
        event = {"completed": "succeeded", "preempted": "preempted"}.get(state, "failed")
        extra: dict[str, Any] = {"state": state}
        if event == "succeeded":
            extra["final_uri"] = self._url(final_key("") + "/")
        if error:
            extra["error"] = error
        self.notifier.emit(event, **self._fields(**extra))
        self.notifier.close(timeout)

    def _record_failure(self, error: str | None, exit_code: int | None) -> None:
        """progress.json says failed, with the error and exit code (all-or-nothing put), when
        this process holds the run's lease (``bind``: the main process, once the preflight
        passed; a start that fails before writes nothing). Best effort: a failure to write
        is logged, the run's own error is what it exits with."""
        if self.store is None:
            return
        fields = {"error": error, "exit_code": exit_code}
        try:
            if self.progress is not None:
                self.progress.finish("failed", **fields)
            else:  # failed before training: the previous attempt's record, ended
                self.store.put_bytes(PROGRESS_KEY, self._ended_record(fields).to_bytes())
        except Exception as err:  # noqa: BLE001 - the original error matters more
            log.warning("progress.json does not record the failure: %s", error_line(err))

    def _ended_record(self, fields: dict[str, Any]) -> ProgressRecord:
        assert self.store is not None
        try:
            record = ProgressRecord.from_bytes(self.store.get_bytes(PROGRESS_KEY))
        except (FileNotFoundError, ValueError):
            record = ProgressRecord()
        return record.model_copy(update={**fields, "state": "failed", "updated_at": utc_now()})

    def _publish_report(self, state: str) -> None:
        if self.report is not None:
            history = self.progress.history_records() if self.progress is not None else []
            self.report.publish(state, self.record, history)


def _output_uri(cfg: PipelineConfig) -> str:
    """The run's output URI as its store names it (a local folder: absolute)."""
    uri = output_uri(cfg)
    return uri if is_remote(uri) else LocalStore(uri).uri


@contextlib.contextmanager
def reported(
    events: RunEvents, leave: Callable[[BaseException], None] | None = None
) -> Iterator[None]:
    """Finish ``events`` as the block ends: completed, preempted (``Preempted``) or failed
    (any other exception, re-raised). Nested blocks finish once: the innermost outcome.
    ``leave``: given a failure first (before the record), e.g. ``Ranks.leave_failure``, which
    tells the other ranks this rank's error before they lose contact with it."""
    try:
        yield
    except Preempted:
        events.finished("preempted")
        raise
    except BaseException as err:
        if leave is not None:
            leave(err)
        events.finished("failed", error=error_line(err), exit_code=exit_code_for(err))
        raise
    events.finished("completed")
