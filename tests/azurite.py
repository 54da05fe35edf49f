"""A real Azure Blob Storage emulator for tests: Azurite (npm `azurite`) on 127.0.0.1.

Found in ``$KUBETUNE_AZURITE_DIR``, ``<repo>/.kubetune/azurite`` or ``~/.cache/kubetune/azurite``
(each a folder where ``npm install azurite`` ran; `.ci/run` installs it into the cache one), or
on PATH. Started with telemetry off, on a free port, its data in a temp folder; it dies with
its parent (PR_SET_PDEATHSIG). Containers are created with Microsoft's own client
(azure-storage-blob), independent of the code under test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emulator_process import Emulator, ServerProcess, free_ports, unique_name

ACCOUNT = "devstoreaccount1"
# Azurite's published development key (documented by Microsoft; not a secret)
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
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
class Azurite(Emulator):
    """A running Azurite blob service; a context manager."""

    binary: str
    port: int = 0
    workdir: Path | None = None
    _proc: ServerProcess | None = None
    _service: Any = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    def start(self, timeout_s: float = 60.0) -> Azurite:
        """Start the emulator and wait until it answers; polled with a client that does not
        retry: the SDK's own retries back off for ~15 s after the first refused connection,
        long after the emulator is up (~3 s)."""
        self.workdir = Path(tempfile.mkdtemp(prefix="kubetune-azurite-"))
        self.port = free_ports(1)[0]
        args = [self.binary, "--disableTelemetry", "--blobHost", "127.0.0.1",
                "--blobPort", str(self.port), "--location", str(self.workdir),
                "--skipApiVersionCheck", "--silent"]  # fmt: skip
        probe = self._client(retry_total=0)
        self._launch("azurite", args, probe.get_service_properties, timeout_s, 0.1,
                     log=self.workdir / "azurite.log")  # fmt: skip
        return self

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
        name = unique_name(prefix)
        self.service().create_container(name)
        return name

    def env(self) -> dict[str, str]:
        """What a pod would get: account, key (from a Secret) and the endpoint."""
        return {"AZURE_STORAGE_ACCOUNT_NAME": ACCOUNT, "AZURE_STORAGE_ACCOUNT_KEY": ACCOUNT_KEY,
                "AZURE_STORAGE_ENDPOINT": self.endpoint}  # fmt: skip

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
