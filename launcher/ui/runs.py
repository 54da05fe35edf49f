"""The Runs tab: every run (local and, when a kube context works, the cluster's), one run's
curves, validation grids, logs and outputs, Cancel. Polling reads listings, `progress.json`
and `history.jsonl` only, never checkpoints. Failures are one-line messages in the data."""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.errors import KubetuneError, UserError
from kubetune.humanize import duration
from kubetune.layout import (
    FINAL,
    HISTORY_KEY,
    REPORT_KEY,
    VALIDATION,
    ProgressRecord,
    final_manifest_key,
    parse_step_name,
    parse_thumb_key,
    read_history,
)
from launcher import api
from launcher.backends.base import (
    RESUMABLE_PHASES,
    TERMINAL_PHASES,
    UNREADABLE,
    Backend,
    RunStatus,
    read_progress,
)
from launcher.sweeps import LABEL_SWEEP, PARAM_LABEL_PREFIX
from launcher.ui.security import redact

if TYPE_CHECKING:
    from kubetune.config import PipelineConfig
    from kubetune.storage import ObjectStore

CLUSTER_RETRY_S = 30.0
NO_KUBECONFIG = "no cluster configured (no $KUBECONFIG or ~/.kube/config)"
NO_CLUSTER = f"{NO_KUBECONFIG}: showing the runs on this machine"
ENDED = ("Succeeded", "Failed", "Cancelled")
"""Phases after which progress.json no longer changes (Cancelling and Preempted may still
write it)."""
SERVED_PREFIXES = (f"{VALIDATION}/", f"{FINAL}/")
SERVED_KEYS = (REPORT_KEY, HISTORY_KEY)


