"""What a run's page offers, by phase (the server decides, the page shows only those): Cancel
while the run may still run, Resume once it stopped before its end (Failed, Preempted,
Cancelled: its own config submitted again continues from its newest checkpoint), Pull once
final weights exist, Report once report.html is written. Runs written as LocalBackend
writes them (`fake_local_run`); the resume test's runner is a stand-in script."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from ui_support import fake_local_run

from kubetune.errors import UserError
from launcher.backends.local import LocalBackend
from launcher.ui.runs import Runs
from launcher.ui.submit import resume_run


def _write_runs(home: Path, out: Path) -> None:
    fake_local_run(home, out, "done", final=True, report=True)
    fake_local_run(home, out, "broke", exit_code=1, report=True)
    fake_local_run(home, out, "early", exit_code=1)  # failed before writing a report
    fake_local_run(home, out, "going", exit_code=None, pid=os.getpid())


def test_each_phase_offers_what_makes_sense(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _write_runs(home, tmp_path / "out")
    runs = Runs(local=LocalBackend(home), local_only=True)
    details = {name: runs.detail("local", name) for name in ("done", "broke", "early", "going")}
    assert {name: d["run"]["phase"] for name, d in details.items()} == {
        "done": "Succeeded", "broke": "Failed", "early": "Failed", "going": "Running"}  # fmt: skip
    assert {name: d["actions"] for name, d in details.items()} == {
        "done": ["pull", "report"],
        "broke": ["resume", "report"],
        "early": ["resume"],
        "going": ["cancel"],
    }
    eta = {name: d["run"]["eta"] for name, d in details.items()}
    assert eta == {"done": None, "broke": None, "early": None, "going": "1m35s"}  # ended: none


def test_resume_submits_a_failed_runs_own_config_again(tmp_path: Path) -> None:
    script = tmp_path / "stand_in.py"
    script.write_text("print('resumed', flush=True)\n")
    home = tmp_path / "home"
    _write_runs(home, tmp_path / "out")
    runs = Runs(local=LocalBackend(home, [sys.executable, str(script)]), local_only=True)
    for name, phase in (("done", "Succeeded"), ("going", "Running")):
        with pytest.raises(UserError, match=f"run {name} is {phase}: only a Failed"):
            resume_run(runs, "local", name)
    record = resume_run(runs, "local", "broke")
    assert (record["run"], record["backend"]) == ("broke", "local")
    deadline = time.monotonic() + 30
    while runs.detail("local", "broke")["run"]["phase"] != "Succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert runs.logs("local", "broke")[-1] == "resumed"


def test_a_cluster_run_is_not_offered_resume() -> None:
    """A failed Job stays until deleted and submitting its config again returns it, so the
    page does not offer a Resume that would do nothing; resume_run says what to do instead."""
    from launcher.ui.runs import actions

    assert actions("Failed", local=False, final=False, report=True) == ["report"]
    assert actions("Failed", local=True, final=False, report=True) == ["resume", "report"]
    assert actions("Running", local=False, final=False, report=False) == ["cancel"]


def test_resume_of_a_cluster_run_says_how(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend is a stand-in that only answers `status` (no cluster runs here; the
    refusal comes before anything else is asked of it)."""
    from launcher.backends.base import RunStatus

    class _Cluster:
        name = "cluster"

        def status(self, run: str) -> RunStatus:
            return RunStatus(backend="cluster", run=run, job_name=run, phase="Failed")

    runs = Runs(local_only=True)
    monkeypatch.setattr(runs, "backend", lambda name: _Cluster())
    with pytest.raises(UserError, match="`launcher cancel broke`, then `launcher submit"):
        resume_run(runs, "cluster", "broke")
