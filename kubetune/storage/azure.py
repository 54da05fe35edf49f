"""``az://container/prefix`` on Azure Blob Storage (or Azurite), through obstore's
``AzureStore``.

The storage account comes from ``storage.account_name`` or ``AZURE_STORAGE_ACCOUNT_NAME``;
``storage.endpoint_url`` overrides ``https://<account>.blob.core.windows.net`` (Azurite:
``http://127.0.0.1:10000/devstoreaccount1``). Credentials come only from the environment,
read by obstore: an account key (``AZURE_STORAGE_ACCOUNT_KEY``, injected from a Kubernetes
Secret), a SAS token (``AZURE_STORAGE_SAS_TOKEN``), or Azure Workload Identity
(``AZURE_CLIENT_ID`` + ``AZURE_TENANT_ID`` + ``AZURE_FEDERATED_TOKEN_FILE``, set by the
workload-identity webhook for a pod labelled ``azure.workload.identity/use: "true"`` whose
ServiceAccount names a managed identity). Presigned URLs (user-delegation or account-key SAS)
need a key or an identity allowed to sign.
"""

from __future__ import annotations

import os
from typing import Any

from obstore.store import AzureStore

from kubetune.errors import StorageUserError
from kubetune.storage.base import Capability
from kubetune.storage.cloud import CloudStore, Transfer, checked_prefix
from kubetune.storage.cloud_errors import Where
from kubetune.storage.schemes import StorageURI

# obstore lists an Azure container's range only by filtering a full listing: no RANGE_LISTING
CAPABILITIES = frozenset({Capability.CONDITIONAL_WRITE, Capability.PRESIGN})
_CRED_HINT = (
    "check AZURE_STORAGE_ACCOUNT_KEY (storage.credentials_secret) or the pod's Azure Workload "
    "Identity (storage.workload_identity, job.service_account)"
)
_KEY_VARS = (
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_MASTER_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_CLIENT_SECRET",
    "AZURE_STORAGE_TOKEN",
)


def open_azure(loc: StorageURI, storage: Any | None = None, **options: Any) -> CloudStore:
    """The store for ``az://container/prefix`` (``options``: ``Transfer`` fields)."""
    account = getattr(storage, "account_name", None) or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
    if not account:
        raise StorageUserError(
            f"no Azure storage account for {loc}",
            hint="set storage.account_name (or AZURE_STORAGE_ACCOUNT_NAME)",
        )
    prefix = checked_prefix(str(loc), loc.path)
    endpoint = getattr(storage, "endpoint_url", None) or os.environ.get("AZURE_STORAGE_ENDPOINT")
    transfer = Transfer(**options)
    verify = getattr(storage, "verify_tls", True)
    raw = AzureStore(
        loc.bucket,
        prefix=prefix or None,
        account_name=account,
        client_options=transfer.client_options(endpoint, verify),
        retry_config=transfer.retry_config(),
        **({"endpoint": endpoint} if endpoint else {}),
    )
    where = Where(
        uri=str(loc),
        bucket=loc.bucket,
        endpoint=endpoint or f"https://{account}.blob.core.windows.net",
        credentials_hint=_CRED_HINT,
        identity=f"storage account {account}",
        credentials_set=any(os.environ.get(v) for v in _KEY_VARS),
    )
    return CloudStore(raw, where, capabilities=CAPABILITIES, transfer=transfer)
