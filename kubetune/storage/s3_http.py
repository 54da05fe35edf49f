"""A lean HTTP path for the two requests a large dataset makes by the thousand: ListObjectsV2
pages and ranged GETs of image headers.

botocore spends about a millisecond per listed key parsing a ListObjectsV2 page through its
generic XML parser, and ~0.5 ms of CPU on every small request (request objects, signer,
urllib3 pool); at 10,000 images, on a start where the same cores import torch, that is most
of the data's share of the start. Here each request is signed with a small SigV4 signer
(AWS Signature Version 4 for bodyless requests; the signing key is derived once per day and
secret; unsigned when no credentials are set, as ``S3Store`` does), sent over one persistent
``http.client`` connection per thread (re-opened after a fork or a dropped keep-alive), and
a listing page is parsed with ``xml.etree.ElementTree``: ~0.25 ms of client CPU per ranged
read (``benchmarks/data_first_step.py``). Retries follow botocore's "standard" mode
(connection errors, 5xx, throttling; exponential backoff with jitter), and failures are
raised as botocore exceptions so ``S3Store`` translates them like every other request.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import os
import random
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import quote, unquote_plus, urlsplit

from botocore.credentials import Credentials
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()  # the payload hash of a bodyless request
_RETRY_STATUS = {429, 500, 502, 503, 504}
_RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable"}  # fmt: skip


@dataclass(frozen=True)
class Listed:
    """One key of a listing page (full key, as stored)."""

    key: str
    size: int
    etag: str


class S3Http:
    """Signed (or anonymous) S3 requests for one bucket over a pooled urllib3 client."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        *,
        region: str,
        addressing_style: str = "path",
        verify_tls: bool = True,
        credentials: Credentials | None = None,
        max_attempts: int = 5,
        connect_timeout: float = 3.0,
        read_timeout: float = 60.0,
    ) -> None:
        parts = urlsplit(endpoint)
        host = parts.netloc
        if addressing_style == "auto":  # botocore's rule: virtual on AWS for DNS-safe names
            aws = host.endswith(".amazonaws.com") and "." not in bucket
            addressing_style = "virtual" if aws and bucket == bucket.lower() else "path"
        self._path = parts.path.rstrip("/") + "/"
        if addressing_style == "virtual":
            host = f"{bucket}.{host}"
        else:
            self._path += f"{bucket}/"
        self._host = host  # the Host header, as signed
        self._base = f"{parts.scheme}://{host}{self._path}"  # for error messages
        self._tls: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._tls = ssl.create_default_context()
            if not verify_tls:
                self._tls.check_hostname = False
                self._tls.verify_mode = ssl.CERT_NONE
        self.endpoint = endpoint
        self._signer = SigV4(credentials, region) if credentials else None
        self.max_attempts = max(1, max_attempts)
        self._timeouts = (connect_timeout, read_timeout)
        self._local = threading.local()  # one connection per thread (and process)

    # -- requests ----------------------------------------------------------------------------

    def list_page(
        self, prefix: str, token: str | None, page_size: int, start_after: str | None = None
    ) -> tuple[list[Listed], str | None]:
        """One ListObjectsV2 page under ``prefix`` (the first one after the full key
        ``start_after``, if given): its keys and the next continuation token (None on the
        last page). Keys are url-encoded on the wire, as botocore asks for."""
        query = {"list-type": "2", "prefix": prefix, "max-keys": str(page_size),
                 "encoding-type": "url"}  # fmt: skip
        if token:
            query["continuation-token"] = token
        elif start_after:
            query["start-after"] = start_after
        body = self._call("GET", "", query, {}, "ListObjectsV2")
        return _parse_page(body)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Up to ``length`` bytes of ``key`` from ``start`` (b"" past its end)."""
        end = start + max(length, 1) - 1
        try:
            body = self._call("GET", key, {}, {"Range": f"bytes={start}-{end}"}, "GetObject")
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "InvalidRange":
                return b""
            raise
        return body[:length]

    def _call(
        self, method: str, key: str, query: dict[str, str], headers: dict[str, str], op: str
    ) -> bytes:
        """Send with retries; the body of a 2xx reply, else a botocore exception."""
        path = self._path + quote(key, safe="/~")
        canonical_query = _query(query)
        for attempt in range(1, self.max_attempts + 1):
            last = attempt == self.max_attempts
            signed = {"host": self._host, **headers}
            if self._signer is not None:
                signed = self._signer.sign(method, path, canonical_query, signed)
            try:
                status, body = self._send(method, path + canonical_query, signed)
            except (OSError, http.client.HTTPException) as exc:
                if last:
                    raise _connection_error(self._base + key, exc) from exc
                _backoff(attempt)
                continue
            if 200 <= status < 300:
                return body
            error = _error(status, body)
            if last or not (status in _RETRY_STATUS or error["Error"]["Code"] in _RETRY_CODES):
                raise ClientError(error, op)  # type: ignore[arg-type]
            _backoff(attempt)
        raise AssertionError("unreachable")

    def _send(self, method: str, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
        """One request on this thread's connection. A kept-alive connection the server has
        closed meanwhile is re-opened once, without counting as an attempt (a GET is
        idempotent); any other failure drops the connection and is raised."""
        for reuse in (True, False):
            conn, fresh = self._connection()
            try:
                if fresh:
                    self._open(conn)
                conn.request(method, target, headers=headers)
                reply = conn.getresponse()
                body = reply.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._drop()
                if fresh or not reuse:
                    raise
                continue
            except (OSError, http.client.HTTPException):
                self._drop()
                raise
            if reply.will_close:
                self._drop()
            return reply.status, body
        raise AssertionError("unreachable")

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection and whether it is new (one made before a fork is not
        shared with the parent: a child process opens its own)."""
        local = self._local
        if getattr(local, "conn", None) is None or local.pid != os.getpid():
            connect, _ = self._timeouts
            if self._tls is not None:
                local.conn = http.client.HTTPSConnection(
                    self._host, timeout=connect, context=self._tls
                )
            else:
                local.conn = http.client.HTTPConnection(self._host, timeout=connect)
            local.pid = os.getpid()
            return local.conn, True
        return local.conn, False

    def _open(self, conn: http.client.HTTPConnection) -> None:
        """Connect within the connect timeout, then wait up to the read timeout per read."""
        try:
            conn.connect()
        except OSError as exc:
            raise _ConnectError(str(exc)) from exc
        if conn.sock is not None:
            conn.sock.settimeout(self._timeouts[1])

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()


