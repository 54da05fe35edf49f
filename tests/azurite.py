"""A real Azure Blob Storage emulator for tests: Azurite (npm `azurite`) on 127.0.0.1.

Found in ``$KUBETUNE_AZURITE_DIR``, ``<repo>/.kubetune/azurite`` or ``~/.cache/kubetune/azurite``
(each a folder where ``npm install azurite`` ran; `.ci/run` installs it into the cache one), or
on PATH. Started with telemetry off, on a free port, its data in a temp folder; it dies with
its parent (PR_SET_PDEATHSIG). Containers are created with Microsoft's own client
(azure-storage-blob), independent of the code under test.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s3server import _die_with_parent, free_ports

ACCOUNT = "devstoreaccount1"
# Azurite's published development key (documented by Microsoft; not a secret)
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
_counter = itertools.count()
_ROOT = Path(__file__).resolve().parents[1]


def find_azurite() -> str | None:
    """The `azurite-blob` launcher, or None (with `node` missing too, None)."""
    if shutil.which("node") is None:
        return None
    folders = [os.environ.get("KUBETUNE_AZURITE_DIR", ""), str(_ROOT / ".kubetune" / "azurite"),
               str(Path.home() / ".cache" / "kubetune" / "azurite")]  # fmt: skip
    for folder in filter(None, folders):
        candidate = Path(folder) / "node_modules" / ".bin" / "azurite-blob"
        if candidate.exists():
            return str(candidate)
    return shutil.which("azurite-blob")


@dataclass
class Azurite:
    """A running Azurite blob service; a context manager."""

    binary: str
    port: int = 0
    workdir: Path | None = None
    _proc: subprocess.Popen[bytes] | None = None
    _service: Any = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    def start(self, timeout_s: float = 60.0) -> Azurite:
        self.workdir = Path(tempfile.mkdtemp(prefix="kubetune-azurite-"))
        self.port = free_ports(1)[0]
        args = [self.binary, "--disableTelemetry", "--blobHost", "127.0.0.1",
                "--blobPort", str(self.port), "--location", str(self.workdir),
                "--skipApiVersionCheck", "--silent"]  # fmt: skip
        log = open(self.workdir / "azurite.log", "wb")  # noqa: SIM115 - owned by the process
        self._proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )  # fmt: skip
        log.close()
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        """Poll with a client that does not retry: the SDK's own retries back off for ~15 s
        after the first refused connection, long after the emulator is up (~3 s)."""
        deadline, last = time.monotonic() + timeout_s, None
        probe = self._client(retry_total=0)
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"azurite exited: {self.log_tail()}")
            try:
                probe.get_service_properties()
                return
            except Exception as exc:  # noqa: BLE001 - anything means "not ready yet"
                last = exc
            time.sleep(0.1)
        raise TimeoutError(f"Azurite not ready after {timeout_s}s ({last}): {self.log_tail()}")

    def log_tail(self) -> str:
        log = self.workdir / "azurite.log" if self.workdir else None
        return log.read_text(errors="replace")[-2000:] if log and log.exists() else ""

    def service(self) -> Any:
        """A ``BlobServiceClient`` (azure-storage-blob) for this emulator."""
        if self._service is None:
            self._service = self._client()
        return self._service

    def _client(self, **options: Any) -> Any:
        from azure.storage.blob import BlobServiceClient

        conn = (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};"
                f"AccountKey={ACCOUNT_KEY};BlobEndpoint={self.endpoint};")  # fmt: skip
        return BlobServiceClient.from_connection_string(conn, **options)

    def create_container(self, prefix: str = "test") -> str:
        name = f"{prefix}-{next(_counter)}-{uuid.uuid4().hex[:8]}".lower()[:63]
        self.service().create_container(name)
        return name

    def env(self) -> dict[str, str]:
        """What a pod would get: account, key (from a Secret) and the endpoint."""
        return {"AZURE_STORAGE_ACCOUNT_NAME": ACCOUNT, "AZURE_STORAGE_ACCOUNT_KEY": ACCOUNT_KEY,
                "AZURE_STORAGE_ENDPOINT": self.endpoint}  # fmt: skip

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Azurite:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
