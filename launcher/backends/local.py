"""The local backend: `python -m runner CONFIG` as a detached process on this machine, with
the pod's environment contract; state under `$KUBETUNE_HOME/runs/<run>/` (default
`~/.kubetune`).

`submit` is a mixin of its own (`local_submit`); the run's record is `local_record`, how its
latest attempt stands `local_phase`; this module reads, follows and stops runs."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kubetune.config import PipelineConfig, parse_config
from kubetune.config.cluster import sanitize_name
from kubetune.errors import ConfigError, UserError
from launcher.backends.base import UNREADABLE, Backend, RunStatus, read_progress
from launcher.backends.local_phase import (
    CONFIG_FILE,
    alive,
    attempt_phase,
    finished_later,
    resume_hint,
)
from launcher.backends.local_record import RUN_RECORD_FIELDS, RunRecordError, read_run_record
from launcher.backends.local_submit import Submits, replace_fields

__all__ = [
    "CONFIG_FILE",
    "RUN_RECORD_FIELDS",
    "LocalBackend",
    "RunRecordError",
    "kubetune_home",
    "read_run_record",
    "replace_fields",
    "resume_hint",
]


def kubetune_home() -> Path:
    return Path(os.environ.get("KUBETUNE_HOME") or "~/.kubetune").expanduser()


class LocalBackend(Submits, Backend):
    """Runs on this machine; the same entrypoint and env contract as the pod."""

    name = "local"

    def __init__(self, home: Path | None = None, entrypoint: Sequence[str] | None = None) -> None:
        self.runs = (home or kubetune_home()) / "runs"
        self.entrypoint = list(entrypoint or [sys.executable, "-m", "runner"])
        self._configs: dict[tuple[str, str], PipelineConfig] = {}
        """Parsed config.yaml by (path, text): listing many runs parses each once."""

    def _dir(self, run: str) -> Path:
        return self.runs / sanitize_name(run)

    def _info(self, run: str) -> dict[str, Any]:
        path = self._dir(run) / "run.json"
        if not path.is_file():
            raise UserError(
                f"no local run {run!r} in {self.runs}",
                hint="`launcher list --local` shows the local runs",
            )
        return read_run_record(path)

    def status(self, run: str) -> RunStatus:
        return self._status(run, with_progress=True)

    def _status(self, run: str, *, with_progress: bool) -> RunStatus:
        info, run_dir = self._info(run), self._dir(run)
        attempts = info.get("attempts") or [{"pid": info["pid"], "started": info["started"]}]
        status = RunStatus(
            backend=self.name,
            run=info["run"],
            job_name=info["job_name"],
            phase="Running",
            output_uri=info["output_uri"],
            config_hash=info["config_hash"],
            pods=[str(a["pid"]) for a in attempts],
            labels=dict(info.get("labels") or {}),
        )
        status.phase, status.reason, status.message = attempt_phase(info["pid"], run_dir)
        status.retries = sum(1 for a in attempts if a.get("ended") in ("Failed",))
        if with_progress or status.phase != "Running":
            try:
                cfg = self.run_config(run)
            except ConfigError as err:  # stored by an older kubetune: list the run anyway
                status.progress_error = f"its stored config no longer validates: {err.problems[0]}"
            else:
                status.progress, status.progress_error = read_progress(
                    info["output_uri"], cfg.storage
                )
        if finished_later(status, attempts[-1]["started"]):
            status.phase, status.reason = "Succeeded", None
            status.message = "finished by a later `python -m runner` of its config"
        status.retries += status.phase == "Failed"  # the latest attempt, as a failed pod counts
        if not with_progress:
            status.progress = status.progress_error = None
        return status

    def run_config(self, run: str) -> PipelineConfig:
        self._info(run)
        path = self._dir(run) / CONFIG_FILE
        text = path.read_text()
        key = (str(path), text)
        if key not in self._configs:
            self._configs[key] = parse_config(text, name=str(path))
        return self._configs[key].model_copy(deep=True)  # callers may change their copy

    def logs(
        self, run: str, *, follow: bool = False, latest: bool = False, rank: int | None = None
    ) -> Iterator[str]:
        if rank not in (None, 0):
            raise UserError(
                f"a local run has one node: --rank {rank} does not exist", hint="drop --rank"
            )
        info, run_dir = self._info(run), self._dir(run)
        with open(run_dir / "log.txt", encoding="utf-8", errors="replace") as log:
            if latest:
                log.seek((info.get("attempts") or [{}])[-1].get("log_offset", 0))
            partial = ""
            while True:
                chunk = log.readline()
                if chunk:
                    partial += chunk
                    if partial.endswith("\n"):
                        yield partial.rstrip("\n")
                        partial = ""
                    continue
                if (
                    not follow
                    or (run_dir / "exit_code").exists()
                    or not alive(self._info(run)["pid"])
                ):
                    rest = partial + log.read()
                    yield from (line for line in rest.splitlines())
                    return
                time.sleep(0.1)

    def cancel(self, run: str, *, wait: bool = False, timeout: float = 300.0) -> RunStatus:
        """SIGTERM the run (it checkpoints and stops: Cancelled). A run that already ended
        keeps its phase (a Failed run stays Failed, with its reason); no such run: UserError."""
        self._info(run)  # no such run: exit 2, before any file is written
        if (self._dir(run) / "exit_code").exists():
            return self._status(run, with_progress=False)
        (self._dir(run) / "cancelled").touch()
        self._stop(run, wait=timeout if wait else 0.0)
        status = self._status(run, with_progress=False)
        if status.phase == "Running":
            status.phase, status.reason = "Cancelled", "SIGTERM sent"
            status.message = (
                f"the run checkpoints and stops; outputs stay in {status.output_uri}; "
                f"{resume_hint(self._dir(run))}"
            )
        return status

    def _stop(self, run: str, *, wait: float) -> None:
        pid = self._info(run)["pid"]
        if not (self._dir(run) / "exit_code").exists() and alive(pid):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait
        while (
            time.monotonic() < deadline
            and alive(pid)
            and not (self._dir(run) / "exit_code").exists()
        ):
            time.sleep(0.1)

    def list(self) -> list[RunStatus]:
        """Every local run; one whose run.json cannot be read is listed as Unreadable (its
        message names the file and why) instead of hiding the others."""
        if not self.runs.is_dir():
            return []
        statuses = []
        for d in sorted(self.runs.iterdir()):
            if (d / "run.json").is_file():
                try:
                    statuses.append(self._status(d.name, with_progress=False))
                except RunRecordError as err:
                    statuses.append(_unreadable(d.name, err))
        return statuses


def _unreadable(run: str, err: RunRecordError) -> RunStatus:
    """The listing's row for a run whose run.json cannot be read."""
    return RunStatus(
        backend=LocalBackend.name,
        run=run,
        job_name="-",
        phase=UNREADABLE,
        reason="unreadable run.json",
        message=str(err),
    )
