"""``CloudStore``: an ``ObjectStore`` over any obstore store (S3, GCS, Azure Blob).

All object I/O goes through obstore (Rust ``object_store``): listings, whole and ranged reads,
uploads (multipart above ``multipart_threshold``), conditional writes, deletes and presigned
URLs. Transport retries are obstore's own, configured once per store (``retry_config``:
5xx, connection errors, dropped and cut bodies); the run-level ``RetryPolicy`` in
``kubetune.storage.run_store`` is the one layer above. Errors are translated by
``kubetune.storage.cloud_errors``. The backend modules (``s3``, ``gcs``, ``azure``) only
build the obstore store and say what it can do.
"""

from __future__ import annotations

import contextlib
import json
import mimetypes
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import obstore as obs
from obstore import exceptions as obs_errors

from kubetune.errors import StorageUserError
from kubetune.storage.base import (
    Capability,
    MiB,
    ObjectInfo,
    StoreBase,
    check_key,
    check_prefix,
    note_cloud_opened,
)
from kubetune.storage.cloud_errors import Where, status_of, translate
from kubetune.storage.local import _write_atomically

_PRECONDITION = (obs_errors.AlreadyExistsError, obs_errors.PreconditionError)


@dataclass(frozen=True)
class Transfer:
    """Upload and retry settings of one store (the defaults suit checkpoints of a few GB)."""

    multipart_threshold: int = 16 * MiB
    multipart_chunksize: int = 16 * MiB
    max_concurrency: int = 8
    max_attempts: int = 5
    """HTTP attempts per request (obstore ``max_retries`` = this - 1)."""
    connect_timeout: float = 3.0
    read_timeout: float = 60.0
    page_size: int = 1000
    """Objects per listing step (the server's page is its own: 1000 on S3, 5000 on Azure)."""

    def retry_config(self) -> dict[str, Any]:
        backoff = {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=5)}
        return {
            "max_retries": max(0, self.max_attempts - 1),
            "backoff": backoff,
            "retry_timeout": timedelta(seconds=120),
        }

    def client_options(self, endpoint: str | None, verify_tls: bool = True) -> dict[str, Any]:
        options: dict[str, Any] = {
            "connect_timeout": timedelta(seconds=self.connect_timeout),
            "read_timeout": timedelta(seconds=self.read_timeout),
            "pool_idle_timeout": timedelta(seconds=50),
        }
        if endpoint and endpoint.startswith("http://"):
            options["allow_http"] = True
        if not verify_tls:
            options["allow_invalid_certificates"] = True
        return options


def encode_tag(meta: Any) -> str:
    """An opaque version tag of an object: its ETag and, where the cloud has one, its version
    (GCS conditions on the generation, S3 and Azure on the ETag)."""
    return json.dumps([meta.get("e_tag"), meta.get("version")])


def _mode(tag: str) -> dict[str, str]:
    try:
        e_tag, version = json.loads(tag)
    except (ValueError, TypeError):
        e_tag, version = tag, None
    return {k: v for k, v in (("e_tag", e_tag), ("version", version)) if v}


