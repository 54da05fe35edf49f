"""charts/kubetune rendered offline (helm_python, the Helm Go SDK) for several values
variants; every object schema-validated (1.31, strict) and checked for restricted pods."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_checks import KUBE_VERSION, leaked, restricted_problems, validate_strict

helm_python = pytest.importorskip("helm_python")

CHART = Path(__file__).parents[2] / "charts" / "kubetune"
SECRET = "minio-secret-value-not-elsewhere"
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "everything": {
        "launcher": {
            "rbac": {
                "subjects": [
                    {
                        "kind": "User",
                        "name": "alice@example.com",
                        "apiGroup": "rbac.authorization.k8s.io",
                    },
                    {"kind": "ServiceAccount", "name": "ci", "namespace": "ci"},
                ],
                "secretNames": ["s3-credentials", "hf"],
            }
        },
        "s3Credentials": {"create": True, "accessKeyId": "minio-admin", "secretAccessKey": SECRET},
        "minio": {"enabled": True},
    },
    "ui": {"ui": {"enabled": True}},
    "nothing": {
        "runner": {"serviceAccount": {"create": False}},
        "launcher": {"rbac": {"create": False}},
    },
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    chart = helm_python.Chart.load(str(CHART))
    files = chart.render(values=values, name="kt", namespace="ml")
    docs = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_chart_renders_valid_restricted_objects(variant: str) -> None:
    docs = render(VARIANTS[variant])
    for doc in docs:
        validate_strict(doc)
        assert restricted_problems(doc) == [], (variant, doc["kind"])
        assert doc["metadata"]["namespace"] == "ml"
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "kubetune"
    not_secrets = [d for d in docs if d["kind"] != "Secret"]
    assert leaked(not_secrets, [SECRET]) == []


def test_chart_objects_per_variant() -> None:
    kinds = {v: sorted(d["kind"] for d in render(VARIANTS[v])) for v in VARIANTS}
    assert kinds["defaults"] == ["Role", "ServiceAccount"]
    assert kinds["everything"] == [
        "Deployment",
        "Job",
        "Role",
        "RoleBinding",
        "Secret",
        "Service",
        "ServiceAccount",
    ]
    assert kinds["nothing"] == []
    assert kinds["ui"] == [
        "Deployment",
        "Role",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "ServiceAccount",
    ]


def test_ui_is_loopback_free_only_with_a_token_and_least_privilege() -> None:
    """The chart's `launcher ui`: its token from a Secret (it binds beyond loopback), and a
    ServiceAccount that may touch only Jobs, ConfigMaps and pod logs (no Secrets)."""
    docs = render(VARIANTS["ui"])
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["launcher"] and container["args"][:3] == [
        "ui",
        "--host",
        "0.0.0.0",
    ]
    assert "--cluster-only" in container["args"]  # the UI pod trains nothing itself
    token = next(e for e in container["env"] if e["name"] == "KUBETUNE_UI_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "kubetune-ui-token", "key": "token"}
    assert pod["serviceAccountName"] == "kubetune-ui"
    role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "kt-ui")
    rules = {(r["apiGroups"][0], r["resources"][0]): r["verbs"] for r in role["rules"]}
    assert set(rules) == {
        ("batch", "jobs"),
        ("", "configmaps"),
        ("", "pods"),
        ("", "pods/log"),
        ("", "events"),
    }
    assert rules[("", "pods")] == ["get", "list", "watch"] and rules[("", "events")] == ["list"]
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kubetune-ui", "namespace": "ml"}
    ]
    service = next(d for d in docs if d["kind"] == "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert "ui" not in [d["metadata"].get("labels", {}).get("app.kubernetes.io/component")
                        for d in render({})]  # fmt: skip


def test_launcher_role_is_least_privilege() -> None:
    role = next(d for d in render(VARIANTS["everything"]) if d["kind"] == "Role")
    rules = {(r["apiGroups"][0], r["resources"][0]): r for r in role["rules"]}
    assert rules[("batch", "jobs")]["verbs"] == ["create", "get", "list", "watch", "delete"]
    assert rules[("", "configmaps")]["verbs"] == ["create", "get", "delete"]
    assert rules[("", "services")]["verbs"] == ["create", "delete"]  # a headless Service
    for group, plural in (("jobset.x-k8s.io", "jobsets"), ("trainer.kubeflow.org", "trainjobs")):
        assert rules[(group, plural)]["verbs"] == ["create", "get", "list", "watch", "delete"]
    assert rules[("", "pods/log")]["verbs"] == ["get"]
    assert rules[("", "secrets")] == {
        "apiGroups": [""],
        "resources": ["secrets"],
        "verbs": ["get"],
        "resourceNames": ["s3-credentials", "hf"],
    }
    assert not any("*" in r["verbs"] or "*" in r["resources"] for r in role["rules"])


def test_runner_service_account_has_no_token() -> None:
    sa = next(d for d in render({}) if d["kind"] == "ServiceAccount")
    assert sa["metadata"]["name"] == "kubetune-runner"
    assert sa["automountServiceAccountToken"] is False
    assert "annotations" not in sa["metadata"]


def test_runner_service_account_carries_the_workload_identity_annotation() -> None:
    """IRSA / GKE / Azure Workload Identity bind the cloud identity through an annotation;
    the token stays unmounted (their webhooks project their own token volume)."""
    role = {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/kubetune"}
    values = {"runner": {"serviceAccount": {"annotations": role}}}
    sa = next(d for d in render(values) if d["kind"] == "ServiceAccount")
    assert sa["metadata"]["annotations"] == role and sa["automountServiceAccountToken"] is False


def test_schema_rejects_bad_values() -> None:
    with pytest.raises(helm_python.HelmError):
        render({"minio": {"enabled": True, "image": "quay.io/minio/minio:latest"}})
    with pytest.raises(helm_python.HelmError):
        render({"minio": {"enabeld": True}})
    with pytest.raises(helm_python.HelmError, match="secretAccessKey is required"):
        render({"s3Credentials": {"create": True, "accessKeyId": "x"}})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint_strict(variant: str) -> None:
    report = helm_python.lint(
        str(CHART),
        VARIANTS[variant],
        strict=True,
        namespace="ml",
        kube_version=f"v{KUBE_VERSION}.0",
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert problems == [], problems
