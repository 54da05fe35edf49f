"""``S3Store``: the S3 half of ``kubetune.storage`` (boto3 + s3transfer).

Requests are retried by botocore ("standard" or "adaptive" mode), except listings and ranged
reads, which go through the lean signed path of ``kubetune.storage.s3_http`` (same retries
and errors, without botocore's per-request and XML-parsing cost); multipart transfers go
through one s3transfer ``TransferManager`` per store (parallel parts, retried downloads into a
temp file renamed into place). Credentials come only from the environment and never appear
in messages.
"""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import mimetypes
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from s3transfer.exceptions import RetriesExceededError
from s3transfer.manager import TransferConfig, TransferManager
from urllib3.exceptions import ProtocolError

from kubetune.errors import StorageError, StorageUserError
from kubetune.storage import MiB, ObjectInfo, check_key, check_prefix
from kubetune.storage.s3_http import S3Http

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_DENIED = {
    "AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "AllAccessDisabled", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
    "AccountProblem", "InvalidSecurity",
}  # fmt: skip
# a body cut mid-read: botocore wraps most of these, urllib3's ProtocolError (connection reset
# while reading) can reach us raw
_STREAM_ERRORS = (IncompleteReadError, ResponseStreamingError, ReadTimeoutError, ProtocolError)
_CRED_HINT = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (storage.credentials_secret)"
_ENDPOINT_HINT = "check storage.endpoint_url / AWS_ENDPOINT_URL and that the server is reachable"


def s3_settings(storage: Any | None) -> dict[str, Any]:
    """S3Store keyword arguments from a ``StorageConfig``-like object and the environment."""
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


_SESSION_LOCK = threading.Lock()
_SESSION: boto3.session.Session | None = None


def _session() -> boto3.session.Session:
    """One boto3 session per process (creating a client is ~10x faster the second time)."""
    global _SESSION
    if _SESSION is None:
        _SESSION = boto3.session.Session()
    return _SESSION


def _env_credentials() -> dict[str, str] | None:
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not (key and secret):
        return None
    creds = {"aws_access_key_id": key, "aws_secret_access_key": secret}
    if token := os.environ.get("AWS_SESSION_TOKEN"):
        creds["aws_session_token"] = token
    return creds


def _credentials(creds: dict[str, str] | None) -> Credentials | None:
    if not creds:
        return None
    return Credentials(
        creds["aws_access_key_id"], creds["aws_secret_access_key"], creds.get("aws_session_token")
    )


