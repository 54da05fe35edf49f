"""How a local run's latest attempt stands (Running, Succeeded, Failed, Preempted,
Cancelled), from its process and the exit status the shim recorded; what a failure means, and
the command that resumes a stopped run."""

from __future__ import annotations

import datetime as dt
import os
import shlex
import signal
from pathlib import Path

from kubetune.errors import EXIT_PREEMPTED, EXIT_USER_ERROR
from launcher.backends.base import RunStatus

CONFIG_FILE = "config.yaml"


def resume_hint(run_dir: Path) -> str:
    """The command that resumes a stopped run: its own stored config (the same config hash
    whatever --name / --set its first submit had), quoted to paste as one argument."""
    config = shlex.quote(str(run_dir / CONFIG_FILE))
    return f"`launcher submit --local {config}` resumes it from its newest checkpoint"


def attempt_phase(pid: int, run_dir: Path) -> tuple[str, str | None, str | None]:
    """(phase, reason, message) of the latest attempt, from its exit status."""
    exit_file = run_dir / "exit_code"
    if not exit_file.is_file():
        if alive(pid):
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


def finished_later(status: RunStatus, attempt_started: float) -> bool:
    """The run's progress says completed, written after its latest attempt started: someone
    finished it with `python -m runner` after the launcher's attempt ended."""
    progress = status.progress
    if status.phase in ("Running", "Succeeded") or progress is None:
        return False
    if progress.state != "completed" or progress.updated_at is None:
        return False
    written = dt.datetime.fromisoformat(progress.updated_at).timestamp()
    return written >= attempt_started - 1.0


def alive(pid: int) -> bool:
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
