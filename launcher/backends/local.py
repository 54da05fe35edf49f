"""The local backend: `python -m runner CONFIG` as a detached process on this machine, with
the pod's environment contract; state under `$KUBETUNE_HOME/runs/<run>/` (default
`~/.kubetune`)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
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
from kubetune.errors import (
    EXIT_PREEMPTED,
    EXIT_USER_ERROR,
    ConfigError,
    KubetuneError,
    UserError,
)
from launcher.backends.base import (
    RESUMABLE_PHASES,
    UNREADABLE,
    Backend,
    RunStatus,
    SubmitResult,
    read_progress,
)
from launcher.manifests import job_name, run_labels, runner_env

CONFIG_FILE = "config.yaml"


def resume_hint(run_dir: Path) -> str:
    """The command that resumes a stopped run: its own stored config (the same config hash
    whatever --name / --set its first submit had), quoted to paste as one argument."""
    config = shlex.quote(str(run_dir / CONFIG_FILE))
    return f"`launcher submit --local {config}` resumes it from its newest checkpoint"


def kubetune_home() -> Path:
    return Path(os.environ.get("KUBETUNE_HOME") or "~/.kubetune").expanduser()


class LocalBackend(Backend):
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

    def submit(self, cfg: PipelineConfig, *, replace: bool = False) -> SubmitResult:
        """A new run; or, for a run of that name with the same config, what a restarted pod
        does: resume it after a Preempted / Failed / Cancelled attempt, leave it alone while
        it runs or once it Succeeded (`replace` starts a finished run over)."""
        run, digest = run_name(cfg), config_hash(cfg)
        result = SubmitResult(
            backend=self.name,
            run=run,
            job_name=job_name(cfg),
            config_hash=digest,
            output_uri=output_uri(cfg),
            created=True,
            warnings=_local_warnings(cfg),
        )
        run_dir = self._dir(run)
        if not (run_dir / "run.json").is_file() and self._claim(run_dir):
            self._start(cfg, run_dir, attempt=1)
            return result
        try:
            info = self._info(run)
        except RunRecordError as err:
            return self._over_damaged(cfg, run_dir, result, err, replace)
        if info["config_hash"] != digest:
            if not replace:
                raise UserError(
                    f"local run {run!r} already exists with a different config "
                    f"(config hash {info['config_hash']})",
                    hint="pass --replace to stop it and start this config, or --name to "
                    f"start a new run; {resume_hint(run_dir)}",
                )
            self._stop(run, wait=30.0)
            shutil.rmtree(run_dir)
            self._make_dir(run_dir)
            self._start(cfg, run_dir, attempt=1)
            return result
        return self._again(cfg, self._status(run, with_progress=True), result, replace)

    def _over_damaged(
        self,
        cfg: PipelineConfig,
        run_dir: Path,
        result: SubmitResult,
        err: RunRecordError,
        replace: bool,
    ) -> SubmitResult:
        """A run whose run.json is damaged: its pid and state are unknown, so only `replace`
        goes on: the run folder is remade and training starts from step 0 (outputs stay)."""
        if not replace:
            message = str(err).removesuffix(f" ({err.hint})")
            raise RunRecordError(
                message,
                hint=f"pass --replace to start this run over from step 0, or {err.hint}",
            )
        shutil.rmtree(run_dir)
        self._make_dir(run_dir)
        self._start(cfg, run_dir, attempt=1, fresh=True)
        note = "starting over from step 0 (--replace; the run's run.json was damaged)"
        return replace_fields(result, note=note)

    def _again(
        self, cfg: PipelineConfig, status: RunStatus, result: SubmitResult, replace: bool
    ) -> SubmitResult:
        """The same config submitted again: resume, restart (`replace`) or leave alone."""
        where = f" at {status.progress.summary(live=not status.done)}" if status.progress else ""
        attempt = len(status.pods) + 1
        if status.phase in RESUMABLE_PHASES:
            self._start(cfg, self._dir(status.run), attempt=attempt, previous=status.phase)
            note = (
                f"resuming (attempt {attempt}; the last one ended {status.phase}{where}): "
                "training continues from the newest checkpoint"
            )
            return replace_fields(result, resumed_after=status.phase, note=note)
        if status.phase == "Succeeded" and replace:
            self._start(cfg, self._dir(status.run), attempt=attempt, fresh=True,
                        previous=status.phase)  # fmt: skip
            note = f"starting over from step 0 (--replace; attempt {attempt})"
            return replace_fields(result, note=note)
        if status.phase == "Succeeded":
            note = f"already finished (same config){where}; --replace starts it over"
        else:
            note = f"already running (same config){where}"
            if replace:  # --replace never stops a running run of the same config
                note += (
                    f"; --replace leaves a running run alone: `launcher cancel {status.run}` first"
                )
        return replace_fields(result, created=False, note=note)

    def _claim(self, run_dir: Path, wait: float = 10.0) -> bool:
        """Make the run's folder: True if this submit starts the run. False when another
        submit of it made the folder first and has written its run.json (within `wait` s);
        a folder that stays without one (a submit killed in between) is taken over."""
        try:
            run_dir.mkdir(parents=True)
            return True
        except FileExistsError:
            pass
        except OSError:
            self._make_dir(run_dir)  # the one-line error
        if time.time() - run_dir.stat().st_mtime > wait:  # left over, not being made now
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if (run_dir / "run.json").is_file():
                return False
            time.sleep(0.05)
        return True

    def check_home(self) -> None:
        """The one-line error of a runs folder that cannot be made (a file on its path, a
        folder not writable), before the checks of a submit that need the network; nothing is
        created."""
        existing = self.runs
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
            return
        why = "Permission denied" if existing.is_dir() else f"{existing} is not a folder"
        raise KubetuneError(
            f"cannot create the local run folder {self.runs}: {why}",
            hint="set KUBETUNE_HOME to a writable folder (default ~/.kubetune)",
        )

    def _make_dir(self, run_dir: Path) -> None:
        try:
            run_dir.mkdir(parents=True)
        except OSError as err:
            raise KubetuneError(
                f"cannot create the local run folder {run_dir}: {err.strerror}",
                hint="set KUBETUNE_HOME to a writable folder (default ~/.kubetune)",
            ) from None

    def _start(
        self,
        cfg: PipelineConfig,
        run_dir: Path,
        *,
        attempt: int,
        fresh: bool = False,
        previous: str | None = None,
    ) -> None:
        """Start attempt `attempt` of the run in `run_dir` (the log grows; `fresh`: from
        step 0, discarding the run's checkpoints; `previous`: how the last attempt ended)."""
        for marker in ("exit_code", "cancelled"):
            (run_dir / marker).unlink(missing_ok=True)
        config_path = run_dir / CONFIG_FILE
        config_path.write_text(config_to_yaml(cfg))
        env = {**os.environ, **runner_env(cfg), "KUBETUNE_CONFIG": str(config_path)}
        command = [*self.entrypoint, str(config_path), *(["--no-resume"] if fresh else [])]
        with open(run_dir / "log.txt", "ab") as log:
            offset = log.tell()
            if attempt > 1:
                log.write(f"==> attempt {attempt} <==\n".encode())
                log.flush()
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
        old = json.loads((run_dir / "run.json").read_text()) if attempt > 1 else {}
        attempts = old.get("attempts", [])
        if attempts and previous:
            attempts[-1]["ended"] = previous
        attempts.append({"pid": proc.pid, "started": time.time(), "log_offset": offset})
        info = {
            "run": run_name(cfg),
            "job_name": job_name(cfg),
            "config_hash": config_hash(cfg),
            "output_uri": output_uri(cfg),
            "pid": proc.pid,
            "command": command,
            "started": attempts[0]["started"],
            "attempts": attempts,
            "labels": run_labels(cfg),
        }
        tmp = run_dir / "run.json.tmp"
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, run_dir / "run.json")

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
        status.phase, status.reason, status.message = _attempt_phase(info["pid"], run_dir)
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
        if _finished_later(status, attempts[-1]["started"]):
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
                    or not _alive(self._info(run)["pid"])
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


