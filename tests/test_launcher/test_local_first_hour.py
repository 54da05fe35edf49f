"""A newcomer's first hour with the real runner (issue #27): a config whose paths are relative
to its own folder, submitted with `launcher submit --local` from another folder; the run
preempted (SIGTERM) says Preempted, a resubmit of the same config resumes it from its
checkpoint to Succeeded, and its report says from where; `status`, `report` and `pull` find
it from a third folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kubetune.layout import PROGRESS_KEY

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.slow


def _launcher(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def _project(tmp_path: Path) -> Path:
    """The quickstart config and sample data copied to a folder of their own."""
    project = tmp_path / "project"
    shutil.copytree(ROOT / "examples" / "sample_data", project / "sample_data")
    data = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    data.update(base_output_dir="runs/first-hour", max_train_steps=24, save_every_n_steps=2,
                validate_every_n_steps=24, log_every_n_steps=4, report_to=None)  # fmt: skip
    data["job"]["name"] = "first-hour"
    (project / "lora.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return project


def _wait_for_step(progress: Path, step: int, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads(progress.read_text()).get("step", 0) >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    pytest.fail(f"{progress} never reached step {step}")


def test_kill_resume_and_find_the_run_from_any_folder(tmp_path: Path) -> None:
    project = _project(tmp_path)
    elsewhere, third = tmp_path / "elsewhere", tmp_path / "third"
    elsewhere.mkdir(), third.mkdir()
    env = {**os.environ, "KUBETUNE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1",
           "HOME": str(tmp_path / "user")}  # fmt: skip
    env.pop("KUBECONFIG", None)
    config = os.path.relpath(project / "lora.yaml", elsewhere)
    out = project / "runs" / "first-hour"
    first = _launcher(elsewhere, env, "submit", "--local", config)
    assert first.returncode == 0, first.stderr
    assert f"outputs: {out}" in first.stdout  # absolute, under the config's folder
    _wait_for_step(out / PROGRESS_KEY, 4)
    time.sleep(0.6)  # past the log line at step 4: the SIGTERM checkpoint is at a later step
    run = json.loads((tmp_path / "home" / "runs" / "first-hour" / "run.json").read_text())
    os.kill(run["pid"], signal.SIGTERM)  # a preemption, not `launcher cancel`
    status = _launcher(third, env, "status", "first-hour")
    deadline = time.monotonic() + 120
    while "Running" in status.stdout.splitlines()[0] and time.monotonic() < deadline:
        time.sleep(0.5)
        status = _launcher(third, env, "status", "first-hour")
    assert status.stdout.startswith("first-hour: Preempted (SIGTERM"), status.stdout
    stopped = json.loads((out / PROGRESS_KEY).read_text())
    stopped_at = stopped["last_checkpoint_step"]
    assert stopped["state"] == "preempted" and stopped["step"] == stopped_at  # where it resumes

    again = _launcher(elsewhere, env, "submit", "--local", "--wait", config)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "first-hour: resuming (attempt 2; the last one ended Preempted" in again.stdout
    assert "first-hour: Succeeded" in again.stdout and f"final:      {out}/final/" in again.stdout
    record = json.loads((out / PROGRESS_KEY).read_text())
    assert record["resumed_from"] == stopped_at and record["state"] == "completed"
    report_html = (out / "report.html").read_text()
    assert f"from checkpoint step-{stopped_at:06d}" in report_html
    assert "6 examples in 1 bucket (64x64: 6)" in report_html

    assert _launcher(third, env, "status", "first-hour").stdout.startswith("first-hour: Succeeded")
    report = _launcher(third, env, "report", "first-hour")
    assert report.returncode == 0 and report.stdout.strip() == str(out / "report.html")
    pulled = _launcher(third, env, "pull", "first-hour", "-o", "lora")
    assert pulled.returncode == 0, pulled.stderr
    assert (third / "lora" / "lora.safetensors").is_file()
    listed = _launcher(third, env, "list")
    assert "first-hour" in listed.stdout and "Succeeded" in listed.stdout
    finished = _launcher(elsewhere, env, "submit", "--local", "--follow", config)
    assert finished.returncode == 0 and "already finished (same config)" in finished.stdout
    assert "INFO runner" not in finished.stdout + finished.stderr  # no replay of the old log
    assert "first-hour: Succeeded" in finished.stdout


def test_bad_input_found_by_the_run_exits_2(tmp_path: Path) -> None:
    """An image that lists fine but is not an image: validate's listing passes it, the run's
    preflight fails on it (exit 2), and `submit --local --wait` exits 2 too, naming it."""
    project = _project(tmp_path)
    (project / "sample_data" / "red_circle.png").write_bytes(b"not a PNG at all")
    env = {**os.environ, "KUBETUNE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    done = _launcher(project, env, "submit", "--local", "--wait", "lora.yaml")
    assert done.returncode == 2, done.stdout + done.stderr
    failed = next(line for line in done.stdout.splitlines() if "first-hour: Failed" in line)
    assert failed.startswith("first-hour: Failed (exit code 2: ") and "red_circle.png" in failed
    logs = _launcher(project, env, "logs", "first-hour").stdout
    assert "red_circle.png" in logs and "kubetune: error:" in logs
