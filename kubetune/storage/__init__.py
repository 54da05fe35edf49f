"""Object storage over string URIs: the `ObjectStore` protocol, the local-folder and S3
backends, the run store every runner write goes through (lease guard + retries) and the
run lease. Torch-free."""

from kubetune.storage.base import (
    LocalStore,
    MiB,
    ObjectInfo,
    ObjectStore,
    check_key,
    check_prefix,
    join_key,
    open_store,
)

__all__ = [
    "LocalStore",
    "MiB",
    "ObjectInfo",
    "ObjectStore",
    "check_key",
    "check_prefix",
    "join_key",
    "open_store",
]
