"""The Job's storage credentials and settings per cloud: Secret keys become the provider's
own variables (as secretKeyRefs only), workload identity adds nothing but the ServiceAccount
(and, for Azure, the webhook's pod label), and the schema refuses what cannot work."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from kube_configs import VARIANTS, config_dict, with_storage

from kubetune.config import output_uri, parse_config
from kubetune.errors import ConfigError
from launcher.manifests import build_manifests


def _pod(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod template metadata, container) of a variant's Job."""
    job = build_manifests(parse_config(yaml.safe_dump(VARIANTS[name])))[-1]
    template = job["spec"]["template"]
    return template["metadata"], template["spec"]["containers"][0]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize(
    ("variant", "secret_vars", "plain_vars", "scheme"),
    [
        ("sd-lora-defaults", {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
         {"AWS_ENDPOINT_URL": "http://minio.kubetune:9000", "AWS_REGION": "us-east-1"}, "s3"),
        ("sd-lora-gcs-secret", {"GOOGLE_SERVICE_ACCOUNT_KEY"}, {}, "gs"),
        ("sd-lora-azure-secret", {"AZURE_STORAGE_ACCOUNT_KEY"},
         {"AZURE_STORAGE_ACCOUNT_NAME": "kubetunedata"}, "az"),
    ],
)  # fmt: skip
def test_a_secret_becomes_the_providers_variables(
    variant: str, secret_vars: set[str], plain_vars: dict[str, str], scheme: str
) -> None:
    _, container = _pod(variant)
    env = _env(container)
    refs = {k for k, v in env.items() if isinstance(v, dict) and "secretKeyRef" in v}
    assert refs - {"HF_TOKEN"} == secret_vars
    for name, value in plain_vars.items():
        assert env[name] == value
    other = {"AWS_ACCESS_KEY_ID", "GOOGLE_SERVICE_ACCOUNT_KEY", "AZURE_STORAGE_ACCOUNT_KEY"}
    assert not (other - secret_vars) & set(env)  # no other cloud's credentials
    cfg = parse_config(yaml.safe_dump(VARIANTS[variant]))
    assert output_uri(cfg) == f"{scheme}://kubetune/kubetune/my-run"


@pytest.mark.parametrize(
    "variant", ["sd-lora-eks-irsa", "sd-lora-gke-workload-identity",
                "sd-lora-azure-workload-identity"],
)  # fmt: skip
def test_workload_identity_uses_the_service_account_and_no_secret(variant: str) -> None:
    meta, container = _pod(variant)
    job = build_manifests(parse_config(yaml.safe_dump(VARIANTS[variant])))[-1]
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "kubetune-runner"
    env = _env(container)
    assert not [k for k, v in env.items() if isinstance(v, dict) and k != "HF_TOKEN"]
    azure = "azure" in variant
    assert (meta["labels"].get("azure.workload.identity/use") == "true") is azure


def _problems(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(data))
    return str(info.value)


def test_the_schema_refuses_storage_settings_that_cannot_work() -> None:
    azure = {"provider": "azure", "bucket": "kubetune"}
    assert "storage.account_name" in _problems(with_storage(config_dict(), **azure))
    gcs_account = {"provider": "gcs", "bucket": "kubetune", "account_name": "x"}
    assert "only for provider: azure" in _problems(with_storage(config_dict(), **gcs_account))
    both = {"bucket": "kubetune", "workload_identity": True,
            "credentials_secret": {"name": "s3-credentials"}}  # fmt: skip
    assert "storage.workload_identity" in _problems(
        with_storage(config_dict(service_account="sa"), **both)
    )
    no_sa = {"bucket": "kubetune", "workload_identity": True}
    assert "job.service_account" in _problems(with_storage(config_dict(), **no_sa))
    literal = {"provider": "azure", "bucket": "kubetune", "account_name": "a",
               "account_key": "c2VjcmV0"}  # fmt: skip
    assert "credentials never go in the config" in _problems(with_storage(config_dict(), **literal))
