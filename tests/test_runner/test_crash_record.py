"""A runner that ends by an exception leaves a final progress record: state ``failed``, the
one-line error and the exit status it exits with, published (all-or-nothing) by global rank 0
before it exits. Before, ``progress.json`` still said ``running`` and only the process (a
local run) or the Job (a cluster) said otherwise; a reader of the storage alone could not tell.

Real ``python -m runner`` on ``builtin:tiny-sd``, outputs in a local folder or on SeaweedFS.
The crash is injected by ``tests/crash_inject.py``: the N-th call of ``StepRunner.run`` (one
optimizer step) raises ``RuntimeError`` or ``MemoryError`` inside the real runner process, as
a device error or an out-of-memory error would (neither can be caused on a CPU on purpose);
everything else, the handlers and the exit status included, is the unchanged entrypoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_support import REPO, config_file, make_config, write_dataset

from kubetune.errors import EXIT_FAILURE, EXIT_INTERRUPTED, exit_code_for
from kubetune.layout import PROGRESS_KEY, REPORT_KEY, ProgressRecord
from launcher.backends.base import read_progress

pytestmark = pytest.mark.timeout(600)
STEP_CRASH = "runner.training.loop:StepRunner.run"


def run_with_crash(config: Path, spec: str, work: Path) -> subprocess.CompletedProcess[str]:
    """``python -m runner CONFIG`` with the crash ``spec`` (see ``tests/crash_inject.py``)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "KUBETUNE_WORK_DIR": str(work)}  # fmt: skip
    command = [sys.executable, str(REPO / "tests" / "crash_inject.py"), spec, str(config)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=540)


def test_exit_code_for_says_what_the_entrypoint_exits_with() -> None:
    """The record's exit status is the entrypoint's: a kubetune error's own, 130 on Ctrl-C,
    1 for anything else (an uncaught exception exits 1)."""
    from kubetune.errors import DataError, Preempted

    assert exit_code_for(DataError("x")) == 2 and exit_code_for(Preempted("x")) == 143
    assert exit_code_for(KeyboardInterrupt()) == EXIT_INTERRUPTED == 130
    assert exit_code_for(RuntimeError("x")) == exit_code_for(MemoryError()) == EXIT_FAILURE


@pytest.mark.slow
def test_a_crash_mid_training_records_failed_locally(tmp_path: Path) -> None:
    """Step 4 raises: the process exits 1 as before (a traceback), and progress.json says
    failed at step 3 (the last step done), with the error line and exit code 1; the folder
    holds the record alone, no temporary file beside it; the final report.html shows the
    error."""
    data = write_dataset(tmp_path / "data", n=2)
    out = tmp_path / "out"
    cfg = make_config("SD_LORA", Path("builtin:tiny-sd"), data, out, train_batch_size=1,
                      max_train_steps=6, save_every_n_steps=2, log_every_n_steps=1)  # fmt: skip
    done = run_with_crash(config_file(cfg, tmp_path / "run.yaml"), f"{STEP_CRASH}:4:RuntimeError",
                          tmp_path / "work")  # fmt: skip
    assert done.returncode == EXIT_FAILURE, done.stderr[-3000:]
    assert "RuntimeError: injected crash (call 4 of StepRunner.run)" in done.stderr
    record = ProgressRecord.from_bytes((out / PROGRESS_KEY).read_bytes())
    assert record.state == "failed", record
    assert record.error == "injected crash (call 4 of StepRunner.run)"
    assert (record.exit_code, record.step, record.last_checkpoint_step) == (1, 3, 2)
    assert sorted(p.name for p in out.iterdir() if "progress" in p.name) == [PROGRESS_KEY]
    page = (out / REPORT_KEY).read_text()  # the final report says so too
    assert "injected crash (call 4 of StepRunner.run) (exit code 1)" in page


@pytest.mark.slow
def test_out_of_memory_on_s3_records_failed_for_storage_readers(
    tmp_path: Path, s3_uri: str
) -> None:
    """Outputs on SeaweedFS: an out-of-memory error at step 2 exits 1 with the entrypoint's
    one line, and what `launcher status` reads from the bucket alone (no process, no Job to
    ask) says failed, with that line and the exit code."""
    uri = f"{s3_uri}/oom"  # s3_uri: AWS_* set for the runner (SeaweedFS on 127.0.0.1)
    data = write_dataset(tmp_path / "data", n=2)
    cfg = make_config("SD_LORA", Path("builtin:tiny-sd"), data, uri, train_batch_size=1,
                      max_train_steps=4, log_every_n_steps=1)  # fmt: skip
    done = run_with_crash(config_file(cfg, tmp_path / "run.yaml"), f"{STEP_CRASH}:2:MemoryError",
                          tmp_path / "work")  # fmt: skip
    assert done.returncode == EXIT_FAILURE, done.stderr[-3000:]
    assert "kubetune: error: out of memory" in done.stderr, done.stderr[-3000:]
    record, why = read_progress(uri, cfg.storage)
    assert record is not None, why
    assert (record.state, record.exit_code, record.step) == ("failed", 1, 1), record
    assert record.error is not None and record.error.startswith("out of memory (lower ")


@pytest.mark.slow
def test_a_crash_on_another_rank_is_recorded_by_rank_0(tmp_path: Path) -> None:
    """Two processes (the pod's ``python -m runner.launch``, gloo): rank 1 crashes at step 3
    and leaves its error line and exit code in torchrun's store before it exits; rank 0, whose
    all-reduce loses its peer, finds them there and records and prints rank 1's error (not
    "lost contact with the other processes", which named no cause), with its exit code 1, the
    pod's exit status."""
    from dp_support import env, free_port

    data = write_dataset(tmp_path / "data", n=4)
    out = tmp_path / "out"
    cfg = make_config("SD_LORA", Path("builtin:tiny-sd"), data, out, train_batch_size=1,
                      max_train_steps=6, save_every_n_steps=2, log_every_n_steps=1)  # fmt: skip
    config = config_file(cfg, tmp_path / "run.yaml")
    command = [sys.executable, "-m", "runner.launch", "--standalone", "--nproc_per_node=2",
               f"--master_port={free_port()}", str(REPO / "tests" / "crash_inject.py"),
               f"{STEP_CRASH}:3:RuntimeError:1", str(config)]  # fmt: skip
    done = subprocess.run(command, env=env(KUBETUNE_WORK_DIR=str(tmp_path / "work")),
                          capture_output=True, text=True, timeout=540)  # fmt: skip
    assert done.returncode == EXIT_FAILURE, done.stderr[-3000:]
    assert "[rank1]: RuntimeError: injected crash (call 3 of StepRunner.run)" in done.stderr
    record = ProgressRecord.from_bytes((out / PROGRESS_KEY).read_bytes())
    assert (record.state, record.exit_code, record.last_checkpoint_step) == ("failed", 1, 2)
    cause = "rank 1 failed: injected crash (call 3 of StepRunner.run)"
    assert record.error == cause, record
    assert f"kubetune: error: {cause}" in done.stderr, done.stderr[-3000:]  # rank 0 prints it