class _ConnectError(ConnectionError):
    """The connection could not be made (refused, unresolvable, connect timeout)."""


class SigV4:
    """AWS Signature Version 4 for bodyless S3 requests (GET/HEAD/DELETE): the canonical
    request over the given headers plus ``x-amz-date`` and ``x-amz-content-sha256`` (and
    ``x-amz-security-token`` with a session token). The derived signing key is cached per
    (secret, day); credentials are read on every request, so refreshed ones are used."""

    def __init__(self, credentials: Credentials, region: str, service: str = "s3") -> None:
        self._credentials = credentials
        self._region = region
        self._service = service
        self._keys: dict[tuple[str, str], bytes] = {}

    def sign(
        self, method: str, path: str, query: str, headers: dict[str, str], now: float | None = None
    ) -> dict[str, str]:
        """``headers`` (which must include ``host``) plus the SigV4 headers. ``path`` is the
        URI-encoded path as sent; ``query`` the canonical query string ("" or "?a=b&…")."""
        creds = self._credentials.get_frozen_credentials()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        signed = {k.lower(): " ".join(str(v).split()) for k, v in headers.items()}
        signed["x-amz-date"] = stamp
        signed["x-amz-content-sha256"] = _EMPTY_SHA256
        if creds.token:
            signed["x-amz-security-token"] = creds.token
        names = sorted(signed)
        canonical = "\n".join(
            [method, path, query.lstrip("?"), *(f"{n}:{signed[n]}" for n in names), "",
             ";".join(names), _EMPTY_SHA256]
        )  # fmt: skip
        scope = f"{stamp[:8]}/{self._region}/{self._service}/aws4_request"
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        signature = hmac.new(self._key(creds.secret_key, stamp[:8]), to_sign.encode(), "sha256")
        signed["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature.hexdigest()}"
        )
        return signed

    def _key(self, secret: str, day: str) -> bytes:
        key = self._keys.get((secret, day))
        if key is None:
            key = hmac.new(f"AWS4{secret}".encode(), day.encode(), "sha256").digest()
            for part in (self._region, self._service, "aws4_request"):
                key = hmac.new(key, part.encode(), "sha256").digest()
            self._keys = {(secret, day): key}  # one live key: the day or the secret moved on
        return key


def _query(params: dict[str, str]) -> str:
    """A canonical (sorted, RFC 3986-encoded) query string, so the signed and sent URL agree."""
    if not params:
        return ""
    pairs = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in params.items())
    return "?" + "&".join(f"{k}={v}" for k, v in pairs)


def _parse_page(body: bytes) -> tuple[list[Listed], str | None]:
    root = ET.fromstring(body)
    ns = _NS if root.tag.startswith(_NS) else ""
    url_encoded = (root.findtext(f"{ns}EncodingType") or "").lower() == "url"
    listed = []
    for item in root.iterfind(f"{ns}Contents"):
        key = item.findtext(f"{ns}Key") or ""
        etag = (item.findtext(f"{ns}ETag") or "").strip('"')
        size = int(item.findtext(f"{ns}Size") or 0)
        listed.append(Listed(unquote_plus(key) if url_encoded else key, size, etag))
    truncated = (root.findtext(f"{ns}IsTruncated") or "").lower() == "true"
    token = root.findtext(f"{ns}NextContinuationToken") if truncated else None
    return listed, token or None


def _error(status: int, body: bytes) -> dict[str, object]:
    """A botocore-style error response from an S3 error reply (XML, or none for HEAD/5xx)."""
    code, message = str(status), ""
    try:
        root = ET.fromstring(body) if body else None
    except ET.ParseError:
        root = None
    if root is not None:
        code = root.findtext("Code") or code
        message = root.findtext("Message") or ""
    return {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }


def _connection_error(url: str, exc: Exception) -> Exception:
    """botocore's exception for a request that never got a reply (after retries)."""
    if isinstance(exc, _ConnectError):
        return EndpointConnectionError(endpoint_url=url, error=exc)
    return ReadTimeoutError(endpoint_url=url, error=exc)


def _backoff(attempt: int) -> None:
    """botocore standard mode: random(0, 1) x 2^attempt x 50 ms, at most 20 s."""
    time.sleep(min(20.0, random.random() * 0.05 * 2**attempt))