class RunRecordError(KubetuneError):
    """A local run's run.json cannot be read (damaged or written by something else)."""


RUN_RECORD_FIELDS = ("config_hash", "job_name", "output_uri", "pid", "run", "started")


def read_run_record(path: Path) -> dict[str, Any]:
    """A local run's run.json, or RunRecordError naming the file and what is wrong with it."""
    try:
        info = json.loads(path.read_bytes())
    except OSError as err:
        why = f"cannot be read ({err.strerror})"
    except json.JSONDecodeError as err:
        why = f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
    except ValueError:  # not UTF-8
        why = "not valid JSON (not UTF-8 text)"
    else:
        why = _record_problem(info)
        if why is None:
            return info
    raise RunRecordError(
        f"{path}: {why}",
        hint=f"remove {path.parent} to forget this run; its outputs stay where they are",
    )


def _record_problem(info: Any) -> str | None:
    if not isinstance(info, dict):
        kind = {list: "list", str: "string", bool: "boolean"}.get(type(info), "number")
        return f"a JSON {'null' if info is None else kind} where an object is expected"
    missing = [k for k in RUN_RECORD_FIELDS if k not in info]
    if missing:
        return f"lacks {', '.join(missing)}"
    if not isinstance(info["pid"], int):
        return f"pid is {info['pid']!r}, not a process id"
    return None


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


