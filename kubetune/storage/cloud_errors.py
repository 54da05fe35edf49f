"""obstore errors translated into kubetune's: a missing key is ``FileNotFoundError``, a refusal
the user must fix (no such bucket, access denied, a bad request) is ``StorageUserError`` naming
the bucket and endpoint, anything that survived obstore's retries is ``StorageError``.

obstore's messages carry a long debug dump (the request, the server's XML body); only the
first line and the server's error code are kept. Signed URLs are never part of an error (the
S3 signature travels in headers, SAS tokens of presigned URLs never reach this module).
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass

from obstore import exceptions as obs_errors

from kubetune.errors import StorageError, StorageUserError

_MISSING_BUCKET = ("NoSuchBucket", "ContainerNotFound", "The specified bucket does not exist")
_DENIED_CODES = (
    "AccessDenied",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "AuthenticationFailed",
    "AuthorizationFailure",
    "ExpiredToken",
)
_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
_STATUS = re.compile(r"status code: (\d{3})")
_QUERY = re.compile(r"\?[^\s]*")


@dataclass(frozen=True)
class Where:
    """What messages name: the store URI, its bucket / container, its endpoint and the hint
    for credentials of this cloud."""

    uri: str
    bucket: str
    endpoint: str
    credentials_hint: str
    credentials_set: bool = True
    identity: str = ""
    """Shown with access errors (an access key id or account name, never a secret)."""

    def of(self, key: str | None) -> str:
        return f"{self.uri}/{key or ''}".rstrip("/") + f" at {self.endpoint}"


def status_of(exc: BaseException) -> int:
    """The HTTP status an obstore error reports (0 if none)."""
    match = _STATUS.search(str(exc))
    return int(match.group(1)) if match else 0


def _summary(exc: BaseException) -> str:
    first = str(exc).split("\n", 1)[0]
    code = _CODE.search(str(exc))
    text = _QUERY.sub("", first)[:300]  # a URL's query string may carry a token: drop it
    return f"{text} ({code.group(1)})" if code and code.group(1) not in text else text


def translate(exc: BaseException, where: Where, action: str, key: str | None) -> BaseException:
    """The kubetune error for an obstore error raised while doing ``action`` on ``key``."""
    text, status = str(exc), status_of(exc)
    if any(m in text for m in _MISSING_BUCKET):
        return StorageUserError(
            f"bucket {where.bucket!r} does not exist at {where.endpoint}",
            hint="create it, or fix the bucket in the output URI / storage config",
        )
    if isinstance(exc, FileNotFoundError | obs_errors.NotFoundError):
        return FileNotFoundError(errno.ENOENT, "no such object", f"{where.uri}/{key}")
    denied = isinstance(exc, obs_errors.PermissionDeniedError | obs_errors.UnauthenticatedError)
    if denied or status in (401, 403) or any(f">{c}<" in text for c in _DENIED_CODES):
        who = f" for {where.identity}" if where.identity else ""
        hint = where.credentials_hint
        if not where.credentials_set:
            hint = f"no credentials set: {hint}"
        code = _CODE.search(text)
        why = f" ({code.group(1)})" if code else ""
        return StorageUserError(f"access denied{why}{who}: {action} {where.of(key)}", hint=hint)
    if 400 <= status < 500 and status not in (408, 429):
        return StorageUserError(f"{action} {where.of(key)} refused: {_summary(exc)}")
    if "error sending request" in text or "Connect" in text or "connection" in text.lower():
        return StorageError(
            f"cannot reach the storage endpoint {where.endpoint} to {action} {where.of(key)}",
            hint="check storage.endpoint_url and that the server is reachable",
        )
    return StorageError(f"{action} {where.of(key)} failed after retries: {_summary(exc)}")
