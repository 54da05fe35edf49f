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


def test_launcher_role_is_least_privilege() -> None:
    role = next(d for d in render(VARIANTS["everything"]) if d["kind"] == "Role")
    rules = {(r["apiGroups"][0], r["resources"][0]): r for r in role["rules"]}
    assert rules[("batch", "jobs")]["verbs"] == ["create", "get", "list", "watch", "delete"]
    assert rules[("", "configmaps")]["verbs"] == ["create", "get", "delete"]
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
