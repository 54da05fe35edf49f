"""Object storage over string URIs: the `ObjectStore` protocol with declared capabilities, the
scheme registry (local paths, ``s3://``, ``gs://``, ``az://``), the run store every runner
write goes through (lease guard + retries) and the run lease. Torch-free; obstore is imported
only when a cloud URI is opened."""

from kubetune.storage.base import (
    Capability,
    MiB,
    ObjectInfo,
    ObjectStore,
    StoreBase,
    check_key,
    check_prefix,
    fork_safe,
    join_key,
    supports,
)
from kubetune.storage.local import LocalStore
from kubetune.storage.schemes import (
    StorageURI,
    is_remote,
    join_uri,
    open_store,
    parse_uri,
    register_scheme,
    split_uri,
)

__all__ = [
    "Capability",
    "LocalStore",
    "MiB",
    "ObjectInfo",
    "ObjectStore",
    "StorageURI",
    "StoreBase",
    "check_key",
    "check_prefix",
    "fork_safe",
    "is_remote",
    "join_key",
    "join_uri",
    "open_store",
    "parse_uri",
    "register_scheme",
    "split_uri",
    "supports",
]
