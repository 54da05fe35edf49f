"""What `submit --local` does (a mixin of `LocalBackend`): a new run started as a detached
`python -m runner` under the shim, or the same config submitted again resumed, started over
(`--replace`) or left alone; the run's folder claimed once among concurrent submits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kubetune.config import PipelineConfig, config_hash, config_to_yaml, output_uri, run_name
from kubetune.errors import KubetuneError, UserError
from launcher.backends.base import RESUMABLE_PHASES, RunStatus, SubmitResult
from launcher.backends.local_phase import CONFIG_FILE, resume_hint
from launcher.backends.local_record import RunRecordError
from launcher.manifests import job_name, run_labels, runner_env


class Submits:
    """Needs the backend's name, runs, entrypoint, _dir, _info, _status and _stop."""

    name: str
    runs: Path
    entrypoint: list[str]
    _dir: Any
    _info: Any
    _status: Any
    _stop: Any

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
            warnings=local_warnings(cfg),
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


def replace_fields(result: SubmitResult, **changes: Any) -> SubmitResult:
    return SubmitResult(**{**result.__dict__, **changes})


def local_warnings(cfg: PipelineConfig) -> tuple[str, ...]:
    """What a local run does not do that the config asks of a cluster."""
    if cfg.job is not None and cfg.job.nodes > 1:
        return (
            f"job.nodes is {cfg.job.nodes}: a local run is one node (this machine); "
            "the cluster runs the other nodes",
        )
    return ()
