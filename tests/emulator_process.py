"""What the storage emulators the tests run (SeaweedFS in s3server.py, Azurite in azurite.py,
fake-gcs-server in gcs_emulator.py) share: free ports on 127.0.0.1, a child process that dies
with its parent (PR_SET_PDEATHSIG on Linux, so a killed test run leaves nothing), a bounded
wait until it answers, a stop that kills what does not terminate, unique bucket names."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

_names = itertools.count()


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def unique_name(prefix: str) -> str:
    """A bucket / container name no other test of this session uses (S3's 63 characters)."""
    return f"{prefix}-{next(_names)}-{uuid.uuid4().hex[:8]}".lower()[:63]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServerProcess:
    """One emulator's process, its output in ``log`` (or discarded without one)."""

    def __init__(
        self, name: str, args: list[str], log: Path | None = None, cwd: Path | None = None
    ) -> None:
        self.name, self.log = name, log
        out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - the child's
        self.proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )  # fmt: skip
        if log:
            out.close()  # type: ignore[union-attr]

    def wait_ready(self, probe: Callable[[], Any], timeout_s: float, every_s: float) -> None:
        """Call ``probe`` every ``every_s`` until it returns without raising (then return), the
        process exits (RuntimeError) or ``timeout_s`` passes (TimeoutError); both say why."""
        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                probe()
                return
            except Exception as exc:  # noqa: BLE001 - anything means "not ready yet"
                last = exc
            time.sleep(every_s)
        raise TimeoutError(f"{self.name} not ready after {timeout_s}s ({last}):\n{self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the log ("" without one)."""
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """Terminate the process; kill it if it is still there after 10 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


class Emulator:
    """A context manager over ``start()`` / ``stop()`` (started on entry unless running)."""

    _proc: ServerProcess | None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def _launch(
        self,
        name: str,
        args: list[str],
        probe: Callable[[], Any],
        timeout_s: float,
        every_s: float,
        log: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        """Start ``args`` as ``self._proc`` and wait until ``probe`` passes; stopped again
        (``self.stop()``) if it does not."""
        self._proc = ServerProcess(name, args, log, cwd)
        try:
            self._proc.wait_ready(probe, timeout_s, every_s)
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> Self:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
