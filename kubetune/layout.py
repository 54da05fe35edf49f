"""The run layout and the progress record: the contract between the runner and the launcher.

Every key a run writes under its output location is named here, and ``ProgressRecord`` is the
typed ``progress.json`` that the runner writes and the launcher (``status``, ``pull``, reports)
reads. This module imports only pydantic and the standard library: the launcher imports it.

Layout (relative to ``base_output_dir`` or ``s3://bucket/prefix/<run>/``)::

    config.yaml                          the resolved config
    progress.json                        ProgressRecord
    lease.json                           the run's single-writer lease
    data/index.json.gz                   the dataset index stored with the run (gzip'd JSON)
    ../_kubetune-data-indexes/<sha>.json.gz  the same, beside the runs, per dataset URI
    checkpoints/step-000200/...          a checkpoint; manifest.json is written last
    checkpoints-set-aside/step-000200.<utc>/...  checkpoints that failed their manifest check
    validation/step-000200/...           prompt-<i>-<j>.png, thumb-<i>.jpg and grid.png
    logs/                                TensorBoard event files
    final/                               the finished run's LoRA / embeddings; manifest.json last
    history.jsonl                        one line per progress log line (the report's curves)
    report.html                          the run report (self-contained)
    start-over.json                      the last start-over a cluster run carried out
    pod-logs/<UTC time>/node-<K>.log     the tails of a replaced workload's pods' logs
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kubetune.humanize import count, duration

if TYPE_CHECKING:  # pragma: no cover
    from kubetune.storage import ObjectStore

_log = logging.getLogger(__name__)

CONFIG_KEY = "config.yaml"
PROGRESS_KEY = "progress.json"
LEASE_KEY = "lease.json"
DATA_INDEX_KEY = "data/index.json.gz"
DATASET_INDEXES = "_kubetune-data-indexes"
"""Beside the runs (in the folder holding every run's folder): one dataset index per dataset
URI, for later runs on the same data. Not a valid run name (DNS-1123 has no '_')."""
CHECKPOINTS = "checkpoints"
SET_ASIDE = "checkpoints-set-aside"
MANIFEST = "manifest.json"
VALIDATION = "validation"
FINAL = "final"
LOGS = "logs"
HISTORY_KEY = "history.jsonl"
REPORT_KEY = "report.html"
START_OVER_KEY = "start-over.json"
START_OVER_ENV = "KUBETUNE_START_OVER"
"""A token the launcher sets in a workload that `submit --replace` made to start a finished
run over: the runner discards the run's checkpoints unless START_OVER_KEY already holds this
token (a retried pod of that workload resumes instead of starting over again)."""
POD_LOGS = "pod-logs"
# Checkpoint files that are training state, not weights (written by runner.checkpoint.state);
# `launcher pull` skips them when a manifest has no meta.weights list.
TRAINING_STATE_FILES = frozenset({"training_state.pt", "trainable.safetensors", "run_info.json"})

_STEP_NAME = re.compile(r"^step-(\d{6,})$")


def step_name(step: int) -> str:
    """Folder name of a step: ``step-000200`` (at least six digits)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:06d}"


def parse_step_name(name: str) -> int | None:
    """The step of a folder name made by ``step_name``; None for any other name."""
    match = _STEP_NAME.match(name)
    return int(match.group(1)) if match else None


def checkpoint_key(step: int, name: str = "") -> str:
    """``checkpoints/step-XXXXXX/<name>`` (the folder, without a trailing ``/``, if empty)."""
    return _join(CHECKPOINTS, step_name(step), name)


def manifest_key(step: int) -> str:
    """The key whose presence makes checkpoint ``step`` exist."""
    return checkpoint_key(step, MANIFEST)


def validation_key(step: int, name: str = "") -> str:
    """``validation/step-XXXXXX/<name>``."""
    return _join(VALIDATION, step_name(step), name)


def thumb_key(step: int, prompt_index: int) -> str:
    """``validation/step-XXXXXX/thumb-<i>.jpg``: prompt ``i``'s images, small, for the report."""
    return validation_key(step, f"thumb-{prompt_index}.jpg")


