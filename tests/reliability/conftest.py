"""Fixtures and helpers for the reliability suite (issue 8).

Everything runs against real components on 127.0.0.1: SeaweedFS (``s3_server`` from
``tests/conftest.py``), the fault proxy, and the in-process fake Kubernetes API server (the
one documented exception to "no fakes"). Figures are printed as ``FIGURE <name>: <text>``
lines and collected into ``figures.txt`` under the session's temp dir.
"""

from __future__ import annotations

import base64
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))

from k8s_fake import FakeKube  # noqa: E402

FIGURES: list[str] = []


def figure(name: str, text: str) -> None:
    """Print one figure line (shown with ``-s``; also summarised at the end of the session)."""
    line = f"FIGURE {name}: {text}"
    FIGURES.append(line)
    print(line, flush=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("reliability figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


def closed_port() -> int:
    """A 127.0.0.1 port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runner_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a ``python -m runner`` subprocess (offline, repo on the path).
    Values of ``""`` in ``extra`` remove the variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO),
               TOKENIZERS_PARALLELISM="false")  # fmt: skip
    for key, value in (extra or {}).items():
        if value == "":
            env.pop(key, None)
        else:
            env[key] = value
    return env


@pytest.fixture
def fake_kube(tmp_path: Path) -> Iterator[tuple[FakeKube, Path]]:
    """The fake API server with the S3 credentials Secret, and a kubeconfig for it."""
    with FakeKube() as fake:
        data = {k: base64.b64encode(b"stored-in-secret").decode()
                for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}  # fmt: skip
        fake.create("secrets", "default", {"metadata": {"name": "s3-credentials"}, "data": data})
        yield fake, fake.write_kubeconfig(tmp_path / "kubeconfig")
