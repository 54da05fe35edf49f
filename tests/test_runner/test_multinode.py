"""Multi-node runtime (issue #23): two torchrun agents on 127.0.0.1 with c10d rendezvous, one
process each, as two pods would run them (``--nnodes 2 --rdzv_backend c10d``; gloo on CPU).
They train, checkpoint and resume; when one agent and its worker are killed (a lost node),
the other exits within the process-group timeout with a one-line message, no checkpoint is
left half-published, and the next start of both resumes from the last published one."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from dp_support import TORCHRUN, children, env, free_port, rank_of
from train_support import config_file, make_config, write_dataset

pytest_plugins = ["fixtures_models"]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _agents(config: Path, *args: str, launch: str = "c10d") -> list[subprocess.Popen[str]]:
    """Two agents (node 0 first: it hosts the rendezvous store). ``c10d``: c10d rendezvous
    on the command line; ``pet``: a bare ``torchrun -m runner CONFIG`` with Kubeflow
    Trainer's PET_* variables (static rendezvous at PET_MASTER_ADDR:PET_MASTER_PORT)."""
    port = free_port()
    agents = []
    for node in (0, 1):
        extra: dict[str, str] = {}
        if launch == "pet":
            launcher = ["--rdzv_conf", "timeout=120"]
            extra = {"PET_NNODES": "2", "PET_NODE_RANK": str(node), "PET_NPROC_PER_NODE": "1",
                     "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}  # fmt: skip
        else:
            launcher = ["--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
                        "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                        "--rdzv_id=kubetune-test"]  # fmt: skip
        cmd = [*TORCHRUN, *launcher, "-m", "runner", str(config), *args]
        agents.append(subprocess.Popen(cmd, env=env(**extra), stderr=subprocess.PIPE, text=True,
                                       start_new_session=True))  # fmt: skip
        time.sleep(1.0 if node == 0 else 0)
    return agents


def _finish(agents: list[subprocess.Popen[str]], timeout: float = 300) -> list[tuple[int, str]]:
    out = []
    try:
        for agent in agents:
            _, err = agent.communicate(timeout=timeout)
            out.append((agent.returncode, err))
    finally:
        for agent in agents:
            _kill_group(agent)
    return out


def _kill_group(agent: subprocess.Popen[str]) -> None:
    """SIGKILL an agent and its workers (torchrun starts each worker in its own session),
    as when a node is lost."""
    if agent.poll() is None:
        for worker in children(agent.pid):
            os.kill(worker, signal.SIGKILL)
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()


def _config(tmp_path: Path, model: Path, **fields: Any) -> tuple[Path, Path]:
    data = write_dataset(tmp_path / "data", n=4)
    out = tmp_path / "out"
    cfg = make_config("SD_LORA", model, data, out, train_batch_size=1,
                      job={"process_group_timeout_minutes": 1}, lease_timeout_seconds=30,
                      **fields)  # fmt: skip
    return config_file(cfg, tmp_path / "run.yaml"), out


def _published(out: Path) -> list[int]:
    """Published steps; every step folder must be complete (its manifest written last)."""
    folders = sorted((out / "checkpoints").iterdir())
    partial = [f.name for f in folders if not (f / "manifest.json").exists()]
    assert partial == [], f"half-published checkpoints: {partial}"
    return [int(f.name.split("-")[1]) for f in folders]


@pytest.mark.parametrize("launch", ["c10d", "pet"])
def test_two_nodes_train_checkpoint_and_resume(
    tmp_path: Path, tiny_sd_dir: Path, launch: str
) -> None:
    """Both launches of docs/kubernetes.md: rank 0 publishes steps 2 and 4; a second start
    of both agents resumes from step 4 (torchrun reads the PET_* variables natively)."""
    config, out = _config(tmp_path, tiny_sd_dir, max_train_steps=4, save_every_n_steps=2)
    results = _finish(_agents(config, launch=launch))
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert _published(out) == [2, 4]
    results = _finish(_agents(config, "--set", "max_train_steps=6", launch=launch))
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:]
    assert any("resumed from checkpoint step-000004" in err for _, err in results)
    assert _published(out) == [2, 4, 6]


def test_a_lost_node_stops_the_other_and_the_rerun_resumes(
    tmp_path: Path, tiny_sd_dir: Path
) -> None:
    config, out = _config(tmp_path, tiny_sd_dir, max_train_steps=400, save_every_n_steps=2)
    agents = _agents(config)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints/step-000002/manifest.json").exists():
            assert all(a.poll() is None for a in agents), "an agent ended early"
            assert time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.2)
        ranks = {rank_of(w): agent for agent in agents for w in children(agent.pid)}
        lost, survivor = ranks[1], ranks[0]  # rank 1's node goes: rank 0 stays to report
        killed = time.monotonic()
        _kill_group(lost)
        _, err = survivor.communicate(timeout=180)
        took = time.monotonic() - killed
    finally:
        for agent in agents:
            _kill_group(agent)
    assert survivor.returncode != 0
    assert took < 90, f"the survivor took {took:.0f} s"
    assert "kubetune: error: lost contact with the other processes" in err, err[-3000:]
    steps = _published(out)
    assert steps and steps[0] == 2
    results = _finish(_agents(config, "--set", f"max_train_steps={steps[-1] + 2}"))
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:]
    assert any(f"resumed from checkpoint step-{steps[-1]:06d}" in e for _, e in results)