class S3Store:
    """Objects under ``s3://bucket/prefix`` on any S3-compatible endpoint."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        addressing_style: str = "path",
        verify_tls: bool = True,
        retry_mode: str = "standard",
        max_attempts: int = 5,
        connect_timeout: float = 3.0,
        read_timeout: float = 60.0,
        page_size: int = 1000,
        multipart_threshold: int = 16 * MiB,
        multipart_chunksize: int = 16 * MiB,
        max_concurrency: int = 8,
        get_attempts: int = 5,
    ) -> None:
        if not bucket or "/" in bucket or any(c.isspace() for c in bucket):
            raise StorageUserError(f"invalid bucket name {bucket!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_prefix(self.prefix)
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.page_size = page_size
        self.get_attempts = get_attempts
        creds = _env_credentials()
        self._access_key_id = creds["aws_access_key_id"] if creds else None
        config = Config(
            region_name=region,
            s3={"addressing_style": addressing_style},
            retries={"mode": retry_mode, "total_max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max(10, 2 * max_concurrency),
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            **({} if creds else {"signature_version": UNSIGNED}),
        )
        with _SESSION_LOCK:  # clients from one session share its parsed service models
            self._client = _session().client(
                "s3", endpoint_url=endpoint_url, verify=verify_tls, config=config, **(creds or {})
            )
        self.endpoint: str = self._client.meta.endpoint_url
        self._transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_request_concurrency=max_concurrency,
            num_download_attempts=get_attempts,
        )
        self._manager: TransferManager | None = None
        self._manager_lock = threading.Lock()
        # listings and ranged header reads: signed by botocore, sent and parsed lean
        self._http = S3Http(
            self.endpoint,
            bucket,
            region=region,
            addressing_style=addressing_style,
            verify_tls=verify_tls,
            credentials=_credentials(creds),
            max_attempts=max_attempts,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )

    # -- keys and errors ----------------------------------------------------------------------

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str) -> str:
        return f"{self.uri}/{check_key(key)}"

    def _translate(self, exc: BaseException, action: str, key: str | None) -> BaseException:
        """Map a botocore / s3transfer error to FileNotFoundError / StorageUserError /
        StorageError."""
        if isinstance(exc, RetriesExceededError) and exc.last_exception is not None:
            exc = exc.last_exception
        where = f"{self.uri}/{key if key else ''}".rstrip("/") + f" at {self.endpoint}"
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code, message = str(err.get("Code", "")), err.get("Message", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code == "NoSuchBucket":
                return StorageUserError(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint}",
                    hint="create it, or fix the bucket in the output URI / storage config",
                )
            if code in _NOT_FOUND:
                return FileNotFoundError(errno.ENOENT, "no such object", f"{self.uri}/{key}")
            if code in _DENIED or status == 403:
                who = f" for access key id {self._access_key_id}" if self._access_key_id else ""
                hint = _CRED_HINT if self._access_key_id else f"no credentials set: {_CRED_HINT}"
                return StorageUserError(f"access denied ({code}){who}: {action} {where}", hint=hint)
            if 400 <= status < 500 and status not in (408, 429):
                return StorageUserError(f"{action} {where} refused: {code} {message}".rstrip())
            return StorageError(f"{action} {where} failed after retries: {code} {message}".rstrip())
        if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
            return StorageError(
                f"cannot connect to S3 endpoint {self.endpoint} to {action} {where}",
                hint=_ENDPOINT_HINT,
            )
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StorageUserError(
                f"no usable S3 credentials to {action} {where}", hint=_CRED_HINT
            )
        return StorageError(f"{action} {where} failed: {type(exc).__name__}: {exc}")

    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        try:
            yield
        except (BotoCoreError, ClientError, RetriesExceededError, ProtocolError) as exc:
            raise self._translate(exc, action, key) from exc

    def _transfers(self) -> TransferManager:
        with self._manager_lock:
            if self._manager is None:
                self._manager = TransferManager(self._client, self._transfer_config)
            return self._manager

    def presign(self, key: str, expires_s: int = 3600) -> str:
        """A time-limited GET URL for ``key`` (no credentials needed to use it)."""
        params = {"Bucket": self.bucket, "Key": self._full(key)}
        with self._errors("presign", key):
            return self._client.generate_presigned_url("get_object", Params=params,
                                                       ExpiresIn=expires_s)  # fmt: skip

    # -- ObjectStore --------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> None:
        full = self._full(key)
        with self._errors("write", key):
            if len(data) < self._transfer_config.multipart_threshold:
                # a content type from the name: a browser renders report.html, shows PNGs
                kind = {"ContentType": t} if (t := mimetypes.guess_type(key)[0]) else {}
                self._client.put_object(Bucket=self.bucket, Key=full, Body=data, **kind)
            else:
                self._transfers().upload(io.BytesIO(data), self.bucket, full).result()

    def get_bytes(self, key: str) -> bytes:
        full = self._full(key)
        with self._errors("read", key):
            for attempt in itertools.count(1):
                body = self._client.get_object(Bucket=self.bucket, Key=full)["Body"]
                try:
                    return body.read()
                except _STREAM_ERRORS:  # a cut body: botocore only retried the headers
                    if attempt >= self.get_attempts:
                        raise
                    time.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Up to ``length`` bytes from offset ``start`` (one ranged GET, retried on a cut
        body like any transient failure; b"" when ``start`` is past the end)."""
        full = self._full(key)
        with self._errors("read", key):
            return self._http.get_range(full, start, length)

    def put_file(self, key: str, path: str | Path) -> None:
        full = self._full(key)
        size = os.stat(path).st_size  # FileNotFoundError before any request
        with self._errors("write", key):
            if size < self._transfer_config.multipart_threshold:
                with open(path, "rb") as f:
                    self._client.put_object(Bucket=self.bucket, Key=full, Body=f)
            else:
                self._transfers().upload(str(path), self.bucket, full).result()

    def get_file(self, key: str, path: str | Path) -> None:
        full = self._full(key)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with self._errors("read", key):
            self._transfers().download(self.bucket, full, str(path)).result()

    def exists(self, key: str) -> bool:
        full = self._full(key)
        try:
            with self._errors("check", key):
                self._client.head_object(Bucket=self.bucket, Key=full)
        except FileNotFoundError:
            return False
        return True

    # -- conditional writes (the run lease) ----------------------------------------------------

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist (``If-None-Match: *``); False if it does."""
        return self._conditional_put(key, data, IfNoneMatch="*")

    def read_tagged(self, key: str) -> tuple[bytes, str]:
        """The object and its ETag."""
        with self._errors("read", key):
            reply = self._client.get_object(Bucket=self.bucket, Key=self._full(key))
            return reply["Body"].read(), str(reply["ETag"])

    def replace_if(self, key: str, data: bytes, tag: str) -> bool:
        """Overwrite ``key`` only if its ETag is still ``tag`` (``If-Match``)."""
        return self._conditional_put(key, data, IfMatch=tag)

    def delete_if(self, key: str, tag: str) -> bool:
        """Delete ``key`` if its ETag is ``tag`` (checked, then deleted: S3 offers no
        conditional delete everywhere, so a takeover in between is possible but harmless for
        the lease, whose new holder re-creates it on its next renewal)."""
        try:
            with self._errors("check", key):
                head = self._client.head_object(Bucket=self.bucket, Key=self._full(key))
        except FileNotFoundError:
            return False
        if str(head["ETag"]) != tag:
            return False
        self.delete([key])
        return True

    def _conditional_put(self, key: str, data: bytes, **condition: str) -> bool:
        full = self._full(key)
        try:
            with self._errors("write", key):
                try:
                    self._client.put_object(Bucket=self.bucket, Key=full, Body=data, **condition)
                except ClientError as exc:
                    if _precondition_failed(exc):
                        return False
                    raise
        except FileNotFoundError:  # If-Match on a missing key
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        return self._list(prefix)

    def list_range(self, prefix: str, after: str | None, until: str | None) -> Iterator[ObjectInfo]:
        """The part of ``list(prefix)`` after key ``after`` (S3 ``start-after``; None: from the
        start) up to and including key ``until`` (None, or never met: to the end)."""
        check_prefix(prefix)
        for info in self._list(prefix, after):
            yield info
            if info.key == until:
                return

    def _list(self, prefix: str, after: str | None = None) -> Iterator[ObjectInfo]:
        root = f"{self.prefix}/" if self.prefix else ""
        token: str | None = None
        start = root + after if after is not None else None
        while True:  # one page per step of the iterator: the listing stays lazy
            with self._errors("list", prefix or None):
                page, token = self._http.list_page(root + prefix, token, self.page_size, start)
            for obj in page:
                yield ObjectInfo(obj.key[len(root) :], obj.size, obj.etag)
            if token is None:
                return

    def delete(self, keys: Iterable[str]) -> None:
        full = [self._full(k) for k in keys]
        for start in range(0, len(full), 1000):
            batch = [{"Key": k} for k in full[start : start + 1000]]
            with self._errors("delete", None):
                resp = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            if errors := resp.get("Errors"):
                first = errors[0]
                raise StorageError(
                    f"delete of {len(errors)} objects under {self.uri} at {self.endpoint} "
                    f"failed: {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )

    def close(self) -> None:
        """Shut down the transfer threads (the store stays usable; they restart lazily)."""
        with self._manager_lock:
            manager, self._manager = self._manager, None
        if manager is not None:
            manager.shutdown()


def _precondition_failed(exc: ClientError) -> bool:
    """412 (the condition does not hold) or 409 (a concurrent conditional write won)."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")