def parse_thumb_key(key: str) -> tuple[int, int] | None:
    """(step, prompt index) of a key made by ``thumb_key``; None for any other key."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != VALIDATION:
        return None
    step, name = parse_step_name(parts[1]), parts[2]
    match = re.fullmatch(r"thumb-(\d+)\.jpg", name)
    return (step, int(match.group(1))) if step is not None and match else None


def final_manifest_key() -> str:
    """``final/manifest.json``: written after the final weights; ``final/`` is complete once
    it exists."""
    return final_key(MANIFEST)


def set_aside_key(step: int, stamp: str, name: str = "") -> str:
    """Where a checkpoint that failed its manifest check is moved: never deleted."""
    return _join(SET_ASIDE, f"{step_name(step)}.{stamp}", name)


def final_key(name: str) -> str:
    """``final/<name>``."""
    return _join(FINAL, name)


def log_key(name: str) -> str:
    """``logs/<name>``."""
    return _join(LOGS, name)


def pod_logs_key(stamp: str, node: int) -> str:
    """``pod-logs/<stamp>/node-<K>.log``: the saved log tails of node ``K``'s pods of a workload
    that `launcher submit` replaced at ``stamp`` (``20261203T174000.123456Z``: sorts by time)."""
    return _join(POD_LOGS, stamp, f"node-{node}.log")


def parse_pod_logs_key(key: str) -> tuple[str, int] | None:
    """(stamp, node) of a key made by ``pod_logs_key``; None for any other key."""
    match = re.fullmatch(rf"{POD_LOGS}/([0-9T.Z]+)/node-(\d+)\.log", key)
    return (match.group(1), int(match.group(2))) if match else None


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def utc_now() -> str:
    """Seconds-precision UTC timestamp in ISO 8601, as every record here writes it."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def describe_dataset(examples: int, buckets: dict[str, int]) -> str:
    """``6 examples in 1 bucket (64x64: 6)`` (at most 8 buckets named); ``6 examples``
    without buckets (a streaming order still reading the sizes)."""
    if not buckets:
        return count(examples, "example")
    shown = ", ".join(f"{size}: {n}" for size, n in list(buckets.items())[:8])
    more = f", {len(buckets) - 8} more" if len(buckets) > 8 else ""
    return f"{count(examples, 'example')} in {count(len(buckets), 'bucket')} ({shown}{more})"


RunState = Literal["starting", "running", "completed", "preempted", "failed"]


class SetAsideCheckpoint(BaseModel):
    """A checkpoint that failed its manifest check at resume, moved aside (never deleted)."""

    model_config = ConfigDict(extra="ignore")

    step: int
    """The checkpoint's step."""
    reason: str
    """Why it failed (the object and the mismatch)."""
    moved_to: str
    """The folder key it was moved to (under ``checkpoints-set-aside/``)."""


class ProgressRecord(BaseModel):
    """``progress.json``: written by the runner (all-or-nothing), read by the launcher.

    Readers ignore fields they do not know, so a newer runner never breaks an older launcher.
    """

    model_config = ConfigDict(extra="ignore")

    state: RunState = "running"
    """Where the run stands: running, completed, preempted (resumes when rerun) or failed."""
    step: int = 0
    """Optimizer steps done."""
    total_steps: int | None = None
    """Optimizer steps the run will do in all."""
    epoch: int | None = None
    """Epoch of the latest step, counted from 1 (as the log lines count it)."""
    loss: float | None = None
    """Mean loss over the latest log window."""
    lr: float | None = None
    """Learning rate (first parameter group) at the latest log line."""
    images_per_second: float | None = None
    """Training throughput over the latest log window."""
    eta_seconds: float | None = None
    """Estimated seconds to the last step."""
    last_checkpoint_step: int | None = None
    """Step of the newest checkpoint this run published (``checkpoints/step-XXXXXX/``)."""
    resumed_from: int | None = None
    """Step of the checkpoint this attempt resumed from; None for a fresh start."""
    dataset_examples: int | None = None
    """Examples in the dataset, as the run's preflight found them."""
    dataset_buckets: dict[str, int] = Field(default_factory=dict)
    """Examples per resolution bucket, ``"<width>x<height>": count``."""
    set_aside: list[SetAsideCheckpoint] = Field(default_factory=list)
    """Checkpoints that failed their manifest check and were moved aside at resume."""
    bad_images: int = 0
    """Examples skipped during training because they turned out unreadable (kubetune stops
    the run past `data_loader.max_bad_image_share`)."""
    bad_image_examples: list[str] = Field(default_factory=list)
    """The first skipped examples' messages, each naming its file."""
    error: str | None = None
    """What ended a failed run, in one line (the error the runner exited with)."""
    exit_code: int | None = None
    """The exit status the runner ended with (a failed or preempted run; None while it runs
    or when it ended without a record: SIGKILL, a lost node)."""
    updated_at: str | None = None
    """When the record was written (UTC, ISO 8601)."""

    def to_bytes(self) -> bytes:
        """The JSON body the runner publishes."""
        return (self.model_dump_json(indent=2) + "\n").encode()

    def summary(self, live: bool = True) -> str:
        """One line for ``launcher status``: step, loss, throughput, ETA (not when ``live`` is
        False: the run has ended, though a killed runner's record still says running)."""
        parts = [f"step {self.step}/{self.total_steps or '?'}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4g}")
        if self.images_per_second is not None:
            parts.append(f"{self.images_per_second:.3g} img/s")
        if live and self.eta_seconds is not None and self.state in ("starting", "running"):
            parts.append(f"ETA {duration(self.eta_seconds)}")
        if self.bad_images:
            parts.append(f"{count(self.bad_images, 'unreadable image')} skipped")
        return ", ".join(parts)

    def ending(
        self, live: bool = True, lease: LeaseTerm | None = None, now: float | None = None
    ) -> str | None:
        """How the run ended, as its record says, for ``launcher status``, ``report``, ``pull``
        and the UI: the error of a failed run; for a record that still says running when the
        run is not ``live`` (its process gone, its Job failed) or its ``lease`` lapsed (expired
        unrenewed, or released: what a reader of the store alone can tell), that no end was
        recorded. None otherwise (a current lease, or none known, leaves the record's word)."""
        if self.state == "failed":
            code = f" (exit code {self.exit_code})" if self.exit_code is not None else ""
            return f"failed at step {self.step}{': ' + self.error if self.error else ''}{code}"
        if self.state not in ("starting", "running"):
            return None
        lapsed = lease.lapsed(now) if lease is not None else None
        if live and lapsed is None:
            return None
        when = f" ({self.updated_at})" if self.updated_at else ""
        why = f"; {lapsed}" if lapsed else ""
        return f"not running: last record at step {self.step}{when}, no end recorded{why}"

    @classmethod
    def from_bytes(cls, data: bytes | str) -> ProgressRecord:
        """Parse ``progress.json``; raises ``ValueError`` if it is not a progress record."""
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
        return cls.model_validate(raw)


