"""Driving real ``python -m runner`` subprocesses for the preemption and storage-fault tests."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from relsupport import REPO, runner_env

STEP_DONE = re.compile(r"step (\d+) done")


@dataclass
class RunnerProc:
    """A ``python -m runner CONFIG`` subprocess whose stderr is read by a thread."""

    config: Path
    env: dict[str, str]
    lines: list[str] = field(default_factory=list)
    last_step: int = 0
    proc: subprocess.Popen[str] | None = None
    _reader: threading.Thread | None = None

    def start(self) -> RunnerProc:
        env = runner_env({**self.env, "KUBETUNE_LOG_LEVEL": "DEBUG"})
        self.proc = subprocess.Popen([sys.executable, "-m", "runner", str(self.config)],
                                     cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if m := STEP_DONE.search(line):
                self.last_step = int(m.group(1))

    def wait_for_step(self, step: int, timeout: float = 300.0) -> bool:
        """True once step ``step`` is done; False if the run ended or time ran out first."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.last_step >= step:
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.01)
        return False

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 300.0) -> int:
        assert self.proc is not None and self._reader is not None
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return code

    @property
    def log(self) -> str:
        return "".join(self.lines)
