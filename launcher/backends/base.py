"""The backend interface (submit, status, logs, cancel, list) and the records it returns."""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from kubetune.config import PipelineConfig
from kubetune.config.cluster import StorageConfig
from kubetune.humanize import count
from kubetune.layout import PROGRESS_KEY, ProgressRecord

# Cancelling (a Job being deleted) ends the run as much as Cancelled does: nothing resumes it.
# Preempted: a local run stopped by SIGTERM after its checkpoint; it waits for a resubmit (on a
# cluster the Job's next pod resumes it, so the cluster shows Pending / Retrying instead).
# Unreadable: a run listed although its record (a local run's run.json) cannot be read; nothing
# about it changes until someone repairs or removes the record.
UNREADABLE = "Unreadable"
TERMINAL_PHASES = ("Succeeded", "Failed", "Preempted", "Cancelling", "Cancelled", UNREADABLE)
RESUMABLE_PHASES = ("Failed", "Preempted", "Cancelled")
"""Phases after which resubmitting the same config resumes from the newest checkpoint, as a
restarted pod does."""


@dataclass(frozen=True)
class SubmitResult:
    """What `submit` created (or found: `created` is False for an identical resubmit)."""

    backend: str
    run: str
    job_name: str
    config_hash: str
    output_uri: str
    created: bool
    namespace: str | None = None
    warnings: tuple[str, ...] = ()
    """What the user should know but need not fix: a pod_patch that breaks the restricted
    Pod Security profile, Job features the cluster's Kubernetes version ignores."""
    resumed_after: str | None = None
    """The phase of the run's last attempt when this submit resumed it (a new attempt that
    continues from the newest checkpoint); None for a new run."""
    note: str | None = None
    """One line on what submit did with a run that already existed (resumed it, found it
    running or finished); None for a new run."""
    saved_logs: str | None = None
    """Where the log tails of the pods of a cluster workload that submit replaced were saved
    (a folder URI or path; `launcher logs` prints them); None if it replaced none."""


Progress = ProgressRecord  # the launcher's view of progress.json is the runner's own record


@dataclass
class RunStatus:
    """Where a run stands. `phase`: Pending, Suspended, Running, Succeeded, Failed,
    Preempted (stopped after a checkpoint; a resubmit resumes it), Cancelling (being
    deleted), Cancelled; in listings also Unreadable (`message` says which file and why)."""

    backend: str
    run: str
    job_name: str
    phase: str
    reason: str | None = None
    message: str | None = None
    retries: int = 0
    pods: list[str] = field(default_factory=list)
    output_uri: str | None = None
    config_hash: str | None = None
    progress: ProgressRecord | None = None
    progress_error: str | None = None
    namespace: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    """The run's labels (sweep membership and parameters among them)."""
    nodes: int = 1
    """Pods one attempt runs (job.nodes); `pods` and `retries` then count pods, not
    attempts."""

    @property
    def done(self) -> bool:
        return self.phase in TERMINAL_PHASES

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["progress"] = self.progress.model_dump() if self.progress else None
        data["done"] = self.done
        return data

    def summary(self) -> str:
        """One line: phase, reason, progress."""
        text = f"{self.run}: {self.phase}"
        if self.reason:
            text += f" ({self.reason}{': ' + self.message if self.message else ''})"
        if self.retries:
            unit = "failed pod" if self.nodes > 1 else "failed attempt"
            text += f", {count(self.retries, unit)}"
        if self.progress is not None:  # an ended run has no ETA, whatever its record says
            text += f"; {self.progress.summary(live=not self.done)}"
            ending = self.progress.ending(live=not self.done)  # failed: why; killed: no end
            text += f"; {ending}" if ending else ""
        return text


class Backend(abc.ABC):
    """A place where runs execute. Errors are KubetuneErrors (one-line messages)."""

    name: str

    @abc.abstractmethod
    def submit(self, cfg: PipelineConfig, *, replace: bool = False) -> SubmitResult:
        """Start the run; an identical config returns the existing run (created=False), or
        resumes it from its newest checkpoint when it stopped before its end (RESUMABLE_PHASES:
        a new attempt, `resumed_after` set); another config under the same run name raises
        UserError unless `replace`."""

    @abc.abstractmethod
    def status(self, run: str) -> RunStatus:
        """The run's phase, reason and training progress; UserError if there is no such run."""

    @abc.abstractmethod
    def logs(
        self, run: str, *, follow: bool = False, latest: bool = False, rank: int | None = None
    ) -> Iterator[str]:
        """The run's log lines (without newlines); with `follow`, until the run finishes;
        with `latest`, only the newest attempt's (what a submit that resumed it started);
        `rank`: the node (pod) of a multi-node run, default 0; UserError if it has none."""

    @abc.abstractmethod
    def cancel(self, run: str, *, wait: bool = False, timeout: float = 300.0) -> RunStatus:
        """Stop the run (its outputs in storage stay); with `wait`, return once it is gone
        (ClusterError after `timeout` seconds)."""

    @abc.abstractmethod
    def list(self) -> list[RunStatus]:
        """Every kubetune run this backend knows."""

    def run_config(self, run: str) -> PipelineConfig:
        """The resolved config RUN was submitted with (where its outputs are, how to reach
        them); UserError if there is no such run."""
        raise NotImplementedError(f"the {self.name} backend cannot read a run's config")


def read_progress(
    uri: str, storage: StorageConfig | None
) -> tuple[ProgressRecord | None, str | None]:
    """The run's progress.json from its output location: (progress, why-not)."""
    try:
        from kubetune.storage import open_store  # light: obstore only
    except ImportError as err:  # pragma: no cover - kubetune.storage ships with kubetune
        return None, f"kubetune.storage unavailable: {err}"
    try:
        raw = open_store(uri, storage).get_bytes(PROGRESS_KEY)
    except FileNotFoundError:
        return None, None
    except Exception as err:  # noqa: BLE001 - progress is best effort; say why it is missing
        return None, f"cannot read {uri}/{PROGRESS_KEY}: {str(err).splitlines()[0]}"
    try:
        return ProgressRecord.from_bytes(raw), None
    except ValueError as err:
        first = str(err).splitlines()[0]
        return None, f"{uri}/{PROGRESS_KEY} is not a valid progress record: {first}"
