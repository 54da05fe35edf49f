"""Fixtures for the reliability suite (issue 8).

Everything runs against real components on 127.0.0.1: SeaweedFS (``s3_server`` from
``tests/conftest.py``), the fault proxy, and the in-process fake Kubernetes API server (the
one documented exception to "no fakes"). Figures are printed as ``FIGURE <name>: <text>``
lines (see ``relsupport.figure``) and repeated in the session summary.
"""

from __future__ import annotations

import base64
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from k8s_fake import FakeKube  # noqa: E402
from relsupport import FIGURES  # noqa: E402


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("reliability figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture
def fake_kube(tmp_path: Path) -> Iterator[tuple[FakeKube, Path]]:
    """The fake API server with the S3 credentials Secret, and a kubeconfig for it."""
    with FakeKube() as fake:
        data = {k: base64.b64encode(b"stored-in-secret").decode()
                for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}  # fmt: skip
        fake.create("secrets", "default", {"metadata": {"name": "s3-credentials"}, "data": data})
        yield fake, fake.write_kubeconfig(tmp_path / "kubeconfig")
