"""``gs://bucket/prefix`` on Google Cloud Storage, through obstore's ``GCSStore`` (GCS's XML
API).

``storage.endpoint_url`` overrides the GCS endpoint (an emulator). Credentials come only from
the environment, read by obstore: a service-account key (``GOOGLE_SERVICE_ACCOUNT_KEY``, the
JSON injected from a Kubernetes Secret, or a file named by ``GOOGLE_APPLICATION_CREDENTIALS``
/ ``GOOGLE_SERVICE_ACCOUNT``), or, with none, GKE Workload Identity: the pod's
ServiceAccount, annotated with ``iam.gke.io/gcp-service-account``, gets tokens from the GKE
metadata server. Presigned URLs need a service-account key (or an identity allowed to sign
blobs).
"""

from __future__ import annotations

import os
from typing import Any

from obstore.store import GCSStore

from kubetune.storage.base import Capability
from kubetune.storage.cloud import CloudStore, Transfer, checked_prefix
from kubetune.storage.cloud_errors import Where
from kubetune.storage.schemes import StorageURI

# conditional writes condition on the object generation. No RANGE_LISTING: object_store sends
# GCS's XML API `start-after`, but fake-gcs-server ignores it (and paging), so it is unverified
CAPABILITIES = frozenset({Capability.CONDITIONAL_WRITE, Capability.PRESIGN})
_CRED_HINT = (
    "check GOOGLE_SERVICE_ACCOUNT_KEY (storage.credentials_secret) or the pod's GKE Workload "
    "Identity (storage.workload_identity, job.service_account)"
)
_KEY_VARS = (
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_SERVICE_ACCOUNT",
    "GOOGLE_SERVICE_ACCOUNT_PATH",
)


def open_gcs(loc: StorageURI, storage: Any | None = None, **options: Any) -> CloudStore:
    """The store for ``gs://bucket/prefix`` (``options``: ``Transfer`` fields)."""
    prefix = checked_prefix(str(loc), loc.path)
    endpoint = getattr(storage, "endpoint_url", None) or os.environ.get("GOOGLE_BASE_URL")
    transfer = Transfer(**options)
    verify = getattr(storage, "verify_tls", True)
    raw = GCSStore(
        loc.bucket,
        prefix=prefix or None,
        client_options=transfer.client_options(endpoint, verify),
        retry_config=transfer.retry_config(),
        **({"base_url": endpoint} if endpoint else {}),
    )
    where = Where(
        uri=str(loc),
        bucket=loc.bucket,
        endpoint=endpoint or "https://storage.googleapis.com",
        credentials_hint=_CRED_HINT,
        credentials_set=any(os.environ.get(v) for v in _KEY_VARS),
    )
    return CloudStore(raw, where, capabilities=CAPABILITIES, transfer=transfer)
