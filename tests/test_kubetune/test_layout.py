"""The run layout and progress record: one torch-free owner, shared by runner and launcher."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune import layout
from kubetune.layout import ProgressRecord, SetAsideCheckpoint

ROOT = Path(__file__).resolve().parents[2]


def test_step_names_round_trip() -> None:
    assert layout.step_name(200) == "step-000200"
    assert layout.step_name(1_234_567) == "step-1234567"
    for step in (0, 7, 999_999, 1_000_000):
        assert layout.parse_step_name(layout.step_name(step)) == step
    for other in ("step-12", "step-00001a", "steps-000001", "step-000001.2026", "x"):
        assert layout.parse_step_name(other) is None
    with pytest.raises(ValueError):
        layout.step_name(-1)


def test_keys() -> None:
    assert layout.checkpoint_key(3) == "checkpoints/step-000003"
    assert layout.manifest_key(3) == "checkpoints/step-000003/manifest.json"
    assert layout.validation_key(40, "grid.png") == "validation/step-000040/grid.png"
    assert layout.set_aside_key(3, "20261201T000000Z", "a/b") == (
        "checkpoints-set-aside/step-000003.20261201T000000Z/a/b"
    )
    assert layout.final_key("lora.safetensors") == "final/lora.safetensors"
    assert layout.log_key("events.out") == "logs/events.out"


def test_layout_is_torch_free() -> None:
    code = "import sys, kubetune.layout\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_record_round_trip_ignores_unknown_fields() -> None:
    record = ProgressRecord(
        state="preempted",
        step=12,
        total_steps=40,
        resumed_from=8,
        set_aside=[SetAsideCheckpoint(step=10, reason="corrupt", moved_to="x")],
    )
    raw = json.loads(record.to_bytes())
    assert raw["images_per_second"] is None and raw["last_checkpoint_step"] is None
    raw["a_field_from_a_newer_runner"] = 1
    assert ProgressRecord.from_bytes(json.dumps(raw)) == record
    for bad in (b"[]", b"{", b'{"step": "twelve"}'):
        with pytest.raises(ValueError):
            ProgressRecord.from_bytes(bad)


def test_runner_writes_what_the_launcher_reads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The contract: every field the runner's reporter sets arrives in the launcher's view."""
    import torch

    from kubetune.storage import open_store
    from launcher.backends.base import read_progress
    from runner.reporting.progress import ProgressReporter, ProgressSettings

    reporter = ProgressReporter(
        ProgressSettings(total_steps=4, steps_per_epoch=2, log_every_n_steps=2, write_every_s=0),
        open_store(str(tmp_path)),
        start_step=0,
    )
    reporter.note(resumed_from=0)
    with caplog.at_level(logging.INFO):
        for step in range(1, 5):
            reporter.update(step, (step - 1) // 2, torch.tensor(0.25), 1e-4, images=2)
            if step == 2:
                reporter.flush()  # progress.json is written off the training thread
                mid, error = read_progress(str(tmp_path), None)
                assert error is None and mid is not None
                assert (mid.state, mid.step, mid.epoch) == ("running", 2, 1)  # counted from 1
                assert mid.images_per_second is not None and mid.images_per_second > 0
                assert mid.eta_seconds is not None and mid.lr == pytest.approx(1e-4)
        reporter.note(last_checkpoint_step=4)
        reporter.finish("completed")
    seen, error = read_progress(str(tmp_path), None)
    assert error is None and seen is not None
    assert (seen.state, seen.step, seen.total_steps, seen.epoch) == ("completed", 4, 4, 2)
    assert seen.loss == pytest.approx(0.25) and seen.last_checkpoint_step == 4
    assert seen.resumed_from == 0 and seen.updated_at is not None
    written = json.loads((tmp_path / layout.PROGRESS_KEY).read_text())
    assert set(written) == set(ProgressRecord.model_fields)  # nothing outside the contract
    assert seen.summary().startswith("step 4/4, loss 0.25, ")


def test_summary() -> None:
    record = ProgressRecord(step=40, total_steps=100, loss=0.125, images_per_second=3.5,
                            eta_seconds=95)  # fmt: skip
    assert record.summary() == "step 40/100, loss 0.125, 3.5 img/s, ETA 1m35s"
    assert ProgressRecord(state="completed", step=0).summary() == "step 0/?"


def test_ending_says_how_the_run_ended_or_that_no_end_was_recorded() -> None:
    """A failed record names its error and exit status; a record that still says running
    when the run is not live (its process gone, its Job failed: SIGKILL, a lost node, which
    leave nothing written) says so instead of passing for a running run."""
    failed = ProgressRecord(state="failed", step=3, error="CUDA error: boom", exit_code=1)
    assert failed.ending() == "failed at step 3: CUDA error: boom (exit code 1)"
    stale = ProgressRecord(step=5, total_steps=10, updated_at="2026-12-03T17:00:00+00:00")
    assert stale.ending() is None  # live: the record is the run's own word
    assert stale.ending(live=False) == (
        "not running: last record at step 5 (2026-12-03T17:00:00+00:00), no end recorded"
    )
    assert ProgressRecord(state="preempted", step=4).ending(live=False) is None
    assert ProgressRecord(state="completed", step=4).ending(live=False) is None


def test_a_lapsed_lease_says_a_running_record_is_not_running() -> None:
    """A reader with only the store (a folder, a URI) cannot ask a process or a Job: the run's
    lease tells. A record that says running whose lease expired (not renewed: SIGKILL, a lost
    node) or was released reads as not running, with when the lease expired; a current lease
    keeps it running, and a record that tells its end is never second-guessed."""
    from kubetune.layout import LeaseTerm

    body = {"holder": "pod/7", "renewed_unix": 1_000.0, "timeout_s": 60.0}
    expired = LeaseTerm.from_bytes(json.dumps(body).encode())
    assert expired is not None and expired.expires_at == "1970-01-01T00:17:40+00:00"
    assert expired.lapsed(now=1_059.0) is None  # renewed 59 s ago: current
    assert expired.lapsed(now=1_061.0) == "its lease expired at 1970-01-01T00:17:40+00:00"
    assert LeaseTerm.from_bytes(None).lapsed() == "its lease was released"  # no lease.json
    assert LeaseTerm.from_bytes(b"{not json") is None  # unreadable: no inference at all
    assert LeaseTerm.from_bytes(b'{"holder": "x"}') is None
    stale = ProgressRecord(step=5, total_steps=10, updated_at="1970-01-01T00:16:40+00:00")
    assert stale.ending(lease=expired, now=1_059.0) is None
    assert stale.ending(lease=expired, now=1_061.0) == (
        "not running: last record at step 5 (1970-01-01T00:16:40+00:00), no end recorded; "
        "its lease expired at 1970-01-01T00:17:40+00:00"
    )
    assert stale.ending(lease=None) is None  # nothing known: the record's word stands
    assert stale.ending(live=False, lease=LeaseTerm.from_bytes(None)).endswith(
        "no end recorded; its lease was released"
    )
    for ended in ("completed", "preempted"):
        assert ProgressRecord(state=ended, step=5).ending(lease=expired, now=2e9) is None
    failed = ProgressRecord(state="failed", step=5, error="boom", exit_code=1)
    assert failed.ending(lease=expired, now=2e9) == "failed at step 5: boom (exit code 1)"


_HARD_CODED = re.compile(r"step-\{|step-%0|[\"']progress\.json[\"']|[\"']manifest\.json[\"']")


def test_layout_has_one_owner() -> None:
    """No runner or launcher module formats step folders or names layout keys itself."""
    offenders = []
    for path in sorted([*ROOT.glob("runner/**/*.py"), *ROOT.glob("launcher/**/*.py")]):
        if path.name == "layout.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if _HARD_CODED.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []


def test_counts_of_one_read_as_one() -> None:
    assert layout.describe_dataset(1, {"64x64": 1}) == "1 example in 1 bucket (64x64: 1)"
    assert layout.describe_dataset(2, {"64x64": 2}) == "2 examples in 1 bucket (64x64: 2)"
    record = ProgressRecord(step=1, total_steps=2, bad_images=1)
    assert record.summary() == "step 1/2, 1 unreadable image skipped"
