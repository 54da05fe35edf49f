"""Helpers for the data-parallel tests: ``python -m runner`` and ``torchrun`` (gloo, CPU) in
subprocesses, as a pod runs them (``train_support.checkpoint_weights`` reads what they publish)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def env(first: Path | None = None, **extra: str) -> dict[str, str]:
    """The subprocess environment: ``first`` (e.g. a test's ``sitecustomize``), then this
    checkout, one thread per process, offline."""
    out = dict(os.environ)
    paths = [str(first or ""), str(REPO), str(REPO / "tests"), out.get("PYTHONPATH", "")]
    out.update(
        PYTHONPATH=os.pathsep.join(p for p in paths if p),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        KUBETUNE_LOG_LEVEL="INFO",
    )
    out.update(extra)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def single(
    config: Path, *args: str, timeout: float = 240, first: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m runner CONFIG ARGS`` to the end."""
    cmd = [sys.executable, "-m", "runner", str(config), *args]
    return subprocess.run(cmd, env=env(first), capture_output=True, text=True, timeout=timeout)


def torchrun_cmd(config: Path, *args: str, nproc: int = 2) -> list[str]:
    port = str(free_port())
    return [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", f"--master_port={port}",
            "-m", "runner", str(config), *args]  # fmt: skip


def torchrun(
    config: Path, *args: str, nproc: int = 2, timeout: float = 300, first: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node NPROC -m runner CONFIG ARGS`` to the end."""
    cmd = torchrun_cmd(config, *args, nproc=nproc)
    return subprocess.run(cmd, env=env(first), capture_output=True, text=True, timeout=timeout)


def children(pid: int) -> list[int]:
    """The direct child processes of ``pid`` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def rank_of(pid: int) -> int | None:
    """The RANK in a process's environment (torchrun sets it for each worker)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    ranks = [int(v.split(b"=", 1)[1]) for v in raw if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
