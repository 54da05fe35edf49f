"""The run lease: one writer per run.

A runner creates ``lease.json`` under the run's location with a conditional create
(``If-None-Match: *`` on S3 and Azure, ``ifGenerationMatch=0`` on GCS, a hard link of a complete
temp file locally), renews it from a heartbeat thread with compare-and-swap (on the tag it last
wrote) and deletes it on exit. The store must declare ``Capability.CONDITIONAL_WRITE``. A second
runner waits up to ``wait_s`` for the lease to be released or to go stale (not renewed for
``timeout_s``: a killed pod), then takes a stale lease over (logged) or exits 2 naming the
holder. A lease whose holder ran on this host and PID namespace and has exited (a SIGKILLed
local run) is taken over at once. A holder whose renewal fails because someone else took over is
*lost*: ``check()`` raises ``LeaseLost`` and ``kubetune.storage.run_store.RunStore`` refuses
every further write.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from kubetune.errors import LeaseLost, RunLocked, StorageError, StorageUserError
from kubetune.layout import LEASE_KEY, utc_now
from kubetune.storage.base import Capability, ObjectStore, supports
from kubetune.storage.run_store import RetryPolicy

log = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass(frozen=True)
class LeaseSettings:
    """How long a lease lives without renewal, and how long a second runner waits."""

    timeout_s: float = 120.0
    wait_s: float = 180.0

    @property
    def heartbeat_s(self) -> float:
        return self.timeout_s / 4


def default_holder() -> str:
    """``host/pid``: on Kubernetes the host name is the pod name."""
    return f"{os.environ.get('KUBETUNE_POD_NAME') or socket.gethostname()}/{os.getpid()}"


class Lease:
    """Acquire with ``acquire()`` (or ``with``), ``check()`` before writing, ``release()``."""

    def __init__(
        self, store: ObjectStore, settings: LeaseSettings, *, holder: str | None = None
    ) -> None:
        if not supports(store, Capability.CONDITIONAL_WRITE):
            raise StorageUserError(
                f"{store.uri}: this storage has no conditional writes, so no run lease",
                hint="use a local folder, s3://, gs:// or az:// for the run's outputs",
            )
        self.store = store
        self.settings = settings
        self.holder = holder or default_holder()
        self.token = uuid.uuid4().hex
        self._tag: str | None = None
        self._acquired_at = ""
        self._confirmed = 0.0
        self._lost: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking it ------------------------------------------------------------------------------

    def acquire(self, *, heartbeat: bool = True) -> Lease:
        """Take the lease (waiting up to ``wait_s`` for a live holder); ``RunLocked`` if not."""
        deadline = time.monotonic() + self.settings.wait_s
        announced = False
        while True:
            holder = self._try_take()
            if holder is None:
                break
            if time.monotonic() >= deadline:
                raise RunLocked(
                    f"another runner holds this run: {_describe(holder)}",
                    hint="wait for it to finish, cancel it, or use another run name",
                )
            if not announced:
                log.warning("waiting for the run lease held by %s", _describe(holder))
                announced = True
            time.sleep(min(self.settings.heartbeat_s, 1.0))
        if heartbeat:
            self._thread = threading.Thread(target=self._beat, name="lease", daemon=True)
            self._thread.start()
        log.info("this process (%s) is now the run's only writer (lease.json); another "
                 "runner started on this run waits until it stops", self.holder)  # fmt: skip
        return self

    def _try_take(self) -> dict[str, Any] | None:
        """Create or take over the lease; the live holder's record if neither worked."""
        self._acquired_at = utc_now()
        body = self._body()
        self._call(lambda: self.store.create(LEASE_KEY, body))
        if self._ours():  # created now, or by an attempt whose reply was lost
            return None
        try:
            raw, tag = self._call(lambda: self.store.read_tagged(LEASE_KEY))
        except FileNotFoundError:  # released in between: try again at once
            return self._try_take()
        current = _parse(raw)
        gone = _holder_gone(current)
        if (
            not gone
            and time.time() - float(current.get("renewed_unix", 0)) < self.settings.timeout_s
        ):
            return current
        body = self._body()
        self._call(lambda: self.store.replace_if(LEASE_KEY, body, tag))
        if not self._ours():
            return current  # someone else took it over first
        idle = time.time() - float(current.get("renewed_unix", 0))
        why = "its process is gone" if gone else f"stale: not renewed for {idle:.0f}s"
        log.warning("took over the run lease from %s (%s)", _describe(current), why)
        return None

    def _body(self) -> bytes:
        record = {
            "holder": self.holder,
            "token": self.token,
            "acquired_at": self._acquired_at,
            "renewed_at": utc_now(),
            "renewed_unix": time.time(),
            **_process_id(),
            "timeout_s": self.settings.timeout_s,
        }
        return json.dumps(record, indent=1).encode()

    # -- keeping it -----------------------------------------------------------------------------

    def renew(self) -> None:
        """Rewrite the lease if we still hold it; marks it lost (and raises) if not."""
        with self._lock:
            if self._lost is not None:
                raise LeaseLost(self._lost)
            assert self._tag is not None, "renew() before acquire()"
            body, tag = self._body(), self._tag
            self._call(lambda: self.store.replace_if(LEASE_KEY, body, tag))
            if self._ours():
                return
            self._lost = f"this runner's lease on the run was taken over by {self._current()}"
            log.error("%s; no further writes", self._lost)
            raise LeaseLost(self._lost, hint="another runner now owns this run")

    def _ours(self) -> bool:
        """Whether the lease carries our token (the truth after a conditional write, even one
        whose reply was lost and whose retry then failed its condition); records its tag."""
        try:
            raw, tag = self._call(lambda: self.store.read_tagged(LEASE_KEY))
        except FileNotFoundError:
            return False
        if _parse(raw).get("token") != self.token:
            return False
        self._tag, self._confirmed = tag, time.monotonic()
        return True

    def _call(self, fn: Callable[[], _T]) -> _T:
        """A lease request, with transient failures retried for about a heartbeat."""
        policy = RetryPolicy(attempts=5, backoff_s=0.2, backoff_max_s=self.settings.heartbeat_s)
        return policy.call(fn, f"lease {LEASE_KEY}")

    def _current(self) -> str:
        try:
            return _describe(_parse(self.store.read_tagged(LEASE_KEY)[0]))
        except (FileNotFoundError, StorageError):
            return "nobody (the lease is gone)"

    def check(self) -> None:
        """Raise ``LeaseLost`` unless this runner still holds the lease (renewing it if the
        last confirmation is older than a heartbeat)."""
        if self._lost is not None:
            raise LeaseLost(self._lost, hint="another runner now owns this run")
        if time.monotonic() - self._confirmed > self.settings.heartbeat_s:
            self.renew()

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                self.renew()
            except LeaseLost:
                return
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried; stale only later
                log.warning("renewing the run lease failed (retrying): %s", exc)

    # -- giving it back -------------------------------------------------------------------------

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (never someone else's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            if self._tag is None or self._lost is not None:
                return
            tag = self._tag
            try:
                if self._call(lambda: self.store.delete_if(LEASE_KEY, tag)):
                    log.info("released the run lease")
            except Exception as exc:  # noqa: BLE001 - it goes stale by itself
                log.warning("could not release the run lease (it expires by itself): %s", exc)
            self._tag = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _process_id() -> dict[str, Any]:
    """Where this process lives: host name, PID namespace and PID."""
    return {"host": socket.gethostname(), "pid_ns": _pid_namespace(), "pid": os.getpid()}


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "unknown"


def _holder_gone(record: dict[str, Any]) -> bool:
    """True when the holder ran on this host, in this PID namespace, and its process has exited
    (a SIGKILLed local run): then nobody needs to wait for the timeout. Any doubt (another host
    or container, an unknown namespace, a PID in use) means the holder may be alive."""
    here = _process_id()
    if record.get("host") != here["host"] or record.get("pid_ns") != here["pid_ns"]:
        return False
    if here["pid_ns"] == "unknown" or not isinstance(record.get("pid"), int):
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except ValueError:
        return {"holder": "an unreadable lease"}
    return record if isinstance(record, dict) else {"holder": "an unreadable lease"}


def _describe(record: dict[str, Any]) -> str:
    since = record.get("acquired_at") or "?"
    renewed = record.get("renewed_at") or "?"
    return f"{record.get('holder', '?')} (since {since}, last renewed {renewed})"
