"""Helpers for the data-parallel tests: ``python -m runner`` and ``torchrun`` (gloo, CPU) in
subprocesses, as a pod runs them (``train_support.checkpoint_weights`` reads what they publish)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
THRESHOLD_SITE = """
import os
import kubetune.dataset.preflight as checks

checks.DEFERRED_CHECKS_MIN_EXAMPLES = int(os.environ["DEFERRED_MIN"])
"""
"""The start of a ``sitecustomize`` that lowers (or raises) the deferred header checks'
threshold in every process of a run to ``DEFERRED_MIN`` (see ``deferred_min``); what follows
it may use ``os`` and ``checks``."""
_STORE_RECORDER = """
import os
from kubetune.storage import LocalStore

def _recorded(name):
    original = getattr(LocalStore, name)
    def wrapper(self, key, *args, **kwargs):
        keys = [key] if isinstance(key, str) else list(key)
        with open(os.environ["LOG_VARIABLE"], "a") as log:
            for one in keys:
                log.write(f"{os.environ.get('RANK', 'single')} {name} {one}\\n")
        return original(self, key if isinstance(key, str) else keys, *args, **kwargs)
    setattr(LocalStore, name, wrapper)

for _name in ("_atomic_write", "delete", "create", "replace_if", "delete_if"):
    _recorded(_name)
"""


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


def deferred_min(deferred: bool) -> dict[str, str]:
    """``THRESHOLD_SITE``'s variable: 2 examples count as large (header checks beside
    training) when ``deferred``, else 10,000 (checked before training)."""
    return {"DEFERRED_MIN": "2" if deferred else "10000"}


def store_recorder(log_variable: str) -> str:
    """``sitecustomize`` lines that append every write to a ``LocalStore`` as ``RANK METHOD
    KEY`` to the file the environment variable ``log_variable`` names (``single`` outside
    torchrun); the store works as ever."""
    return _STORE_RECORDER.replace("LOG_VARIABLE", log_variable)


def site_folder(folder: Path, *parts: str) -> Path:
    """``folder`` holding a ``sitecustomize.py`` of ``parts`` in order (``env(first=folder)``
    puts it on the workers' ``PYTHONPATH``)."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text("".join(parts))
    return folder


def finish(proc: subprocess.Popen[str], bound_s: float, what: str) -> str:
    """``proc``'s stderr once it ends; past ``bound_s`` its process group (started with
    ``start_new_session``) is killed and the test fails: ``what`` hangs."""
    try:
        _, err = proc.communicate(timeout=bound_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{what} did not end within {bound_s} s (a process hangs)")
    return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def single(
    config: Path, *args: str, timeout: float = 240, first: Path | None = None, **extra: str
) -> subprocess.CompletedProcess[str]:
    """``python -m runner CONFIG ARGS`` to the end (``extra``: more environment)."""
    cmd = [sys.executable, "-m", "runner", str(config), *args]
    return subprocess.run(
        cmd, env=env(first, **extra), capture_output=True, text=True, timeout=timeout
    )


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


@dataclass
class RankRun:
    """A ``torchrun`` that ended: its exit code, the agent's stderr, each rank's stderr."""

    rc: int
    agent: str
    ranks: dict[int, str]

    def everything(self) -> str:
        """The tails of every log, for an assertion's message."""
        return self.agent[-3000:] + "".join(f"\n--- rank {r}\n{t[-3000:]}" for r, t in
                                            sorted(self.ranks.items()))  # fmt: skip


def torchrun_logged(
    config: Path, *args: str, logs: Path, first: Path | None = None, bound: float = 240,
    nproc: int = 2, meanwhile: Callable[[subprocess.Popen[str]], None] | None = None,
    **extra: str,
) -> RankRun:  # fmt: skip
    """``torchrun_cmd`` with each rank's stderr in its own file under ``logs``, killed (and the
    test failed) if it has not ended within ``bound`` seconds: a rank that hangs.
    ``meanwhile``: called with the running agent (e.g. to signal a worker)."""
    cmd = torchrun_cmd(config, *args, nproc=nproc)
    at = cmd.index("-m", len(TORCHRUN))  # torchrun's own options go before `-m runner`
    cmd[at:at] = ["--log-dir", str(logs), "--redirects", "2"]
    agent = subprocess.Popen(cmd, env=env(first, **extra), stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # fmt: skip
    if meanwhile is not None:
        try:
            meanwhile(agent)
        except BaseException:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.communicate()
            raise
    stderr = finish(agent, bound, f"the {nproc}-process run")
    ranks = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    return RankRun(agent.returncode, stderr, ranks)


def wait_for(path: Path, agent: subprocess.Popen[str], limit: float = 240) -> None:
    """Until ``path`` exists; fails if ``agent`` ends first or ``limit`` seconds pass."""
    deadline = time.monotonic() + limit
    while not path.exists():
        assert agent.poll() is None, f"the run ended before {path} appeared"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def error_lines(text: str) -> list[str]:
    """The ``kubetune: error:`` lines a process printed."""
    return [line for line in text.splitlines() if line.startswith("kubetune: error:")]


def same_error_everywhere(run: RankRun, code: int, says: str, nproc: int = 2) -> str:
    """Every rank printed the same one ``kubetune: error:`` line, naming ``says`` (no lost peer,
    no traceback), and torchrun's root cause is exit ``code`` (a rank it reports stopped by
    SIGTERM had printed that line already: torchrun stops the others as soon as one exits).
    The line."""
    assert set(run.ranks) == set(range(nproc)), run.everything()
    lines = {rank: error_lines(text) for rank, text in run.ranks.items()}
    for rank, text in run.ranks.items():
        assert "lost contact" not in text and "Traceback" not in text, (rank, run.everything())
        assert len(lines[rank]) == 1 and says in lines[rank][0], (rank, run.everything())
    assert len({tuple(found) for found in lines.values()}) == 1, lines
    root = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", run.agent, re.S)
    assert root is not None and root.group(1) == str(code), run.everything()
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", run.agent)
    assert set(codes) <= {str(code), "-15"}, run.everything()
    return lines[0][0]
