"""The pod's multi-process launch (``python -m runner.launch``, torch's torchrun run in
process) exits with the workers' meaningful exit code, which the Job's podFailurePolicy acts
on: 2 (bad config or data) fails the Job at once, 143 (checkpointed on SIGTERM) restarts it
without using up backoffLimit. Bare torchrun exits 1 for both. Real torchrun, gloo, 2 CPU
processes, no fakes."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from dp_support import TORCHRUN, env, free_port
from train_support import config_file, make_config, write_dataset

from kubetune.errors import EXIT_FAILURE, EXIT_PREEMPTED, EXIT_USER_ERROR
from runner.launch import exit_code

pytest_plugins = ["fixtures_models"]
pytestmark = pytest.mark.timeout(600)
LAUNCH = [sys.executable, "-m", "runner.launch"]


def _args(config: Path) -> list[str]:
    return ["--standalone", "--nproc_per_node=2", f"--master_port={free_port()}",
            "-m", "runner", str(config)]  # fmt: skip


def _run(launch: list[str], config: Path) -> subprocess.CompletedProcess[str]:
    cmd = [*launch, *_args(config)]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)


def _sigterm_when(
    cmd: list[str], environ: dict[str, str], ready: Callable[[], bool], bound_s: float, what: str
) -> tuple[int, str]:
    """Start ``cmd``, SIGTERM it once ``ready()`` (as the kubelet stops a pod's PID 1; failing
    with ``what`` if it ends or ``bound_s`` passes first), wait for it: exit code, stderr."""
    agent = subprocess.Popen(cmd, env=environ, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + bound_s
        while not ready():
            assert agent.poll() is None and time.monotonic() < deadline, what
            time.sleep(0.1)
        agent.send_signal(signal.SIGTERM)
        _, stderr = agent.communicate(timeout=180)
    finally:
        agent.kill()
    return agent.returncode, stderr


def test_a_worker_killed_by_a_signal_is_128_plus_the_signal() -> None:
    assert (exit_code(-15), exit_code(-9), exit_code(2), exit_code(143)) == (143, 137, 2, 143)


@pytest.mark.slow
def test_a_config_error_exits_2_where_bare_torchrun_exits_1(tmp_path: Path) -> None:
    """Both workers reject the config (exit 2, one line naming the field): bare torchrun
    exits 1, the launch exits 2 and still prints torchrun's failure table."""
    config = tmp_path / "run.yaml"
    config.write_text("not_a_field: 1\n")
    bare = _run(TORCHRUN, config)
    assert bare.returncode == EXIT_FAILURE, bare.stderr[-3000:]
    assert "kubetune: error:" in bare.stderr, bare.stderr[-3000:]  # the workers did exit 2
    launched = _run(LAUNCH, config)
    assert launched.returncode == EXIT_USER_ERROR, launched.stderr[-3000:]
    assert "kubetune: error:" in launched.stderr and "Root Cause" in launched.stderr
    assert "Traceback" not in launched.stderr, launched.stderr[-3000:]


@pytest.mark.slow
def test_a_non_image_in_the_dataset_exits_2(tmp_path: Path, tiny_sd_dir: Path) -> None:
    """A dataset folder holding a file that is not an image: the workers' data error (exit 2)
    is the pod's exit code (bare torchrun: 1, as the test above shows)."""
    data = write_dataset(tmp_path / "data", n=4)
    (data / "img-2.png").write_bytes(b"not an image at all")
    cfg = make_config("SD_LORA", tiny_sd_dir, data, tmp_path / "out", train_batch_size=1)
    launched = _run(LAUNCH, config_file(cfg, tmp_path / "run.yaml"))
    assert launched.returncode == EXIT_USER_ERROR, launched.stderr[-3000:]
    assert "img-2.png" in launched.stderr, launched.stderr[-3000:]


@pytest.mark.slow
def test_sigterm_to_the_launch_checkpoints_and_exits_143(tmp_path: Path, tiny_sd_dir: Path) -> None:
    """SIGTERM to the launch, as the kubelet sends it to a preempted pod's PID 1: torchrun
    passes it on, both ranks stop after the same step, rank 0 publishes that step's
    checkpoint, and the pod exits 143 (podFailurePolicy: Ignore). Bare torchrun exits 1 here
    (its agent raises SignalException), which would use up backoffLimit."""
    data = write_dataset(tmp_path / "data", n=4)
    out = tmp_path / "out"
    fields = {"train_batch_size": 1, "max_train_steps": 400, "save_every_n_steps": 2}
    config = config_file(
        make_config("SD_LORA", tiny_sd_dir, data, out, **fields), tmp_path / "r.yaml"
    )
    step_2 = out / "checkpoints/step-000002/manifest.json"
    rc, stderr = _sigterm_when([*LAUNCH, *_args(config)], env(), step_2.exists, 240,
                               "no step 2 checkpoint")  # fmt: skip
    assert rc == EXIT_PREEMPTED, stderr[-3000:]
    stopped = re.findall(r"stopped by SIGTERM after step (\d+)", stderr)
    assert len(stopped) == 2 and len(set(stopped)) == 1, stderr[-3000:]
    assert (out / f"checkpoints/step-{int(stopped[0]):06d}/manifest.json").exists()
    assert json.loads((out / "progress.json").read_text())["state"] == "preempted"


STOPPING_WORKER = """
import os, signal, sys, time
from pathlib import Path
here = Path(sys.argv[1]) / os.environ["RANK"]

def stop(*_):
    time.sleep(4)  # a checkpoint that takes a while to publish
    (here / "stopped").write_text("")
    sys.exit(143)

signal.signal(signal.SIGTERM, stop)
here.mkdir()
while True:
    time.sleep(0.1)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("timeout_s", "finished"), [("1", False), ("30", True)])
def test_the_shutdown_timeout_env_bounds_how_long_stopping_workers_get(
    tmp_path: Path, timeout_s: str, finished: bool
) -> None:
    """SIGTERM to the launch: torchrun passes it on and SIGKILLs a worker still stopping after
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT (torch's default: 30 s, shorter than a pod's grace period
    and than a large checkpoint's upload); with enough time both workers finish their 4 s
    stop. The pod exits 143 either way; the manifests set the variable to the grace period."""
    script = tmp_path / "worker.py"
    script.write_text(STOPPING_WORKER)
    cmd = [*LAUNCH, "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)]
    rc, stderr = _sigterm_when(cmd, env(TORCH_ELASTIC_SHUTDOWN_TIMEOUT=timeout_s),
                               lambda: all((tmp_path / r).is_dir() for r in "01"), 120,
                               "workers never started")  # fmt: skip
    assert rc == EXIT_PREEMPTED, stderr[-3000:]
    done = [(tmp_path / r / "stopped").exists() for r in "01"]
    assert done == [finished, finished], stderr[-3000:]
