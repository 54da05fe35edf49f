"""The `-m cluster` tier without a cluster: skipped with the reason and the way to get one,
or (KUBETUNE_CLUSTER_REQUIRED=1, as in CI) a failure, never a silent pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _run_tier(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "PYTEST_ADDOPTS")}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "cluster",
            "-rs",
            "-q",
            "tests/cluster/test_cluster_rbac.py",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**clean, **env},
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def test_without_a_cluster_the_tier_skips_and_says_why() -> None:
    result = _run_tier(KUBECONFIG="")
    assert result.returncode == 0, result.stdout[-2000:]
    assert "1 skipped" in result.stdout
    assert "KUBECONFIG is not set" in result.stdout and "local-cluster.sh up" in result.stdout


@pytest.mark.slow
def test_when_required_a_missing_cluster_fails() -> None:
    result = _run_tier(KUBECONFIG="", KUBETUNE_CLUSTER_REQUIRED="1")
    assert result.returncode == 1, result.stdout[-2000:]
    assert "cluster tier required, but KUBECONFIG is not set" in result.stdout


@pytest.mark.slow
def test_the_default_run_says_the_tier_was_not_run() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--co", "-q", "tests/cluster/test_cluster_rbac.py"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert "cluster tier: not run (needs root, docker and a local Kubernetes" in result.stdout


def test_run_tier_without_root_skips_and_says_why() -> None:
    """The README's newcomer (no root, no docker) gets a message, not a failure; as root the
    script has no skip path at all. Run as `nobody` when the tests run as root."""
    command = ["bash", str(ROOT / "tests" / "cluster" / "run-tier.sh")]
    if os.geteuid() == 0:
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=60, check=False, cwd="/"
    )
    assert result.returncode == 0, result.stderr
    assert "cluster tier: skipped: it needs root" in result.stderr
    assert "docs/kubernetes.md" in result.stderr
