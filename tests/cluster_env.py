"""pytest plugin for the `-m cluster` tier: a real Kubernetes API server with a node that
has the image `kubetune:local` (`tests/cluster/local-cluster.sh up` and `image`), reached
through $KUBECONFIG.

Without a cluster the tier skips and says why; with KUBETUNE_CLUSTER_REQUIRED=1 (CI) a
missing cluster or image is a failure instead, so a broken machine never reads as a pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parent.parent
SCRIPT = "tests/cluster/local-cluster.sh"
HOW = f"as root: `{SCRIPT} up` (prints KUBECONFIG=...) and `{SCRIPT} image`; see docs/kubernetes.md"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Say at the end of a default run that the cluster tier was not run, and how to run it."""
    markexpr = config.getoption("markexpr", "") or ""
    if "not cluster" in markexpr or "cluster" not in markexpr:
        terminalreporter.write_line(
            "cluster tier: not run (needs root, docker and a local Kubernetes: "
            f"{HOW}; then pytest -m cluster)"
        )


def unavailable(reason: str) -> None:
    """Skip, or fail when the tier is required (CI)."""
    if os.environ.get("KUBETUNE_CLUSTER_REQUIRED") == "1":
        pytest.fail(f"cluster tier required, but {reason}", pytrace=False)
    pytest.skip(f"{reason} ({HOW})")


@dataclass
class Cluster:
    """A reachable cluster: clients, its version and the test image."""

    kubeconfig: str
    api: Any
    core: Any
    batch: Any
    version: tuple[int, int]
    image: str

    def launcher(self, *args: str, timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess:
        """Run the real `launcher` CLI in a subprocess, as a user would."""
        env = {**os.environ, "KUBECONFIG": self.kubeconfig, **kw.pop("env", {})}
        return subprocess.run(
            [sys.executable, "-m", "launcher", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=ROOT,
            check=False,
            **kw,
        )

    def launcher_bg(self, *args: str, out: Path) -> subprocess.Popen:
        """`launcher` in the background: stdout to `out`, stderr to `out` + `.err`."""
        env = {**os.environ, "KUBECONFIG": self.kubeconfig}
        with open(out, "w") as sink, open(f"{out}.err", "w") as errors:
            return subprocess.Popen(
                [sys.executable, "-m", "launcher", *args],
                stdout=sink,
                stderr=errors,
                env=env,
                cwd=ROOT,
            )


IMAGE_LIST_WAIT_S = 120
"""The kubelet reports a node's images from a cache it refreshes every 30 s or so: an image
built a moment before the tests may not be listed yet."""


def _node_has_image(core: Any, nodes: list[Any], image: str) -> bool:
    deadline = time.monotonic() + IMAGE_LIST_WAIT_S
    while True:
        names = {n for node in nodes for img in node.status.images or [] for n in img.names or []}
        if any(n == image or n.endswith(f"/{image}") for n in names):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(5)
        nodes = core.list_node().items


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    from kubernetes import client, config

    from launcher.backends.k8s_features import parse_version

    kubeconfig = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    if not kubeconfig:
        unavailable("KUBECONFIG is not set")
    try:
        api = config.new_client_from_config(config_file=kubeconfig)
        info = client.VersionApi(api).get_code()
        nodes = client.CoreV1Api(api).list_node().items
    except Exception as err:  # noqa: BLE001 - any failure means: no usable cluster
        unavailable(f"the cluster in {kubeconfig} does not answer ({str(err).splitlines()[0]})")
    image = os.environ.get("KUBETUNE_TEST_IMAGE", "kubetune:local")
    if not _node_has_image(client.CoreV1Api(api), nodes, image):
        unavailable(f"no node has the image {image}")
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    return Cluster(kubeconfig, api, core, batch, parse_version(info.major, info.minor), image)


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace (with its default ServiceAccount), deleted afterwards."""
    name = f"kubetune-e2e-{uuid.uuid4().hex[:6]}"
    cluster.core.create_namespace({"metadata": {"name": name}})
    wait_until(
        lambda: default_account_ready(cluster, name),
        60,
        f"the default ServiceAccount of {name} (and, before 1.24, its token)",
        interval=0.5,
    )
    try:
        yield name
    finally:
        cluster.core.delete_namespace(name)


def default_account_ready(cluster: Cluster, namespace: str) -> bool:
    """The namespace's default ServiceAccount exists and, before Kubernetes 1.24, has its token
    Secret: until the token controller adds it, the API server refuses pods with a 500 ("No API
    token found for service account"), which a fresh namespace met in one CI run."""
    accounts = cluster.core.list_namespaced_service_account(namespace).items
    default = next((a for a in accounts if a.metadata.name == "default"), None)
    if default is None:
        return False
    return cluster.version >= (1, 24) or bool(default.secrets)


def wait_until(check: Any, timeout: float, what: str, interval: float = 1.0) -> Any:
    """Poll `check()` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
