"""Supervises a local run: starts the runner, forwards SIGTERM/SIGINT to it, and records its
exit status in `<run dir>/exit_code` (the launcher that started it may be gone by then).

Usage: python -m launcher.backends.local_shim RUN_DIR -- COMMAND...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    run_dir, command = Path(argv[0]), argv[2:]
    child: subprocess.Popen[bytes] | None = None
    stopped: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        stopped.append(signum)
        if child is not None:
            child.send_signal(signum)

    # Forward before the runner exists: a SIGTERM in between must neither kill this shim
    # (no exit status recorded) nor leave the runner going on its own.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    if not stopped:
        child = subprocess.Popen(command)
        if stopped:  # arrived while Popen ran, before `child` was set
            child.send_signal(stopped[0])
    code = child.wait() if child is not None else -stopped[0]
    code = 128 - code if code < 0 else code  # killed by signal N -> 128 + N
    tmp = run_dir / "exit_code.tmp"
    tmp.write_text(f"{code}\n")
    os.replace(tmp, run_dir / "exit_code")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