def one_line(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return redact(text)


class Runs:
    """The backends the page sees, each created once (a cluster that fails is retried after
    CLUSTER_RETRY_S, meanwhile its one-line reason is shown)."""

    def __init__(
        self, *, local_only: bool = False, cluster_only: bool = False, local: Backend | None = None
    ) -> None:
        from launcher.backends.local import LocalBackend

        self.local = local or LocalBackend()
        self.local_only, self.cluster_only = local_only, cluster_only
        self._cluster: Backend | None = None
        self._cluster_error: str | None = None
        self._cluster_tried = 0.0
        self._configs: dict[tuple[str, str, str | None], PipelineConfig] = {}
        self._ended: dict[tuple[str, str, str | None], tuple[Any, str | None]] = {}
        self._lock = threading.Lock()

    def cluster(self) -> tuple[Backend | None, str | None]:
        """The kube context's backend, or why there is none."""
        if self.local_only:
            return None, None
        with self._lock:
            if self._cluster is None and time.monotonic() - self._cluster_tried > CLUSTER_RETRY_S:
                self._cluster_tried = time.monotonic()
                if not api.cluster_configured():
                    self._cluster_error = NO_CLUSTER
                    return None, self._cluster_error
                try:
                    from launcher.backends.kubernetes import KubernetesBackend

                    self._cluster, self._cluster_error = KubernetesBackend(), None
                except (KubetuneError, ImportError) as err:
                    self._cluster_error = f"cluster: {one_line(err)}"
            return self._cluster, self._cluster_error

    def backend(self, name: str) -> Backend:
        if name == "local":
            if self.cluster_only:
                raise UserError("this UI runs nothing on its own machine (--cluster-only)")
            return self.local
        cluster, error = self.cluster()
        if cluster is None and error == NO_CLUSTER:  # the runs list's words do not fit here
            raise UserError(NO_KUBECONFIG, hint="choose 'this machine' to train here")
        if cluster is None:
            why = error or "this UI was started with --local-only"
            raise UserError(f"no cluster to use: {why}")
        return cluster

    def config(self, backend: Backend, status: RunStatus) -> PipelineConfig:
        key = (backend.name, status.run, status.config_hash)
        if key not in self._configs:
            self._configs[key] = backend.run_config(status.run)
        return self._configs[key]

    def store(self, backend_name: str, run: str) -> tuple[ObjectStore, RunStatus]:
        from kubetune.storage import open_store

        backend = self.backend(backend_name)
        status = backend.status(run)
        cfg = self.config(backend, status)
        return open_store(status.output_uri or cfg.base_output_dir, cfg.storage), status

    # --- listing ----------------------------------------------------------------------------

    def listing(self) -> dict[str, Any]:
        """Every run as a row, newest progress first read from progress.json."""
        rows: list[dict[str, Any]] = []
        messages: list[str] = []
        backends: list[Backend] = [] if self.cluster_only else [self.local]
        cluster, error = self.cluster()
        if cluster is not None:
            backends.append(cluster)
        elif error:
            messages.append(error)
        for backend in backends:
            try:
                statuses = backend.list()
            except KubetuneError as err:
                messages.append(f"{backend.name}: {one_line(err)}")
                continue
            rows += [self.row(backend, s) for s in statuses]
        return {"runs": rows, "messages": messages}

    def row(self, backend: Backend, status: RunStatus) -> dict[str, Any]:
        """The table row; progress.json is read once more after a run ended, then kept."""
        key = (backend.name, status.run, status.config_hash)
        if status.phase not in ENDED:
            self._ended.pop(key, None)  # a resumed run is running again
        if status.phase in ENDED and key in self._ended:
            status.progress, status.progress_error = self._ended[key]
        elif status.progress is None and status.phase not in ("Pending", "Suspended", UNREADABLE):
            try:
                cfg = self.config(backend, status)
                status.progress, status.progress_error = read_progress(
                    status.output_uri or cfg.base_output_dir, cfg.storage
                )
            except KubetuneError as err:
                status.progress_error = one_line(err)
            if status.phase in ENDED and status.progress is not None:
                self._ended[key] = (status.progress, status.progress_error)
        return row_of(status)

    # --- one run ----------------------------------------------------------------------------

    def detail(self, backend_name: str, run: str) -> dict[str, Any]:
        store, status = self.store(backend_name, run)
        keys = _keys(store)
        grids = sorted(
            (step, key)
            for key in keys
            if key.endswith("/grid.png") and (step := _validation_step(key)) is not None
        )
        final = [k for k in keys if k.startswith(f"{FINAL}/")]
        return {
            "run": row_of(status),
            "status": status.summary(),
            "history": read_history(store),
            "grids": [{"step": s, "key": k} for s, k in grids],
            "final": final,
            "report": REPORT_KEY in keys,
            "actions": actions(
                status.phase, final=final_manifest_key() in final, report=REPORT_KEY in keys
            ),
        }

    def logs(self, backend_name: str, run: str, lines: int = 200) -> list[str]:
        tail = deque(self.backend(backend_name).logs(run, follow=False), maxlen=lines)
        return [redact(line) for line in tail]

    def file(self, backend_name: str, run: str, key: str) -> bytes:
        """One output object the page shows (validation images, final weights, report)."""
        if ".." in key.split("/") or not (key.startswith(SERVED_PREFIXES) or key in SERVED_KEYS):
            raise UserError(f"{key}: not a run output this page serves")
        store, _ = self.store(backend_name, run)
        return store.get_bytes(key)

    def sweep(self, backend_name: str, sweep: str) -> dict[str, Any]:
        """A sweep's runs side by side (their values, progress) and every run's validation
        thumbnails by step and prompt, for the prompt × run view."""
        from kubetune.storage import open_store

        backend = self.backend(backend_name)
        statuses = sorted(
            (s for s in backend.list() if s.labels.get(LABEL_SWEEP) == sweep), key=lambda s: s.run
        )
        if not statuses:
            raise UserError(f"no sweep {sweep!r} among the {backend_name} runs")
        members = []
        for status in statuses:
            row = self.row(backend, status)
            cfg = self.config(backend, status)
            store = open_store(status.output_uri or cfg.base_output_dir, cfg.storage)
            thumbs: dict[int, dict[int, str]] = {}
            for info in _listing(store, f"{VALIDATION}/"):
                if (parsed := parse_thumb_key(info)) is not None:
                    thumbs.setdefault(parsed[0], {})[parsed[1]] = info
            members.append({**row, "prompts": list(cfg.validation_prompts), "thumbs": thumbs})
        steps = sorted({step for m in members for step in m["thumbs"]})
        return {"sweep": sweep, "backend": backend.name, "runs": members, "steps": steps}

    def pull(self, backend_name: str, run: str, dest: Path) -> dict[str, Any]:
        """The final weights into `dest`, each file checked against the manifest (exactly
        `launcher pull RUN -o DEST`)."""
        from launcher.outputs import pull

        store, _ = self.store(backend_name, run)
        return pull(store, dest).to_json()

    def cancel(self, backend_name: str, run: str) -> dict[str, Any]:
        return row_of(self.backend(backend_name).cancel(run))


def actions(phase: str, *, final: bool, report: bool) -> list[str]:
    """What a run's page offers: cancel while the run may still run; resume once it stopped
    before its end (its config submitted again continues from its newest checkpoint: a local
    run's next attempt, a cluster's failed Job replaced by a new one); pull once final
    weights are published; the report once written."""
    offered = [] if phase in TERMINAL_PHASES else ["cancel"]
    offered += ["resume"] if phase in RESUMABLE_PHASES else []
    offered += ["pull"] if final else []
    return offered + (["report"] if report else [])


def row_of(status: RunStatus) -> dict[str, Any]:
    """What the runs table shows of one run."""
    p = status.progress
    return {
        "backend": status.backend,
        "run": status.run,
        "phase": status.phase,
        "reason": redact(" ".join(x for x in (status.reason, status.message) if x)) or None,
        "step": p.step if p else None,
        "total": p.total_steps if p else None,
        "loss": p.loss if p else None,
        "lr": p.lr if p else None,
        "images_per_second": p.images_per_second if p else None,
        "eta": duration(p.eta_seconds) if p and _eta_applies(status, p) else None,
        "state": p.state if p else None,
        "ending": (redact(p.ending(live=not status.done) or "") or None) if p else None,
        "progress_error": status.progress_error,
        "sweep": status.labels.get(LABEL_SWEEP),
        "params": {
            k[len(PARAM_LABEL_PREFIX) :]: v
            for k, v in status.labels.items()
            if k.startswith(PARAM_LABEL_PREFIX)
        },
        "output_uri": status.output_uri,
        "done": status.done,
    }


def _eta_applies(status: RunStatus, progress: ProgressRecord) -> bool:
    """An ETA only while the run trains (an ended run's last estimate is stale)."""
    running = progress.state in ("starting", "running") and not status.done
    return running and progress.eta_seconds is not None


def _keys(store: ObjectStore) -> list[str]:
    keys = [REPORT_KEY] if store.exists(REPORT_KEY) else []
    for prefix in (f"{VALIDATION}/", f"{FINAL}/"):
        keys += _listing(store, prefix)
    return keys


def _listing(store: ObjectStore, prefix: str) -> list[str]:
    """The keys under `prefix` (none when the folder does not exist yet)."""
    try:
        return [info.key for info in store.list(prefix)]
    except FileNotFoundError:
        return []


def _validation_step(key: str) -> int | None:
    parts = key.split("/")
    return parse_step_name(parts[1]) if len(parts) == 3 and parts[0] == VALIDATION else None
