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


def test_a_failed_cluster_run_is_offered_resume_too() -> None:
    """Submitting a failed Job's config again replaces it with a new Job that resumes, as a
    local run's next attempt does: the page offers Resume for both (a cancelled cluster run
    has no Job left to show)."""
    from launcher.ui.runs import actions

    assert actions("Failed", final=False, report=True) == ["resume", "report"]
    assert actions("Running", final=False, report=False) == ["cancel"]
    assert actions("Succeeded", final=True, report=True) == ["pull", "report"]