@dataclass(frozen=True)
class LeaseTerm:
    """What ``lease.json`` tells a reader of the store alone about the run's writer: when its
    lease expires unless renewed (``renewed_unix`` + ``timeout_s``, as
    ``kubetune.storage.lease`` writes them); ``expires_unix`` None: no lease (released)."""

    expires_unix: float | None

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> LeaseTerm | None:
        """``lease.json``'s body (None: there is none); None when it cannot be read as a lease
        (then nothing is inferred from it)."""
        if raw is None:
            return cls(None)
        try:
            record = json.loads(raw)
            return cls(float(record["renewed_unix"]) + float(record["timeout_s"]))
        except (ValueError, TypeError, KeyError):
            return None

    @property
    def expires_at(self) -> str | None:
        if self.expires_unix is None:
            return None
        at = dt.datetime.fromtimestamp(self.expires_unix, dt.timezone.utc)
        return at.isoformat(timespec="seconds")

    def lapsed(self, now: float | None = None) -> str | None:
        """Why the lease no longer holds its writer (None while it is current). Compared with
        this machine's clock: a live writer renews every quarter of its timeout, so clocks
        apart by less than three quarters of it never make a live run look dead."""
        if self.expires_unix is None:
            return "its lease was released"
        if (time.time() if now is None else now) <= self.expires_unix:
            return None
        return f"its lease expired at {self.expires_at}"


def read_run_record(store: ObjectStore) -> tuple[ProgressRecord | None, LeaseTerm | None]:
    """(progress.json, lease.json) of the run at ``store`` for a reader with only its location;
    the lease is read first, so a run that ends between the two reads is seen ended, not
    dead. Raises ``ValueError`` for a progress.json that is not a record, storage errors."""
    try:
        lease = LeaseTerm.from_bytes(store.get_bytes(LEASE_KEY))
    except FileNotFoundError:
        lease = LeaseTerm.from_bytes(None)
    try:
        return ProgressRecord.from_bytes(store.get_bytes(PROGRESS_KEY)), lease
    except FileNotFoundError:
        return None, lease


def read_history(store: ObjectStore) -> list[dict[str, Any]]:
    """``history.jsonl``'s records (the runner writes them, the report and the UI read
    them); a missing object is an empty history, a bad line is skipped."""
    try:
        raw = store.get_bytes(HISTORY_KEY).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    records = []
    for line in raw.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            _log.warning("%s: skipping an unreadable line", store.url(HISTORY_KEY))
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records
