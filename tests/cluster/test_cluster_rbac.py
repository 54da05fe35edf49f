"""The chart on a real API server (`pytest -m cluster`): its rendered objects apply, and a
launcher authenticated as a ServiceAccount bound by the chart's Role (RBAC enforced by the
real kube-apiserver) can submit / status / logs / list / cancel, and nothing more."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_env import Cluster, wait_until
from kube_configs import config_dict

from kubetune.config import parse_config
from kubetune.errors import ClusterError
from launcher.backends.k8s_client import api_errors
from launcher.backends.kubernetes import KubernetesBackend

pytestmark = pytest.mark.cluster
helm_python = pytest.importorskip("helm_python")
CHART = Path(__file__).parents[2] / "charts" / "kubetune"
LAUNCHER_SA = "kubetune-launcher"


def _apply_chart(cluster: Cluster, ns: str) -> list[str]:
    from kubernetes import utils

    subjects = [{"kind": "ServiceAccount", "name": LAUNCHER_SA, "namespace": ns}]
    files = helm_python.Chart.load(str(CHART)).render(
        values={"launcher": {"rbac": {"subjects": subjects}}}, name="kt", namespace=ns
    )
    kinds = []
    for path, text in sorted(files.items()):
        for doc in (d for d in yaml.safe_load_all(text) if d) if path.endswith(".yaml") else ():
            utils.create_from_dict(cluster.api, doc, namespace=ns)
            kinds.append(doc["kind"])
    return kinds


def _token_kubeconfig(cluster: Cluster, ns: str, path: Path) -> str:
    """A kubeconfig that authenticates as the launcher ServiceAccount (a token Secret)."""
    cluster.core.create_namespaced_service_account(ns, {"metadata": {"name": LAUNCHER_SA}})
    cluster.core.create_namespaced_secret(
        ns,
        {
            "metadata": {
                "name": f"{LAUNCHER_SA}-token",
                "annotations": {"kubernetes.io/service-account.name": LAUNCHER_SA},
            },
            "type": "kubernetes.io/service-account-token",
        },
    )

    def token() -> str | None:
        data = cluster.core.read_namespaced_secret(f"{LAUNCHER_SA}-token", ns).data or {}
        return base64.b64decode(data["token"]).decode() if "token" in data else None

    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    server = admin["clusters"][0]["cluster"]
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": server}],
        "users": [{"name": LAUNCHER_SA, "user": {"token": wait_until(token, 60, "the SA token")}}],
        "contexts": [
            {"name": "c", "context": {"cluster": "c", "user": LAUNCHER_SA, "namespace": ns}}
        ],
        "current-context": "c",
    }
    path.write_text(yaml.safe_dump(kubeconfig))
    return str(path)


def _refused(call: Any, *args: Any) -> str:
    with pytest.raises(ClusterError) as err, api_errors("trying"):
        call(*args)
    return str(err.value)


def test_chart_rbac_allows_the_launcher_and_nothing_more(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    from kubernetes import client, config

    kinds = _apply_chart(cluster, namespace)
    assert {"ServiceAccount", "Role", "RoleBinding"} <= set(kinds)
    data = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    cluster.core.create_namespaced_secret(
        namespace,
        {"metadata": {"name": "s3-credentials"}, "stringData": data},
    )
    kubeconfig = _token_kubeconfig(cluster, namespace, tmp_path / "launcher.kubeconfig")
    backend = KubernetesBackend(kubeconfig=kubeconfig)
    assert backend.namespace == namespace
    raw = config_dict(
        name="rbac-run", image=cluster.image, image_pull_policy="Never", gpus=0, cpu="100m"
    )
    raw["storage"]["endpoint_url"] = "http://127.0.0.1:9"  # nothing listens: a quick refusal
    cfg = parse_config(yaml.safe_dump(raw))
    assert backend.submit(cfg).created
    assert backend.status("rbac-run").job_name.startswith("rbac-run-")
    assert [r.run for r in backend.list()] == ["rbac-run"]
    wait_until(lambda: backend.status("rbac-run").pods, 60, "the run's pod")
    list(backend.logs("rbac-run"))  # pods list + pods/log get (a pending pod has no log yet)
    assert backend.cancel("rbac-run", wait=True, timeout=180).phase == "Cancelled"

    api = config.new_client_from_config(config_file=kubeconfig)
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    for message in (
        _refused(core.list_namespaced_secret, namespace),
        _refused(core.create_namespaced_pod, namespace, {"metadata": {"name": "x"}}),
        _refused(batch.patch_namespaced_job, "rbac-run", namespace, {"spec": {}}),
        _refused(core.list_namespaced_config_map, namespace),
        _refused(core.list_namespaced_pod, "kube-system"),
    ):
        assert "forbidden" in message and "\n" not in message
