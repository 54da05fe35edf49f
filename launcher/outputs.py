"""A finished (or running) run's outputs for people: where its report is, and its weights
pulled to this machine, verified against their manifest. Torch-free (obstore at most)."""

from __future__ import annotations

import html
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.checkpoint.manifest import FileEntry, Manifest, sha256_file
from kubetune.checkpoint.publish import CheckpointManager
from kubetune.errors import StorageError, UserError
from kubetune.layout import (
    FINAL,
    REPORT_KEY,
    TRAINING_STATE_FILES,
    ProgressRecord,
    final_manifest_key,
    read_run_record,
)
from kubetune.storage import Capability, supports
from kubetune.storage.run_store import RetryPolicy, RunStore

if TYPE_CHECKING:
    from kubetune.config.cluster import StorageConfig
    from kubetune.storage import ObjectStore
    from launcher.backends.base import RunStatus


@dataclass(frozen=True)
class RunLocation:
    """Where a run's outputs are and how to reach them."""

    uri: str
    storage: StorageConfig | None = None

    def open(self) -> ObjectStore:
        from kubetune.storage import open_store

        return open_store(self.uri, self.storage)


def locate(run: str, backend_for_run: Callable[[str], Any]) -> RunLocation:
    """RUN as a run name (asked of its backend), a store URI (`s3://`, `gs://`, `az://`) or a
    local output folder."""
    if "://" in run or os.path.isdir(run):
        return RunLocation(run.rstrip("/"))
    if "/" in run or run.startswith("."):  # a path (a run name has neither)
        raise UserError(
            f"{run}: no such folder",
            hint="name a run (`launcher list`), a run's output folder or a store URI (s3://...)",
        )
    from kubetune.config import output_uri

    cfg = backend_for_run(run).run_config(run)
    return RunLocation(output_uri(cfg), cfg.storage)


_RUN_LINK = re.compile(r'href="([^":#?]+)"')
"""A link in report.html to one of the run's objects (a key relative to the run folder)."""


@dataclass(frozen=True)
class ReportView:
    """Where to open a run's report: ``report`` (a local path), ``url`` (cloud: a presigned
    URL of the stored page, to share; its links to full-size grids need credentials)."""

    report: str
    url: str | None = None


def report_location(
    store: ObjectStore, expires_s: int = 3600, dest: Path | None = None
) -> ReportView:
    """A local run: its report.html, or with ``dest`` a copy there whose links to the run's
    files are ``file://`` URIs into the run folder. Cloud (a store that presigns): a copy of
    the page written to ``dest`` (default: a new temporary folder) with its links to the
    run's objects (the full-size grids) presigned for ``expires_s``, since a relative link
    from a presigned page has no signature. UserError if no report exists yet."""
    if not store.exists(REPORT_KEY):
        raise UserError(
            f"{store.url(REPORT_KEY)} does not exist yet",
            hint="the runner writes it at the first validation and at the end of the run",
        )
    presigns = supports(store, Capability.PRESIGN)
    if not presigns and dest is None:
        return ReportView(store.url(REPORT_KEY))

    def target_of(key: str) -> str:
        return store.presign(key, expires_s) if presigns else Path(store.url(key)).as_uri()

    def relinked(link: re.Match[str]) -> str:
        return f'href="{html.escape(target_of(html.unescape(link.group(1))))}"'

    page = _RUN_LINK.sub(relinked, store.get_bytes(REPORT_KEY).decode())
    target = dest or Path(tempfile.mkdtemp(prefix="kubetune-report-")) / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page)
    return ReportView(
        str(target.absolute()), store.presign(REPORT_KEY, expires_s) if presigns else None
    )


def stale_report_note(status: RunStatus) -> str | None:
    """A line for ``launcher report`` when the run's page cannot say how it ended: the runner
    rewrites report.html at each validation and at its end, so a runner killed between
    (SIGKILL, a lost node) leaves a page that says running. None when the record tells the
    end (or the run still runs)."""
    progress = status.progress
    ending = progress.ending(live=not status.done) if progress is not None else None
    if progress is None or ending is None or progress.state == "failed":
        return None
    return page_note(status.run, f"{status.phase} now, {ending}")


def page_note(run: str, now: str) -> str:
    """``launcher report``'s note for a page that predates the run's end."""
    return f"note: the page was last written while {run} trained; it is {now}"


@dataclass
class PullResult:
    """What `pull` fetched (the `-o json` document)."""

    source: str
    dest: str
    step: int
    what: str
    files: list[str]
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def choose(store: ObjectStore, step: int | None) -> tuple[str, Manifest]:
    """(folder key, manifest): the final weights (step None) or checkpoint ``step``."""
    manager = CheckpointManager(RunStore(store, retry=RetryPolicy(attempts=2)), None)
    if step is None:
        try:
            raw = store.get_bytes(final_manifest_key())
        except FileNotFoundError:
            raise UserError(
                f"{store.url(FINAL)}/ has no complete final weights ({_why_no_final(store)})",
                hint=f"pull a checkpoint with --step N; complete: {_steps(manager)}",
            ) from None
        return FINAL, Manifest.from_bytes(raw, store.url(final_manifest_key()))
    try:
        return manager.key(step), manager.read_manifest(step)
    except FileNotFoundError:
        raise UserError(
            f"--step {step}: no complete checkpoint at that step",
            hint=f"complete checkpoints: {_steps(manager)}",
        ) from None