def replace_fields(result: SubmitResult, **changes: Any) -> SubmitResult:
    return SubmitResult(**{**result.__dict__, **changes})


def _attempt_phase(pid: int, run_dir: Path) -> tuple[str, str | None, str | None]:
    """(phase, reason, message) of the latest attempt, from its exit status."""
    exit_file = run_dir / "exit_code"
    if not exit_file.is_file():
        if _alive(pid):
            return "Running", None, None
        if (run_dir / "cancelled").exists():  # SIGTERM before the shim could record anything
            return "Cancelled", "SIGTERM", f"cancelled before it started; {resume_hint(run_dir)}"
        return "Failed", "Lost", "the process ended without recording an exit status"
    code = int(exit_file.read_text())
    if code == 0:
        return "Succeeded", None, None
    if (run_dir / "cancelled").exists():
        return "Cancelled", "SIGTERM", f"cancelled; {resume_hint(run_dir)}"
    if code == EXIT_PREEMPTED:
        return "Preempted", "SIGTERM", f"stopped after writing a checkpoint; {resume_hint(run_dir)}"
    return "Failed", f"exit code {code}", _exit_meaning(code, run_dir / "log.txt")


def _finished_later(status: RunStatus, attempt_started: float) -> bool:
    """The run's progress says completed, written after its latest attempt started: someone
    finished it with `python -m runner` after the launcher's attempt ended."""
    progress = status.progress
    if status.phase in ("Running", "Succeeded") or progress is None:
        return False
    if progress.state != "completed" or progress.updated_at is None:
        return False
    written = dt.datetime.fromisoformat(progress.updated_at).timestamp()
    return written >= attempt_started - 1.0


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


_ERROR_PREFIX = "kubetune: error: "  # how `python -m runner` prints the error it exits with


def _exit_meaning(code: int, log: Path) -> str:
    """What a failed attempt's exit means: for bad input (exit 2) the runner's own error line,
    else the log's last line."""
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    if code == EXIT_USER_ERROR:
        errors = [line for line in lines if line.startswith(_ERROR_PREFIX)]
        where = f"`launcher logs --local {log.parent.name}`"
        if errors:
            return f"{_clip(errors[-1][len(_ERROR_PREFIX) :], 1000)} (log: {where})"
        return f"config or data error (see {where})"
    killed = _signal_meaning(code)
    if killed:
        return killed
    return _clip(lines[-1], 300) if lines else "the runner failed"


def _clip(text: str, limit: int) -> str:
    """`text`, or its first words up to `limit` characters and an ellipsis (the runner's
    error lines end with their fix: cut only what is very long, and never mid-word)."""
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


def _signal_meaning(code: int) -> str | None:
    """`killed by SIGKILL (...)` for an exit status of 128 + N (the shim's record of a
    process killed by signal N); None for an ordinary exit status."""
    try:
        name = signal.Signals(code - 128).name if code > 128 else None
    except ValueError:
        return None
    if name == "SIGKILL":
        return (
            "killed by SIGKILL: out of memory (the kernel's OOM killer: `dmesg` says) or "
            "kill -9; lower train_batch_size or resolution, or resubmit to resume"
        )
    return f"killed by {name}" if name else None


def _local_warnings(cfg: PipelineConfig) -> tuple[str, ...]:
    """What a local run does not do that the config asks of a cluster."""
    if cfg.job is not None and cfg.job.nodes > 1:
        return (
            f"job.nodes is {cfg.job.nodes}: a local run is one node (this machine); "
            "the cluster runs the other nodes",
        )
    return ()