class CloudStore(StoreBase):
    """Objects under ``scheme://bucket/prefix`` through an obstore store rooted at the prefix."""

    def __init__(
        self,
        raw: Any,
        where: Where,
        *,
        capabilities: frozenset[Capability],
        transfer: Transfer = Transfer(),  # noqa: B008 - frozen
    ) -> None:
        note_cloud_opened()
        self.raw, self.where, self.transfer = raw, where, transfer
        self.uri, self.bucket, self.endpoint = where.uri, where.bucket, where.endpoint
        self.capabilities = capabilities | {Capability.ASYNC_READS}  # obstore's async API
        self.page_size = transfer.page_size

    def url(self, key: str) -> str:
        return f"{self.uri}/{check_key(key)}"

    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        try:
            yield
        except (obs_errors.BaseError, FileNotFoundError) as exc:
            raise translate(exc, self.where, action, key) from None

    # -- reads --------------------------------------------------------------------------------

    def get_bytes(self, key: str) -> bytes:
        check_key(key)
        with self._errors("read", key):
            return obs.get(self.raw, key).bytes().to_bytes()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Up to ``length`` bytes from offset ``start`` (b"" when ``start`` is past the end)."""
        check_key(key)
        try:  # the dataset's hot path (a header read per image): no context manager
            return obs.get_range(self.raw, key, start=start, length=length).to_bytes()
        except (obs_errors.BaseError, FileNotFoundError) as exc:
            return self._range_error(exc, key)

    async def get_range_async(self, key: str, start: int, length: int) -> bytes:
        """``get_range`` awaited: many in flight from one thread (obstore's async API)."""
        check_key(key)
        try:
            reply = await obs.get_range_async(self.raw, key, start=start, length=length)
            return reply.to_bytes()
        except (obs_errors.BaseError, FileNotFoundError) as exc:
            return self._range_error(exc, key)

    def _range_error(self, exc: BaseException, key: str) -> bytes:
        """b"" for a range that starts at or past the end (416); else raise its error."""
        if isinstance(exc, obs_errors.GenericError) and status_of(exc) == 416:
            return b""
        raise translate(exc, self.where, "read", key) from None

    def get_file(self, key: str, path: str | Path) -> None:
        check_key(key)
        with self._errors("read", key):
            reply = obs.get(self.raw, key)

            def write(out: Any) -> None:
                for chunk in reply.stream(min_chunk_size=8 * MiB):
                    out.write(chunk)

            _write_atomically(Path(path), write)

    def exists(self, key: str) -> bool:
        check_key(key)
        try:
            with self._errors("check", key):
                obs.head(self.raw, key)
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        return self._list(prefix, None, None)

    def list_range(self, prefix: str, after: str | None, until: str | None) -> Iterator[ObjectInfo]:
        """The part of ``list(prefix)`` after key ``after`` (None: from the start) up to and
        including key ``until`` (None, or never met: to the end)."""
        if Capability.RANGE_LISTING not in self.capabilities:
            raise self._unsupported(Capability.RANGE_LISTING)
        check_prefix(prefix)
        return self._list(prefix, after, until)

    def _list(self, prefix: str, after: str | None, until: str | None) -> Iterator[ObjectInfo]:
        """Pages fetched as the iterator advances. A page whose body was cut (obstore retries
        requests, not a listing body read later) restarts the listing, skipping the keys
        already yielded, up to ``max_attempts`` times."""
        seen: set[str] = set()
        for attempt in range(1, self.transfer.max_attempts + 1):
            try:
                for info in self._list_once(prefix, after, until):
                    if info.key not in seen:
                        seen.add(info.key)
                        yield info
                return
            except obs_errors.GenericError as exc:
                if attempt == self.transfer.max_attempts or "body" not in str(exc):
                    raise translate(exc, self.where, "list", prefix or None) from None

    def _list_once(self, prefix: str, after: str | None, until: str | None) -> Iterator[ObjectInfo]:
        # obstore lists whole path segments: list the folder, keep the keys that match
        folder = prefix.rpartition("/")[0] or None
        stream = obs.list(self.raw, folder, offset=after, chunk_size=self.page_size)
        while True:
            try:
                chunk = next(stream, None)
            except FileNotFoundError as exc:  # e.g. a missing bucket
                raise translate(exc, self.where, "list", prefix or None) from None
            except obs_errors.GenericError:
                raise
            except obs_errors.BaseError as exc:
                raise translate(exc, self.where, "list", prefix or None) from None
            if chunk is None:
                return
            for meta in chunk:
                if meta["path"].startswith(prefix):
                    yield ObjectInfo(meta["path"], meta["size"], meta.get("e_tag") or "")
                    if meta["path"] == until:
                        return

    # -- writes -------------------------------------------------------------------------------

    def _put(self, key: str, data: Any, size: int, **extra: Any) -> Any:
        kind = mimetypes.guess_type(key)[0]
        t = self.transfer
        return obs.put(
            self.raw,
            key,
            data,
            attributes={"Content-Type": kind} if kind else None,
            use_multipart=size >= t.multipart_threshold,
            chunk_size=t.multipart_chunksize,
            max_concurrency=t.max_concurrency,
            **extra,
        )

    def put_bytes(self, key: str, data: bytes) -> None:
        check_key(key)
        with self._errors("write", key):
            self._put(key, data, len(data))

    def put_file(self, key: str, path: str | Path) -> None:
        check_key(key)
        size = os.stat(path).st_size  # FileNotFoundError before any request
        with self._errors("write", key):
            self._put(key, Path(path), size)

    def delete(self, keys: Iterable[str]) -> None:
        doomed = [check_key(k) for k in keys]
        if not doomed:
            return
        with self._errors("delete", None):
            try:
                obs.delete(self.raw, doomed)
            except FileNotFoundError:  # some clouds refuse deleting what is gone: one by one
                for key in doomed:
                    with contextlib.suppress(FileNotFoundError):
                        obs.delete(self.raw, key)

    # -- conditional writes (the run lease) ----------------------------------------------------

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist; False if it does."""
        self._need(Capability.CONDITIONAL_WRITE)
        check_key(key)
        with self._errors("write", key):
            try:
                obs.put(self.raw, key, data, mode="create")
            except _PRECONDITION:
                return False
        return True

    def read_tagged(self, key: str) -> tuple[bytes, str]:
        """The object and its version tag."""
        self._need(Capability.CONDITIONAL_WRITE)
        check_key(key)
        with self._errors("read", key):
            reply = obs.get(self.raw, key)
            return reply.bytes().to_bytes(), encode_tag(reply.meta)

    def replace_if(self, key: str, data: bytes, tag: str) -> bool:
        """Overwrite ``key`` only if it still carries ``tag``."""
        self._need(Capability.CONDITIONAL_WRITE)
        check_key(key)
        try:
            with self._errors("write", key):
                try:
                    obs.put(self.raw, key, data, mode=_mode(tag))
                except _PRECONDITION:
                    return False
        except FileNotFoundError:  # the condition on a missing key
            return False
        return True

    def delete_if(self, key: str, tag: str) -> bool:
        """Delete ``key`` if it still carries ``tag`` (checked, then deleted: not every cloud
        has a conditional delete, so a takeover in between is possible but harmless for the
        lease, whose new holder re-creates it on its next renewal)."""
        self._need(Capability.CONDITIONAL_WRITE)
        check_key(key)
        try:
            with self._errors("check", key):
                meta = obs.head(self.raw, key)
        except FileNotFoundError:
            return False
        if _mode(encode_tag(meta)) != _mode(tag):
            return False
        self.delete([key])
        return True

    # -- presigned URLs -----------------------------------------------------------------------

    def presign(self, key: str, expires_s: int = 3600) -> str:
        """A time-limited GET URL for ``key`` (no credentials needed to use it)."""
        self._need(Capability.PRESIGN)
        check_key(key)
        with self._errors("presign", key):
            return obs.sign(self.raw, "GET", key, timedelta(seconds=expires_s))

    def _need(self, capability: Capability) -> None:
        if capability not in self.capabilities:
            raise self._unsupported(capability)


def checked_prefix(uri: str, prefix: str) -> str:
    """The store prefix of ``uri``, validated (``..`` segments refused)."""
    if prefix:
        try:
            check_prefix(prefix)
        except StorageUserError:
            raise StorageUserError(f"invalid storage URI {uri!r}: bad key prefix") from None
    return prefix