def stored_ending(store: ObjectStore) -> tuple[ProgressRecord | None, str | None]:
    """(record, how it ended) of the run at ``store``, for a reader with only its location:
    ``ProgressRecord.ending`` with the run's lease (a record that says running under a lapsed
    lease: not running). (None, None) when there is no readable record."""
    try:
        progress, lease = read_run_record(store)
    except (ValueError, StorageError):
        return None, None
    return progress, progress.ending(lease=lease) if progress is not None else None


def lapsed_ending(store: ObjectStore) -> str | None:
    """For ``report`` / ``pull`` of a folder or URI: how the run ended when its record still
    says running but its lease lapsed (its runner was killed: what was last written predates
    its end); None otherwise."""
    progress, ending = stored_ending(store)
    return None if progress is None or progress.state == "failed" else ending


@dataclass
class LocationStatus:
    """``launcher status`` of a folder or URI: what its record and lease say."""

    run: str
    progress: ProgressRecord | None
    ending: str | None

    @classmethod
    def read(cls, store: ObjectStore, run: str) -> LocationStatus:
        progress, ending = stored_ending(store)
        return cls(run, progress, ending)

    @property
    def running(self) -> bool:
        p = self.progress
        return p is not None and p.state in ("starting", "running") and self.ending is None

    def summary(self) -> str:
        """One line: the record's state (running or not), progress, how it ended."""
        p = self.progress
        if p is None:
            return f"{self.run}: no progress recorded yet"
        if self.ending is None or p.state == "failed":
            text = f"{self.run}: {p.state}; {p.summary(live=self.running)}"
            return f"{text}; {self.ending}" if self.ending else text
        return f"{self.run}: {p.summary(live=False)}; {self.ending}"  # says not running

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "running": self.running, "ending": self.ending,
                "progress": self.progress.model_dump() if self.progress else None}  # fmt: skip


def _why_no_final(store: ObjectStore) -> str:
    """Why a run has no final weights, from its progress record and lease: a failed,
    preempted or killed run has ended (saying it 'has not finished' sends people to wait)."""
    progress, ending = stored_ending(store)
    if progress is None:
        return "the run has not finished"
    if progress.state == "failed":  # with its error and exit code when the runner wrote them
        return f"the run {ending}"
    if progress.state == "preempted":
        return f"the run stopped at step {progress.step}; resubmitting its config resumes it"
    return f"the run is {ending}" if ending else "the run has not finished"


def _steps(manager: CheckpointManager) -> str:
    return ", ".join(str(s) for s in manager.list_complete()) or "none"


def weight_entries(manifest: Manifest) -> list[FileEntry]:
    """The manifest's weight files (meta.weights, else everything but training state)."""
    listed = manifest.meta.get("weights")
    if isinstance(listed, list):
        wanted = set(listed)
        return [f for f in manifest.files if f.key in wanted]
    return [f for f in manifest.files if f.key.split("/")[-1] not in TRAINING_STATE_FILES]


def pull(
    store: ObjectStore,
    dest: Path,
    *,
    step: int | None = None,
    on_file: Callable[[FileEntry], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> PullResult:
    """Download the weights of ``step`` (None: the final weights) into ``dest``, each file
    verified (size, sha256) and renamed into place only once it matches."""
    folder, manifest = choose(store, step)
    entries = weight_entries(manifest)
    if on_start is not None:
        on_start(sum(e.size for e in entries))
    for entry in entries:
        fetch_verified(store, f"{folder}/{entry.key}", entry, dest / entry.key)
        if on_file is not None:
            on_file(entry)
    return PullResult(
        source=store.url(folder) + "/",
        dest=str(dest.absolute()),  # said and clickable whatever folder it was run from
        step=manifest.step,
        what="final" if step is None else "checkpoint",
        files=[e.key for e in entries],
        bytes=sum(e.size for e in entries),
    )


def fetch_verified(store: ObjectStore, key: str, entry: FileEntry, path: Path) -> None:
    """One file: download to ``<path>.part``, check it, rename; one retry on a mismatch."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    for _attempt in (1, 2):
        store.get_file(key, part)
        size, digest = part.stat().st_size, sha256_file(part)
        if (size, digest) == (entry.size, entry.sha256):
            part.replace(path)
            return
    part.unlink(missing_ok=True)
    raise StorageError(
        f"{store.url(key)} does not match its manifest: {size} bytes sha256 {digest[:12]}…, "
        f"manifest says {entry.size} bytes sha256 {entry.sha256[:12]}…"
    )
