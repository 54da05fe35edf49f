"""The local backend: `python -m runner CONFIG` as a detached process on this machine, with
the pod's environment contract; state under `$KUBETUNE_HOME/runs/<run>/` (default
`~/.kubetune`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kubetune.config import (
    PipelineConfig,
    config_hash,
    config_to_yaml,
    output_uri,
    parse_config,
    run_name,
)
from kubetune.config.cluster import sanitize_name
from kubetune.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, KubetuneError, UserError
from launcher.backends.base import Backend, RunStatus, SubmitResult, read_progress
from launcher.manifests import job_name, run_labels, runner_env


def kubetune_home() -> Path:
    return Path(os.environ.get("KUBETUNE_HOME") or "~/.kubetune").expanduser()


class LocalBackend(Backend):
    """Runs on this machine; the same entrypoint and env contract as the pod."""

    name = "local"

    def __init__(self, home: Path | None = None, entrypoint: Sequence[str] | None = None) -> None:
        self.runs = (home or kubetune_home()) / "runs"
        self.entrypoint = list(entrypoint or [sys.executable, "-m", "runner"])

    def _dir(self, run: str) -> Path:
        return self.runs / sanitize_name(run)

    def _info(self, run: str) -> dict[str, Any]:
        path = self._dir(run) / "run.json"
        if not path.is_file():
            raise UserError(
                f"no local run {run!r} in {self.runs}",
                hint="`launcher list --local` shows the local runs",
            )
        return json.loads(path.read_text())

    def submit(self, cfg: PipelineConfig, *, replace: bool = False) -> SubmitResult:
        run, digest = run_name(cfg), config_hash(cfg)
        result = SubmitResult(
            backend=self.name,
            run=run,
            job_name=job_name(cfg),
            config_hash=digest,
            output_uri=output_uri(cfg),
            created=True,
        )
        run_dir = self._dir(run)
        if (run_dir / "run.json").is_file():
            info = self._info(run)
            if info["config_hash"] == digest:
                return SubmitResult(**{**result.__dict__, "created": False})
            if not replace:
                raise UserError(
                    f"local run {run!r} already exists with a different config "
                    f"(config hash {info['config_hash']})",
                    hint="pass --replace to stop it and start this config, or "
                    "--name to start a new run",
                )
            self._stop(run, wait=30.0)
            shutil.rmtree(run_dir)
        try:
            run_dir.mkdir(parents=True)
        except OSError as err:
            raise KubetuneError(
                f"cannot create the local run folder {run_dir}: {err.strerror}",
                hint="set KUBETUNE_HOME to a writable folder (default ~/.kubetune)",
            ) from None
        config_path = run_dir / "config.yaml"
        config_path.write_text(config_to_yaml(cfg))
        env = {**os.environ, **runner_env(cfg), "KUBETUNE_CONFIG": str(config_path)}
        command = [*self.entrypoint, str(config_path)]
        with open(run_dir / "log.txt", "ab") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "launcher.backends.local_shim",
                    str(run_dir),
                    "--",
                    *command,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        (run_dir / "run.json").write_text(
            json.dumps(
                {
                    "run": run,
                    "job_name": result.job_name,
                    "config_hash": digest,
                    "output_uri": result.output_uri,
                    "pid": proc.pid,
                    "command": command,
                    "started": time.time(),
                    "labels": run_labels(cfg),
                },
                indent=2,
            )
        )
        return result

    def status(self, run: str) -> RunStatus:
        return self._status(run, with_progress=True)

    def _status(self, run: str, *, with_progress: bool) -> RunStatus:
        info, run_dir = self._info(run), self._dir(run)
        status = RunStatus(
            backend=self.name,
            run=info["run"],
            job_name=info["job_name"],
            phase="Running",
            output_uri=info["output_uri"],
            config_hash=info["config_hash"],
            pods=[str(info["pid"])],
            labels=dict(info.get("labels") or {}),
        )
        exit_file = run_dir / "exit_code"
        if exit_file.is_file():
            code = int(exit_file.read_text())
            status.phase = "Succeeded" if code == 0 else "Failed"
            if (run_dir / "cancelled").exists() and code != 0:
                status.phase, status.reason = "Cancelled", "SIGTERM"
            elif code:
                status.reason = f"exit code {code}"
                status.message = _exit_meaning(code, run_dir / "log.txt")
        elif not _alive(info["pid"]):
            status.phase, status.reason = "Failed", "Lost"
            status.message = "the process ended without recording an exit status"
        if with_progress:
            cfg = self.run_config(run)
            status.progress, status.progress_error = read_progress(info["output_uri"], cfg.storage)
        return status

    def run_config(self, run: str) -> PipelineConfig:
        self._info(run)
        path = self._dir(run) / "config.yaml"
        return parse_config(path.read_text(), name=str(path))

    def logs(self, run: str, *, follow: bool = False) -> Iterator[str]:
        self._info(run)
        run_dir = self._dir(run)
        with open(run_dir / "log.txt", encoding="utf-8", errors="replace") as log:
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
                    or not _alive(self._info(run)["pid"])
                ):
                    rest = partial + log.read()
                    yield from (line for line in rest.splitlines())
                    return
                time.sleep(0.1)

    def cancel(self, run: str, *, wait: bool = False, timeout: float = 300.0) -> RunStatus:
        (self._dir(run) / "cancelled").touch()
        self._stop(run, wait=timeout if wait else 0.0)
        status = self._status(run, with_progress=False)
        if status.phase == "Running":
            status.phase, status.reason = "Cancelled", "SIGTERM sent"
            status.message = f"the run checkpoints and stops; outputs stay in {status.output_uri}"
        return status

    def _stop(self, run: str, *, wait: float) -> None:
        pid = self._info(run)["pid"]
        if not (self._dir(run) / "exit_code").exists() and _alive(pid):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait
        while (
            time.monotonic() < deadline
            and _alive(pid)
            and not (self._dir(run) / "exit_code").exists()
        ):
            time.sleep(0.1)

    def list(self) -> list[RunStatus]:
        if not self.runs.is_dir():
            return []
        return [
            self._status(d.name, with_progress=False)
            for d in sorted(self.runs.iterdir())
            if (d / "run.json").is_file()
        ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def _exit_meaning(code: int, log: Path) -> str:
    if code == EXIT_USER_ERROR:
        return "config or data error (see `launcher logs RUN`)"
    if code == EXIT_PREEMPTED:
        return "stopped by SIGTERM after writing a checkpoint"
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    return lines[-1][:200] if lines else "the runner failed"
