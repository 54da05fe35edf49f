"""kubetune's `storage:` section: the bucket for datasets and outputs (S3 or any
S3-compatible server, GCS, Azure Blob), and the Secret holding its credentials."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import field_validator, model_validator

from kubetune.config.base import ConfigModel, FieldProblems

# Storage keys that hold secrets: they must come from a Kubernetes Secret.
LITERAL_CREDENTIAL_KEYS = {
    "access_key",
    "access_key_id",
    "aws_access_key_id",
    "secret_key",
    "secret_access_key",
    "aws_secret_access_key",
    "session_token",
    "aws_session_token",
    "password",
    "token",
    "account_key",
    "sas_token",
    "service_account_key",
    "private_key",
}


def _secret_hint(section: str) -> str:
    return (
        f"credentials never go in the config: create a Secret with `kubectl create secret "
        f"generic s3-credentials --from-literal=AWS_ACCESS_KEY_ID=... "
        f"--from-literal=AWS_SECRET_ACCESS_KEY=...` and set {section}.credentials_secret.name"
        f": s3-credentials (locally, export AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    )


class CredentialsSecretRef(ConfigModel):
    """The Kubernetes Secret holding the storage credentials: the S3 access key pair, the GCS
    service-account key (JSON) or the Azure storage account key, by `storage.provider`."""

    name: str
    """The Secret's name, e.g. `s3-credentials`."""
    access_key_id_key: str = "AWS_ACCESS_KEY_ID"
    """S3: key of the access key id inside the Secret."""
    secret_access_key_key: str = "AWS_SECRET_ACCESS_KEY"
    """S3: key of the secret access key inside the Secret."""
    service_account_key_key: str = "GOOGLE_SERVICE_ACCOUNT_KEY"
    """GCS (kubetune extension): key of the service-account key JSON inside the Secret (given
    to the pod as `GOOGLE_SERVICE_ACCOUNT_KEY`)."""
    account_key_key: str = "AZURE_STORAGE_ACCOUNT_KEY"
    """Azure (kubetune extension): key of the storage account key inside the Secret (given to
    the pod as `AZURE_STORAGE_ACCOUNT_KEY`)."""


class StorageConfig(ConfigModel):
    """Object storage for datasets and outputs: S3 or any S3-compatible server, Google Cloud
    Storage or Azure Blob Storage (`provider`)."""

    provider: Literal["s3", "gcs", "azure"] = "s3"
    """kubetune extension: the cloud of `bucket`, and so the outputs' URI scheme (`s3://`,
    `gs://`, `az://`). These settings apply to that cloud's URIs only; a dataset on another
    cloud uses that cloud's environment (e.g. `GOOGLE_*`, `AZURE_STORAGE_*`)."""
    endpoint_url: str | None = None
    """Endpoint override, e.g. `http://minio.kubetune:9000` (S3), an emulator's URL (GCS), or
    `http://azurite:10000/devstoreaccount1` (Azure). Default: the cloud's own (S3: AWS or
    $AWS_ENDPOINT_URL)."""
    bucket: str
    """Bucket (Azure: container) that receives the run's outputs under `<prefix>/<run name>/`."""
    account_name: str | None = None
    """kubetune extension, Azure only (required there): the storage account holding the
    container."""
    workload_identity: bool = False
    """kubetune extension: credentials come from the pod's ServiceAccount (`job.service_account`)
    instead of a Secret: EKS IRSA (the ServiceAccount annotated with
    `eks.amazonaws.com/role-arn`), GKE Workload Identity (`iam.gke.io/gcp-service-account`) or
    Azure Workload Identity (`azure.workload.identity/client-id`; the Job's pod gets the
    `azure.workload.identity/use: "true"` label). Not with `credentials_secret`."""
    prefix: str = "kubetune"
    """Key prefix inside the bucket for all runs."""
    region: str | None = None
    """S3: region name (many S3-compatible servers accept any, e.g. us-east-1)."""
    addressing_style: Literal["auto", "path", "virtual"] = "path"
    """S3: bucket addressing: `path` suits most self-hosted servers, `virtual` suits AWS."""
    verify_tls: bool = True
    """Verify the endpoint's TLS certificate."""
    credentials_secret: CredentialsSecretRef | None = None
    """Kubernetes Secret with the credentials (injected as environment variables; which keys
    by `provider`)."""

    @model_validator(mode="after")
    def _provider_fields(self) -> StorageConfig:
        problems = []
        if self.provider == "azure" and not self.account_name:
            problems.append(("account_name", "required with provider: azure (the storage account)"))
        if self.provider != "azure" and self.account_name:
            problems.append(("account_name", "only for provider: azure"))
        if self.workload_identity and self.credentials_secret is not None:
            problems.append(
                ("workload_identity", "use either workload_identity or credentials_secret")
            )
        if problems:
            raise FieldProblems(problems)
        return self

    @model_validator(mode="before")
    @classmethod
    def _reject_literal_credentials(cls, data: Any) -> Any:
        if isinstance(data, dict):
            literal = sorted(k for k in data if str(k).lower() in LITERAL_CREDENTIAL_KEYS)
            if literal:
                raise FieldProblems([(key, _secret_hint("storage")) for key in literal])
        return data

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", value):
            raise ValueError(
                f"{value!r} is not a valid bucket name (3-63 lower-case letters, "
                "digits, '.' and '-')"
            )
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.strip("/")
        if ".." in value.split("/"):
            raise ValueError("must not contain '..' segments")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} must be an http(s):// URL, e.g. http://127.0.0.1:8333")
        if value is not None and re.match(r"^https?://[^/]*@", value):
            raise ValueError("must not embed credentials; " + _secret_hint("storage"))
        return value
