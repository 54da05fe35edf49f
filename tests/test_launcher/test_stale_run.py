"""A run whose runner was killed outright (SIGKILL, the OOM killer, a lost node) cannot record
its end: its progress.json still says running. Readers that have only its folder or store URI
(``launcher status``, ``report`` and ``pull`` of a location) have no process or Job to ask;
the run's lease tells them: a record that says running under a lease that expired unrenewed
(or was released) is not running, in the words ``status`` uses for a named run.

Fast tests: a real ``kubetune.storage.lease.Lease`` held (a live writer: a ten-minute timeout),
then one taken and left unrenewed (as a killed holder leaves it) with a one-second timeout,
on a local folder and on SeaweedFS. The same with
a real ``python -m runner`` SIGKILLed mid-training is ``tests/test_runner/test_killed_run.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kubetune import layout
from kubetune.storage import open_store
from kubetune.storage.lease import Lease, LeaseSettings
from launcher.cli.main import main

SHORT = LeaseSettings(timeout_s=1.0, wait_s=0.0)
LIVE = LeaseSettings(timeout_s=600.0, wait_s=0.0)  # current however slow the machine
RECORD = layout.ProgressRecord(step=5, total_steps=10, loss=0.25, eta_seconds=30.0,
                               updated_at="2026-12-03T18:00:00+00:00")  # fmt: skip


@pytest.fixture(params=["local", "s3"])
def run_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A run location: a local folder, or ``s3://`` on SeaweedFS (AWS_* set)."""
    if request.param == "local":
        return str(tmp_path / "run")
    return f"{request.getfixturevalue('s3_uri')}/run"


def cli(*args: str) -> tuple[int, str, str]:
    done = CliRunner().invoke(main, list(args))
    return done.exit_code, done.stdout, done.stderr


def expire(lease_body: bytes, margin_s: float = 0.2) -> str:
    """Wait (bounded by the lease's own timeout) until the lease in ``lease_body`` has expired
    by this machine's clock; its expiry as the wording says it."""
    body = json.loads(lease_body)
    expires = body["renewed_unix"] + body["timeout_s"]
    assert expires - time.time() <= SHORT.timeout_s + 1  # a bounded wait
    time.sleep(max(0.0, expires - time.time() + margin_s))
    term = layout.LeaseTerm.from_bytes(lease_body)
    assert term is not None and term.expires_at is not None
    return term.expires_at


def test_a_location_whose_lease_expired_reads_not_running(run_uri: str, tmp_path: Path) -> None:
    """While the lease is current, status / report / pull of the location say running (an
    ETA, no note, 'has not finished'); once it expired unrenewed, each says 'not running: last
    record at step 5 (time), no end recorded; its lease expired at T', in text and JSON."""
    store = open_store(run_uri)
    live_lease = Lease(store, LIVE, holder="pod-live/1").acquire(heartbeat=False)
    store.put_bytes(layout.PROGRESS_KEY, RECORD.to_bytes())
    store.put_bytes(layout.REPORT_KEY, b"<html>step 5</html>")
    live = cli("status", run_uri, "--format", "json")
    assert live[0] == 0 and json.loads(live[1])["running"] is True, live
    assert json.loads(live[1])["ending"] is None
    assert cli("status", run_uri)[1].strip() == (
        f"{run_uri}: running; step 5/10, loss 0.25, ETA 30s"
    )
    shown = cli("report", run_uri, "-o", str(tmp_path / "view.html"), "--format", "json")
    assert shown[0] == 0 and "note" not in json.loads(shown[1]), shown
    code, _, err = cli("pull", run_uri, "-o", str(tmp_path / "w"))
    assert code == 2 and "(the run has not finished)" in err, err

    live_lease.release()
    lease = Lease(store, SHORT, holder="pod-killed/2").acquire(heartbeat=False)  # never renewed
    expired_at = expire(store.get_bytes(layout.LEASE_KEY))
    ending = ("not running: last record at step 5 (2026-12-03T18:00:00+00:00), no end "
              f"recorded; its lease expired at {expired_at}")  # fmt: skip
    code, out, _ = cli("status", run_uri)
    assert (code, out.strip()) == (0, f"{run_uri}: step 5/10, loss 0.25; {ending}")
    doc = json.loads(cli("status", run_uri, "--format", "json")[1])
    assert (doc["running"], doc["ending"], doc["progress"]["state"]) == (False, ending, "running")
    code, out, err = cli("report", run_uri, "-o", str(tmp_path / "view.html"))
    assert code == 0 and out.strip() == str((tmp_path / "view.html").absolute()), out
    assert err.strip() == f"note: the page was last written while {run_uri} trained; it is {ending}"
    shown = cli("report", run_uri, "-o", str(tmp_path / "view.html"), "--format", "json")
    assert json.loads(shown[1])["note"].endswith(f"; it is {ending}")
    code, _, err = cli("pull", run_uri, "-o", str(tmp_path / "w"))
    assert code == 2 and f"has no complete final weights (the run is {ending})" in err, err
    code, out, _ = cli("pull", run_uri, "-o", str(tmp_path / "w"), "--format", "json")
    assert code == 2 and f"the run is {ending}" in json.loads(out)["error"]["problems"][0], out
    lease.release()  # ours still (nobody took it over): deleted


def test_a_released_lease_under_a_running_record_reads_not_running(run_uri: str) -> None:
    """No lease.json at all (released without an end written) under a record that says
    running: not running, 'its lease was released'; an ended record is left as it says."""
    store = open_store(run_uri)
    with Lease(store, SHORT, holder="pod/1"):
        store.put_bytes(layout.PROGRESS_KEY, RECORD.to_bytes())
    assert not store.exists(layout.LEASE_KEY)
    doc = json.loads(cli("status", run_uri, "--format", "json")[1])
    assert doc["running"] is False
    assert doc["ending"].endswith("no end recorded; its lease was released"), doc
    done = RECORD.model_copy(update={"state": "completed", "step": 10})
    store.put_bytes(layout.PROGRESS_KEY, done.to_bytes())
    code, out, _ = cli("status", run_uri)
    assert (code, out.strip()) == (0, f"{run_uri}: completed; step 10/10, loss 0.25")


def test_status_of_a_missing_folder_or_empty_location_says_so(tmp_path: Path) -> None:
    """A path that is no folder is exit 2 naming it; a folder without a record says so."""
    code, _, err = cli("status", str(tmp_path / "nope"))
    assert code == 2 and f"{tmp_path / 'nope'}: no such folder" in err, err
    (tmp_path / "empty").mkdir()
    code, out, _ = cli("status", str(tmp_path / "empty"))
    assert (code, out.strip()) == (0, f"{tmp_path / 'empty'}: no progress recorded yet")
