"""A FAKE LAYER, for tests only: a threaded HTTP proxy on 127.0.0.1 in front of fake-gcs-server
that turns obstore's GCS XML-API writes into the emulator's JSON-API uploads.

Why it exists: obstore (Rust ``object_store``) writes to GCS through the XML API, and no GCS
emulator on PyPI, npm or Debian accepts those writes (fake-gcs-server 1.54 answers them with
400 "invalid uploadType"; upstream issue fsouza/fake-gcs-server#331 is open; see
tests/gcs_emulator.py). Real GCS is never behind it; it is not product code. The tests use it
only while ``FakeGCS.xml_writes_refused()`` says the emulator refuses those writes.

The storage, the generations and the preconditions are the emulator's own: every request is
forwarded unchanged (Host aside) except these, which are translated (key = the URL-decoded
path after the bucket):

- ``PUT /bucket/key`` (obstore's put; ``x-goog-if-generation-match: 0`` for create-if-absent,
  ``: <generation>`` for replace) → ``POST /upload/storage/v1/b/bucket/o?uploadType=multipart
  &ifGenerationMatch=...`` (the emulator checks the condition on multipart uploads, not on
  ``uploadType=media``); its 412 stays 412 (obstore: PreconditionError / AlreadyExistsError).
  The answer carries what obstore reads of a put: ``ETag`` (the emulator's MD5, quoted, as its
  GET and HEAD answer) and ``x-goog-generation``.
- XML multipart: ``POST /bucket/key?uploads`` → an ``InitiateMultipartUploadResult`` with an
  upload id kept here; ``PUT ...?partNumber=N&uploadId=U`` → the part kept in memory (ETag: its
  quoted hex MD5); ``POST ...?uploadId=U`` with ``CompleteMultipartUpload`` → the listed parts
  (ETags checked) concatenated into one JSON upload, answered with a
  ``CompleteMultipartUploadResult``; ``DELETE ...?uploadId=U`` → the parts dropped (forwarded,
  the emulator would delete the object itself).

Not translated (obstore's copy, ``x-goog-copy-source``; kubetune does not copy): forwarded
unchanged, so the emulator refuses it. Parts live in this process's memory (tests write a few
tens of MiB at most).
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import json
import threading
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "host", "proxy-connection",
               "te", "trailer", "upgrade", "content-length"}  # fmt: skip
_JSON_PREFIXES = ("/storage/v1/", "/upload/", "/download/", "/_internal/")


@dataclass
class Reply:
    """An HTTP answer to send back to obstore."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class _Upload:
    bucket: str
    key: str
    content_type: str
    parts: dict[int, bytes] = field(default_factory=dict)


def _xml(root: str, **fields: str) -> bytes:
    element = ET.Element(root)
    for name, value in fields.items():
        ET.SubElement(element, name).text = value
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(element)


def _error(status: int, code: str, message: str) -> Reply:
    return Reply(status, {"Content-Type": "application/xml"},
                 _xml("Error", Code=code, Message=message))  # fmt: skip


