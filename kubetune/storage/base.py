"""The storage contract: ``ObjectStore`` with its declared capabilities, ``ObjectInfo`` and the
key checks every backend shares.

Every store has the same semantics: keys are relative POSIX paths under the store's root URI,
writes are all-or-nothing (readers see the old object or the new one, never a part), ``list``
is lazy, and "directories" exist only through the keys in them. What a backend can do beyond
that it declares in ``capabilities`` (conditional writes for the run lease, range listing for
parallel dataset listings, presigned URLs for the launcher); a caller asks ``supports(store,
Capability.X)`` and never probes for methods. Errors are translated at the backend boundary
(see ``kubetune.errors``): a missing key raises ``FileNotFoundError``, a refusal the user must
fix raises ``StorageUserError`` naming the bucket and endpoint, and failures that survived the
retries raise ``StorageError``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kubetune.errors import StorageUserError

MiB = 2**20
_cloud_opened = False


def fork_safe() -> bool:
    """True while no cloud store was opened in this process. obstore runs its requests on a
    tokio runtime whose threads a forked child does not inherit: a child forked after that
    hangs on its first request. Fork only while this holds; otherwise start children with
    ``forkserver`` or ``spawn`` (the DataLoader workers and the preflight do)."""
    return not _cloud_opened


def note_cloud_opened() -> None:
    """Called by ``kubetune.storage.cloud.CloudStore`` when it is created."""
    global _cloud_opened
    _cloud_opened = True


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key relative to the store root, its size in bytes and a version
    tag (the ETag, or the local file's mtime in ns) that changes when the object does."""

    key: str
    size: int
    etag: str = field(default="", compare=False)


class Capability(str, enum.Enum):
    """An optional part of the ``ObjectStore`` contract that a backend declares."""

    CONDITIONAL_WRITE = "conditional_write"
    """``create`` / ``read_tagged`` / ``replace_if`` / ``delete_if`` (the run lease)."""
    RANGE_LISTING = "range_listing"
    """``list_range``: part of a listing after a key, served by the server (S3 start-after)."""
    PRESIGN = "presign"
    """``presign``: a time-limited GET URL that needs no credentials."""
    ASYNC_READS = "async_reads"
    """``get_range_async``: a ranged read awaited on an event loop, so that one thread keeps
    many in flight (the dataset's header reads)."""


class ObjectStore(Protocol):
    """What every store offers; the optional methods work where ``capabilities`` says so."""

    uri: str
    capabilities: frozenset[Capability]
    page_size: int
    """Objects per listing request (what ``list_range`` callers split a listing by)."""

    def url(self, key: str) -> str: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def get_range(self, key: str, start: int, length: int) -> bytes: ...
    def put_file(self, key: str, path: str | Path) -> None: ...
    def get_file(self, key: str, path: str | Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...
    def delete(self, keys: Iterable[str]) -> None: ...
    # Capability.CONDITIONAL_WRITE
    def create(self, key: str, data: bytes) -> bool: ...
    def read_tagged(self, key: str) -> tuple[bytes, str]: ...
    def replace_if(self, key: str, data: bytes, tag: str) -> bool: ...
    def delete_if(self, key: str, tag: str) -> bool: ...
    # Capability.RANGE_LISTING
    def list_range(
        self, prefix: str, after: str | None, until: str | None
    ) -> Iterator[ObjectInfo]: ...
    # Capability.PRESIGN
    def presign(self, key: str, expires_s: int = 3600) -> str: ...


def supports(store: object, capability: Capability) -> bool:
    """Whether ``store`` declares ``capability``."""
    return capability in getattr(store, "capabilities", frozenset())


class StoreBase:
    """Defaults for the optional part of ``ObjectStore``: no capabilities, and each optional
    method raises ``StorageUserError`` naming what the backend lacks."""

    uri: str = ""
    capabilities: frozenset[Capability] = frozenset()
    page_size: int = 1000

    def _unsupported(self, capability: Capability) -> StorageUserError:
        return StorageUserError(
            f"{self.uri}: this storage backend has no {capability.value.replace('_', ' ')}",
            hint="use a store that declares it (see docs/architecture.md, kubetune.storage)",
        )

    def create(self, key: str, data: bytes) -> bool:
        raise self._unsupported(Capability.CONDITIONAL_WRITE)

    def read_tagged(self, key: str) -> tuple[bytes, str]:
        raise self._unsupported(Capability.CONDITIONAL_WRITE)

    def replace_if(self, key: str, data: bytes, tag: str) -> bool:
        raise self._unsupported(Capability.CONDITIONAL_WRITE)

    def delete_if(self, key: str, tag: str) -> bool:
        raise self._unsupported(Capability.CONDITIONAL_WRITE)

    def list_range(self, prefix: str, after: str | None, until: str | None) -> Iterator[ObjectInfo]:
        raise self._unsupported(Capability.RANGE_LISTING)

    def presign(self, key: str, expires_s: int = 3600) -> str:
        raise self._unsupported(Capability.PRESIGN)

    async def get_range_async(self, key: str, start: int, length: int) -> bytes:
        raise self._unsupported(Capability.ASYNC_READS)


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise ``StorageUserError``."""
    if not isinstance(key, str) or not key:
        raise StorageUserError(f"invalid storage key {key!r}: empty")
    if key.startswith("/") or "\0" in key or any(p in ("", ".", "..") for p in key.split("/")):
        raise StorageUserError(
            f"invalid storage key {key!r}",
            hint="keys are relative paths without '..', '.', empty segments or a leading '/'",
        )
    return key


def check_prefix(prefix: str) -> str:
    """Like ``check_key`` but allows ``""``, a trailing ``/`` and partial names."""
    body = prefix[:-1] if prefix.endswith("/") else prefix
    if prefix.startswith("/") or (body and not check_key(body)):
        raise StorageUserError(f"invalid storage prefix {prefix!r}")
    return prefix


def join_key(*parts: str) -> str:
    """Join key segments with ``/`` (empty parts skipped) and validate the result."""
    return check_key("/".join(p.strip("/") for p in parts if p.strip("/")))
