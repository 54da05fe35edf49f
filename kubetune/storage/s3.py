"""``s3://bucket/prefix`` on AWS or any S3-compatible server (SeaweedFS, MinIO, Ceph, R2),
through obstore's ``S3Store``.

Settings come from ``StorageConfig`` (``endpoint_url``, ``region``, ``addressing_style``,
``verify_tls``) or the ``AWS_*`` environment. Credentials come only from the environment:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (+ ``AWS_SESSION_TOKEN``) injected from a
Kubernetes Secret, or EKS IRSA (``AWS_ROLE_ARN`` + ``AWS_WEB_IDENTITY_TOKEN_FILE``, set by
EKS for a pod whose ServiceAccount is annotated with a role) and EKS Pod Identity / container
credentials (``AWS_CONTAINER_CREDENTIALS_FULL_URI``). With none of these, requests go
unsigned (public buckets), never to an instance metadata service. Credentials never appear
in messages.
"""

from __future__ import annotations

import os
from typing import Any

from obstore.store import S3Store

from kubetune.errors import StorageUserError
from kubetune.storage.base import Capability
from kubetune.storage.cloud import CloudStore, Transfer, checked_prefix
from kubetune.storage.cloud_errors import Where
from kubetune.storage.schemes import StorageURI

CAPABILITIES = frozenset(
    {Capability.CONDITIONAL_WRITE, Capability.RANGE_LISTING, Capability.PRESIGN}
)
_CRED_HINT = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (storage.credentials_secret)"
_AMBIENT = (
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
)


def s3_settings(storage: Any | None) -> dict[str, Any]:
    """Endpoint, region, addressing style and TLS check from a ``StorageConfig``-like object
    and the environment."""
    env = os.environ
    endpoint = (
        getattr(storage, "endpoint_url", None)
        or env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL")
    )
    region = (
        getattr(storage, "region", None) or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    )
    return {
        "endpoint_url": endpoint or None,
        "region": region or "us-east-1",
        "addressing_style": getattr(storage, "addressing_style", None) or "path",
        "verify_tls": getattr(storage, "verify_tls", True),
    }


def _credentials() -> dict[str, Any]:
    """obstore credential settings from the environment (see the module docstring)."""
    env = os.environ
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        creds = {"access_key_id": key, "secret_access_key": secret}
        if token := env.get("AWS_SESSION_TOKEN"):
            creds["session_token"] = token
        return creds
    if any(env.get(name) for name in _AMBIENT):
        return {}  # obstore reads the web identity / container variables itself
    return {"skip_signature": True}


def _virtual(style: str, endpoint: str | None) -> bool:
    """Virtual-hosted bucket addressing: ``virtual``, or ``auto`` on AWS itself (no endpoint);
    self-hosted servers (SeaweedFS, MinIO) want ``path``."""
    return style == "virtual" or (style == "auto" and not endpoint)


def open_s3(loc: StorageURI, storage: Any | None = None, **options: Any) -> CloudStore:
    """The store for ``s3://bucket/prefix`` (``options``: ``Transfer`` fields)."""
    bucket = loc.bucket
    if "/" in bucket or any(c.isspace() for c in bucket):
        raise StorageUserError(f"invalid bucket name {bucket!r}")
    prefix = checked_prefix(str(loc), loc.path)
    settings, transfer = s3_settings(storage), Transfer(**options)
    creds = _credentials()
    endpoint = settings["endpoint_url"]
    raw = S3Store(
        bucket,
        prefix=prefix or None,
        region=settings["region"],
        virtual_hosted_style_request=_virtual(settings["addressing_style"], endpoint),
        client_options=transfer.client_options(endpoint, settings["verify_tls"]),
        retry_config=transfer.retry_config(),
        **({"endpoint": endpoint} if endpoint else {}),
        **creds,
    )
    shown = endpoint or f"https://s3.{settings['region']}.amazonaws.com"
    where = Where(
        uri=str(loc),
        bucket=bucket,
        endpoint=shown,
        credentials_hint=_CRED_HINT,
        credentials_set="skip_signature" not in creds,
        identity=f"access key id {creds['access_key_id']}" if "access_key_id" in creds else "",
    )
    return CloudStore(raw, where, capabilities=CAPABILITIES, transfer=transfer)
