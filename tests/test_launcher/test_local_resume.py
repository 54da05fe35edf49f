"""`submit --local` of a run that exists follows the restarted-pod rule: a Preempted, Failed
or Cancelled last attempt is resumed by a new attempt, a running or finished run is left alone
(`replace` starts a finished one over), and `status` names the phases as the cluster does.

The runner here is the stand-in of test_local_backend (it follows the entrypoint contract:
progress.json states, exit 143 after SIGTERM); the real runner's resume is proved end to end
in test_local_first_hour."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from test_local_backend import _cfg, _wait_done, backend  # noqa: F401 - the fixture

from kubetune.layout import utc_now
from launcher.backends.local import LocalBackend


def _wait_running(backend: LocalBackend, tmp_path: Path) -> None:  # noqa: F811
    progress = tmp_path / "out" / "my-run" / "progress.json"
    deadline = time.monotonic() + 15
    while not (progress.exists() and "running" in progress.read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _preempt(backend: LocalBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """A run killed by SIGTERM from outside (not `launcher cancel`): a preemption."""
    monkeypatch.setenv("STAND_IN_SLEEP", "30")
    backend.submit(_cfg(tmp_path))
    _wait_running(backend, tmp_path)
    os.kill(int(backend.status("my-run").pods[-1]), signal.SIGTERM)


def test_preempted_is_not_failed_and_a_resubmit_resumes(
    backend: LocalBackend,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _preempt(backend, tmp_path, monkeypatch)
    status = _wait_done(backend, "my-run")
    assert (status.phase, status.reason) == ("Preempted", "SIGTERM")
    assert "launcher submit --local" in (status.message or "")
    monkeypatch.setenv("STAND_IN_SLEEP", "0")
    again = backend.submit(_cfg(tmp_path))
    assert again.created and again.resumed_after == "Preempted"
    assert again.note is not None and again.note.startswith("resuming (attempt 2")
    assert "step 5/10" in again.note
    status = _wait_done(backend, "my-run")
    assert status.phase == "Succeeded" and len(status.pods) == 2 and status.retries == 0
    assert "ETA" not in status.summary()
    latest = list(backend.logs("my-run", latest=True))
    assert latest[0] == "==> attempt 2 <==" and "checkpointed" not in latest
    assert "checkpointed" in list(backend.logs("my-run"))  # every attempt, oldest first


def test_failed_and_cancelled_runs_resume_a_finished_one_stays(
    backend: LocalBackend,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STAND_IN_EXIT", "2")
    backend.submit(_cfg(tmp_path))
    assert _wait_done(backend, "my-run").phase == "Failed"
    monkeypatch.setenv("STAND_IN_EXIT", "0")
    monkeypatch.setenv("STAND_IN_SLEEP", "30")
    assert backend.submit(_cfg(tmp_path)).resumed_after == "Failed"
    _wait_running(backend, tmp_path)
    running = backend.submit(_cfg(tmp_path))
    assert not running.created and "already running" in (running.note or "")
    backend.cancel("my-run", wait=True, timeout=20)
    assert _wait_done(backend, "my-run").phase == "Cancelled"
    monkeypatch.setenv("STAND_IN_SLEEP", "0")
    assert backend.submit(_cfg(tmp_path)).resumed_after == "Cancelled"
    assert _wait_done(backend, "my-run").phase == "Succeeded"
    finished = backend.submit(_cfg(tmp_path))
    assert not finished.created and "already finished" in (finished.note or "")
    assert "--replace" in (finished.note or "")
    done = backend.status("my-run")
    assert len(done.pods) == 3  # nothing started
    assert done.retries == 1  # the Failed attempt; a cancelled one is no failure


def test_replace_starts_a_finished_run_over(backend: LocalBackend, tmp_path: Path) -> None:  # noqa: F811
    backend.submit(_cfg(tmp_path))
    assert _wait_done(backend, "my-run").phase == "Succeeded"
    again = backend.submit(_cfg(tmp_path), replace=True)
    assert again.created and "starting over" in (again.note or "")
    assert _wait_done(backend, "my-run").phase == "Succeeded"
    assert "args --no-resume" in list(backend.logs("my-run", latest=True))


def test_a_run_finished_by_hand_is_succeeded(
    backend: LocalBackend,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Preempted, then resumed to the end with `python -m runner <run>/config.yaml` (not
    through the launcher): progress.json says completed after the attempt ended."""
    _preempt(backend, tmp_path, monkeypatch)
    assert _wait_done(backend, "my-run").phase == "Preempted"
    record = {"state": "completed", "step": 10, "total_steps": 10, "updated_at": utc_now()}
    (tmp_path / "out" / "my-run" / "progress.json").write_text(json.dumps(record))
    status = backend.status("my-run")
    assert status.phase == "Succeeded" and status.progress.step == 10
    assert [r.phase for r in backend.list()] == ["Succeeded"]
