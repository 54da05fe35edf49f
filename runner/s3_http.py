"""A lean HTTP path for the two requests a large dataset makes by the thousand: ListObjectsV2
pages and ranged GETs of image headers.

botocore spends about a millisecond per listed key parsing a ListObjectsV2 page through its
generic XML parser, and a comparable fixed cost on every small request; at 10,000 images that
is most of a run's start. Here each request is signed with botocore's own SigV4 signer (or
sent unsigned when no credentials are set, as ``S3Store`` does), sent through one pooled
urllib3 client, and the page is parsed with ``xml.etree.ElementTree``. Retries follow
botocore's "standard" mode (connection errors, 5xx, throttling; exponential backoff with
jitter), and failures are raised as botocore exceptions so ``S3Store`` translates them like
every other request.
"""

from __future__ import annotations

import random
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import quote, unquote_plus, urlsplit

import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import NewConnectionError

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
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
        pool_size: int = 32,
    ) -> None:
        parts = urlsplit(endpoint)
        host = parts.netloc
        if addressing_style == "auto":  # botocore's rule: virtual on AWS for DNS-safe names
            aws = host.endswith(".amazonaws.com") and "." not in bucket
            addressing_style = "virtual" if aws and bucket == bucket.lower() else "path"
        if addressing_style == "virtual":
            self._base = f"{parts.scheme}://{bucket}.{host}{parts.path.rstrip('/')}/"
        else:
            self._base = f"{parts.scheme}://{host}{parts.path.rstrip('/')}/{bucket}/"
        self.endpoint = endpoint
        self._signer = S3SigV4Auth(credentials, "s3", region) if credentials else None
        self.max_attempts = max(1, max_attempts)
        self._pool = urllib3.PoolManager(
            num_pools=4,
            maxsize=pool_size,
            cert_reqs="CERT_REQUIRED" if verify_tls else "CERT_NONE",
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=False,
        )

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
        url = self._base + quote(key, safe="/~") + _query(query)
        for attempt in range(1, self.max_attempts + 1):
            last = attempt == self.max_attempts
            try:
                status, body = self._send(method, url, headers)
            except Urllib3Error as exc:
                if last:
                    raise _connection_error(url, exc) from exc
                _backoff(attempt)
                continue
            if 200 <= status < 300:
                return body
            error = _error(status, body)
            if last or not (status in _RETRY_STATUS or error["Error"]["Code"] in _RETRY_CODES):
                raise ClientError(error, op)  # type: ignore[arg-type]
            _backoff(attempt)
        raise AssertionError("unreachable")

    def _send(self, method: str, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
        request = AWSRequest(method=method, url=url, headers=dict(headers))
        if self._signer is not None:
            self._signer.add_auth(request)
        reply = self._pool.request(
            method, url, headers=dict(request.headers.items()), preload_content=True
        )
        return reply.status, reply.data


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
    endpoint = url.split("?", 1)[0]
    if isinstance(exc, NewConnectionError) or "connect" in type(exc).__name__.lower():
        return EndpointConnectionError(endpoint_url=endpoint, error=exc)
    return ReadTimeoutError(endpoint_url=endpoint, error=exc)


def _backoff(attempt: int) -> None:
    """botocore standard mode: random(0, 1) x 2^attempt x 50 ms, at most 20 s."""
    time.sleep(min(20.0, random.random() * 0.05 * 2**attempt))
