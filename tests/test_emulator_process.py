"""The process handling the storage emulators share (tests/emulator_process.py): a server that
exits or never answers is reported with its log, not waited on; a stop ends what it started."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from emulator_process import Emulator, ServerProcess, free_ports, unique_name


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_server_that_exits_is_reported_with_its_log(tmp_path: Path) -> None:
    proc = ServerProcess("exits", _python("print('bad flag'); raise SystemExit(3)"),
                         log=tmp_path / "log")  # fmt: skip
    with pytest.raises(RuntimeError, match=r"exits exited with 3:\nbad flag"):
        proc.wait_ready(lambda: 1 / 0, timeout_s=30, every_s=0.05)


def test_a_server_that_never_answers_times_out_and_stop_ends_it(tmp_path: Path) -> None:
    proc = ServerProcess("silent", _python("import time; time.sleep(60)"))
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"silent not ready after 0.1s \(division by zero\)"):
        proc.wait_ready(lambda: 1 / 0, timeout_s=0.1, every_s=0.02)
    assert time.monotonic() - started < 10
    proc.stop()
    assert proc.proc.poll() is not None


def test_a_failed_launch_stops_the_emulator_and_a_ready_one_is_used_as_a_context() -> None:
    class Probe(Emulator):
        _proc: ServerProcess | None = None
        stops = 0

        def start(self, answers: bool = True) -> Probe:
            self._launch("probe", _python("import time; time.sleep(60)"),
                         (lambda: None) if answers else (lambda: 1 / 0), 0.1, 0.02)  # fmt: skip
            return self

        def stop(self) -> None:
            self.stops += 1
            proc, self._proc = self._proc, None
            if proc is not None:
                proc.stop()

    failed = Probe()
    with pytest.raises(TimeoutError):
        failed.start(answers=False)
    assert failed.stops == 1 and failed._proc is None
    with Probe() as probe:
        running = probe._proc
        assert running is not None and running.proc.poll() is None
    assert probe.stops == 1 and running.proc.poll() is not None


def test_ports_are_distinct_and_names_unique() -> None:
    ports = free_ports(10)
    assert len(set(ports)) == 10
    names = {unique_name("Test") for _ in range(100)}
    assert len(names) == 100 and all(n.startswith("test-") and len(n) <= 63 for n in names)