class Translator:
    """The XML-write translations, against the emulator at ``upstream`` (thread-safe)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream).netloc
        self.uploads: dict[str, _Upload] = {}
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def call(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Reply:
        """One request to the emulator, its answer whole."""
        sent = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
        sent["Host"] = self.upstream  # http.client sets Content-Length from the body
        conn = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            conn.request(method, target, body=body or None, headers=sent)
            answer = conn.getresponse()
            data = answer.read()
            kept = {k: v for k, v in answer.getheaders() if k.lower() not in _HOP_BY_HOP}
            if method == "HEAD" and answer.getheader("Content-Length"):
                kept["Content-Length"] = answer.getheader("Content-Length", "0")
            return Reply(answer.status, kept, data)
        finally:
            conn.close()

    def route(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Reply:
        """The emulator's answer to ``method target``, translated where obstore writes."""
        reply = self.translate(method, target, {k.lower(): v for k, v in headers.items()}, body)
        if reply is None:
            self.counts["forwarded"] += 1
            reply = self.call(method, target, headers, body)
        return reply

    def translate(self, method: str, target: str, headers: dict[str, str], body: bytes
                  ) -> Reply | None:  # fmt: skip
        """The answer to one of obstore's XML-API writes; None for anything else."""
        url = urlsplit(target)
        bucket, _, raw_key = url.path.lstrip("/").partition("/")
        query = parse_qs(url.query, keep_blank_values=True)
        if (not raw_key or url.path.startswith(_JSON_PREFIXES) or "X-Goog-Algorithm" in query
                or "x-goog-copy-source" in headers):  # fmt: skip
            return None
        bucket, key = unquote(bucket), unquote(raw_key)
        upload_id = query.get("uploadId", [None])[0]
        if method == "PUT" and upload_id is not None:
            return self.put_part(upload_id, query.get("partNumber", [""])[0], body)
        if method == "PUT":
            return self.put(bucket, key, headers, body)
        if method == "POST" and "uploads" in query:
            return self.initiate(bucket, key, headers)
        if method == "POST" and upload_id is not None:
            return self.complete(upload_id, body)
        if method == "DELETE" and upload_id is not None:
            return self.abort(upload_id)
        return None

    def upload(self, bucket: str, key: str, kind: str, data: bytes, match: str | None) -> Reply:
        """A JSON-API multipart upload (the emulator checks ``ifGenerationMatch`` there) of
        ``data``, answered as the XML API answers a put: ETag and x-goog-generation."""
        boundary = uuid.uuid4().hex
        meta = json.dumps({"name": key, "contentType": kind}).encode()
        body = b"".join([
            f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode(),
            meta, f"\r\n--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode(), data,
            f"\r\n--{boundary}--\r\n".encode(),
        ])  # fmt: skip
        params = {"uploadType": "multipart", "name": key}
        if match is not None:
            params["ifGenerationMatch"] = match
        target = f"/upload/storage/v1/b/{quote(bucket, safe='')}/o?{urlencode(params)}"
        kind_header = f"multipart/related; boundary={boundary}"
        answer = self.call("POST", target, {"Content-Type": kind_header}, body)
        if answer.status == 412:
            return _error(412, "PreconditionFailed", f"generation of {key!r} is not {match}")
        if answer.status == 404:
            return _error(404, "NoSuchBucket", f"bucket {bucket!r} not found")
        if answer.status != 200:
            return answer
        made = json.loads(answer.body)
        return Reply(200, {"ETag": f'"{made["md5Hash"]}"', "x-goog-generation":
                           str(made["generation"]), "x-goog-metageneration": "1"})  # fmt: skip

    def put(self, bucket: str, key: str, headers: dict[str, str], body: bytes) -> Reply:
        self.counts["put"] += 1
        kind = headers.get("content-type", "application/octet-stream")
        return self.upload(bucket, key, kind, body, headers.get("x-goog-if-generation-match"))

    def initiate(self, bucket: str, key: str, headers: dict[str, str]) -> Reply:
        self.counts["initiate"] += 1
        upload_id = uuid.uuid4().hex
        kind = headers.get("content-type", "application/octet-stream")
        with self._lock:
            self.uploads[upload_id] = _Upload(bucket, key, kind)
        body = _xml("InitiateMultipartUploadResult", Bucket=bucket, Key=key, UploadId=upload_id)
        return Reply(200, {"Content-Type": "application/xml"}, body)

    def put_part(self, upload_id: str, number: str, body: bytes) -> Reply:
        self.counts["part"] += 1
        if not number.isdigit() or not 1 <= int(number) <= 10000:
            return _error(400, "InvalidArgument", f"bad partNumber {number!r}")
        with self._lock:
            upload = self.uploads.get(upload_id)
            if upload is None:
                return _error(404, "NoSuchUpload", f"no upload {upload_id}")
            upload.parts[int(number)] = body
        return Reply(200, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})  # noqa: S324

    def complete(self, upload_id: str, body: bytes) -> Reply:
        self.counts["complete"] += 1
        with self._lock:
            upload = self.uploads.get(upload_id)
        if upload is None:
            return _error(404, "NoSuchUpload", f"no upload {upload_id}")
        chunks = []
        for part in ET.fromstring(body).iter("Part"):
            number, etag = int(part.findtext("PartNumber", "0")), part.findtext("ETag", "")
            data = upload.parts.get(number)
            if data is None or etag.strip('"') != hashlib.md5(data).hexdigest():  # noqa: S324
                return _error(400, "InvalidPart", f"part {number} of {upload_id} unknown")
            chunks.append(data)
        answer = self.upload(upload.bucket, upload.key, upload.content_type, b"".join(chunks),
                             None)  # fmt: skip
        if answer.status != 200:
            return answer
        with self._lock:
            self.uploads.pop(upload_id, None)
        done = _xml("CompleteMultipartUploadResult", Bucket=upload.bucket, Key=upload.key,
                    ETag=answer.headers["ETag"])  # fmt: skip
        return Reply(200, {**answer.headers, "Content-Type": "application/xml"}, done)

    def abort(self, upload_id: str) -> Reply:
        self.counts["abort"] += 1
        with self._lock:
            self.uploads.pop(upload_id, None)
        return Reply(204)


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while size := int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
        while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        return b"".join(chunks)
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    translator: Translator

    def _serve(self) -> None:
        body = _read_body(self)
        try:
            reply = self.translator.route(self.command, self.path, dict(self.headers), body)
        except OSError as exc:
            reply = _error(502, "BadGateway", f"emulator unreachable: {exc}")
        except Exception as exc:  # a bug here: shown to obstore (and so in the test's failure)
            reply = _error(500, "ProxyError", f"{type(exc).__name__}: {exc}")
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if "Content-Length" not in reply.headers or self.command != "HEAD":
            self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        pass


class GcsXmlProxy:
    """The translating proxy on a free port of 127.0.0.1; a context manager.
    ``counts``: requests seen per translation (``put``, ``initiate``, ``part``, ``complete``,
    ``abort``) and ``forwarded``. ``translator``: another ``Translator`` (a subclass that
    translates more, tests/list_pages.py) instead of this module's."""

    def __init__(self, upstream: str, translator: Translator | None = None) -> None:
        self.translator = translator or Translator(upstream)
        handler = type("Handler", (_Handler,), {"translator": self.translator})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def counts(self) -> collections.Counter[str]:
        return self.translator.counts

    def __enter__(self) -> GcsXmlProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
