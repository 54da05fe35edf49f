"""A small threaded HTTP/1.1 proxy on 127.0.0.1 that injects storage faults.

It sits between an S3 client and a real server and, for a bounded number of matching
requests, answers 500 InternalError or 503 SlowDown (S3 XML bodies), resets the connection,
forwards only half of the request body (then drops both sides), forwards only half of the
response body, or adds latency. ``down_for(seconds)`` resets every connection for a while.
Every rule has a count and an expiry, every socket a timeout: nothing here can hang a test.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlsplit

FAULTS = ("500", "503", "reset", "cut_request", "cut_response", "latency")
_MAX_HEAD = 64 * 1024
_ERRORS = {
    "500": (b"500 Internal Server Error", b"InternalError", b"We encountered an internal error."),
    "503": (b"503 Slow Down", b"SlowDown", b"Please reduce your request rate."),
}


@dataclass
class Rule:
    """Inject ``fault`` into the next ``remaining`` requests matching method/path."""

    fault: str
    remaining: int
    method: str | None = None
    path_contains: str | None = None
    delay_s: float = 0.5
    expires_at: float = float("inf")

    def matches(self, method: str, path: str) -> bool:
        return (
            self.remaining > 0
            and time.monotonic() < self.expires_at
            and (self.method is None or self.method == method)
            and (self.path_contains is None or self.path_contains in path)
        )


class _Closed(Exception):
    """The peer closed the connection."""


def _read_head(f: BinaryIO) -> list[bytes] | None:
    """Start line + header lines of one HTTP message; None on a clean EOF."""
    lines: list[bytes] = []
    size = 0
    while True:
        line = f.readline(_MAX_HEAD)
        if not line:
            if lines:
                raise _Closed("EOF inside a message head")
            return None
        size += len(line)
        if size > _MAX_HEAD:
            raise _Closed("message head too large")
        if line in (b"\r\n", b"\n"):
            return lines
        lines.append(line.rstrip(b"\r\n"))


def _header(lines: list[bytes], name: bytes) -> bytes | None:
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise _Closed(f"expected {n} bytes, got {len(data)}")
    return data


def _read_body(
    f: BinaryIO, head: list[bytes], *, no_body: bool = False, request: bool = False
) -> tuple[bytes, bool]:
    """Raw body bytes (chunk framing kept) and whether the body ended with the connection.
    A request without Content-Length / chunked encoding has no body; a response reads to EOF."""
    if no_body:
        return b"", False
    if (_header(head, b"transfer-encoding") or b"").lower() == b"chunked":
        out = bytearray()
        while True:
            size_line = f.readline(_MAX_HEAD)
            out += size_line
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (trailer := f.readline(_MAX_HEAD)) not in (b"\r\n", b"\n", b""):
                    out += trailer
                return bytes(out + b"\r\n"), False
            out += _read_exact(f, size + 2)
    length = _header(head, b"content-length")
    if length is not None:
        return _read_exact(f, int(length)), False
    if request:
        return b"", False
    return f.read(), True


def _reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _error_response(fault: str) -> bytes:
    status, code, message = _ERRORS[fault]
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>' + code + b"</Code><Message>"
        + message + b"</Message><RequestId>faultproxy</RequestId></Error>"
    )  # fmt: skip
    head = (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/xml\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    return head + body


class FaultProxy:
    """Proxy 127.0.0.1:<port> → ``upstream`` (an http:// endpoint), injecting faults."""

    def __init__(self, upstream: str, *, max_delay_s: float = 5.0, timeout_s: float = 30.0):
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError("the fault proxy only forwards to 127.0.0.1")
        self.upstream = ("127.0.0.1", parts.port or 80)
        self.max_delay_s = max_delay_s
        self.timeout_s = timeout_s
        self.requests = 0
        self.injected: list[tuple[str, str, str]] = []  # (fault, method, path)
        self._rules: list[Rule] = []
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        assert self._listener is not None, "proxy not started"
        return self._listener.getsockname()[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        threading.Thread(target=self._accept_loop, name="faultproxy", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            socks, self._socks = list(self._socks), set()
        for s in socks:
            _reset(s)

    def __enter__(self) -> FaultProxy:
        return self.start() if self._listener is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def inject(
        self,
        fault: str,
        count: int = 1,
        *,
        method: str | None = None,
        path_contains: str | None = None,
        delay_s: float = 0.5,
        ttl_s: float = 120.0,
    ) -> Rule:
        """Inject ``fault`` into the next ``count`` matching requests (within ``ttl_s``)."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {FAULTS}")
        rule = Rule(fault, count, method, path_contains, min(delay_s, self.max_delay_s),
                    time.monotonic() + ttl_s)  # fmt: skip
        with self._lock:
            self._rules.append(rule)
        return rule

    def down_for(self, seconds: float) -> None:
        """Reset every connection and request for ``seconds`` (at most 60)."""
        with self._lock:
            self._down_until = time.monotonic() + min(seconds, 60.0)

    def pending(self) -> int:
        """Injections not yet used (ignoring expired rules)."""
        now = time.monotonic()
        with self._lock:
            return sum(r.remaining for r in self._rules if now < r.expires_at)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self._down_until = 0.0

    def _is_down(self) -> bool:
        return time.monotonic() < self._down_until

    def _take(self, method: str, path: str) -> Rule | None:
        with self._lock:
            self.requests += 1
            for rule in self._rules:
                if rule.matches(method, path):
                    rule.remaining -= 1
                    self.injected.append((rule.fault, method, path))
                    return rule
        return None

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._is_down():
                _reset(client)
                continue
            client.settimeout(self.timeout_s)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            cf = client.makefile("rb")
            uf: BinaryIO | None = None
            while not self._stopped.is_set():
                head = _read_head(cf)
                if head is None:
                    return
                if upstream is None:
                    upstream = socket.create_connection(self.upstream, timeout=self.timeout_s)
                    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    with self._lock:
                        self._socks.add(upstream)
                    uf = upstream.makefile("rb")
                assert uf is not None
                if not self._exchange(client, cf, upstream, uf, head):
                    return
        except (_Closed, OSError, ValueError):
            return
        finally:
            _reset(client)
            if upstream is not None:
                _reset(upstream)
            with self._lock:
                self._socks.discard(client)
                self._socks.discard(upstream)  # type: ignore[arg-type]

    def _exchange(
        self, client: socket.socket, cf: BinaryIO, upstream: socket.socket, uf: BinaryIO,
        head: list[bytes],
    ) -> bool:  # fmt: skip
        """Relay one request/response; False when the connection must end."""
        method, path = (head[0].split(b" ") + [b"", b""])[:2]
        rule = self._take(method.decode(), path.decode(errors="replace"))
        fault = rule.fault if rule else None
        if self._is_down() or fault == "reset":
            return False
        if (_header(head, b"expect") or b"").lower() == b"100-continue":
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            head = [line for line in head if not line.lower().startswith(b"expect:")]
        body, _ = _read_body(cf, head, request=True)
        if fault == "latency" and rule is not None:
            time.sleep(rule.delay_s)
        if fault in _ERRORS:
            client.sendall(_error_response(fault))
            return True
        raw_head = b"\r\n".join(head) + b"\r\n\r\n"
        if fault == "cut_request":
            upstream.sendall(raw_head + body[: len(body) // 2])
            return False
        upstream.sendall(raw_head + body)
        resp_head = _read_head(uf)
        if resp_head is None:
            return False
        status = int(resp_head[0].split(b" ")[1])
        no_body = method == b"HEAD" or status in (204, 304) or 100 <= status < 200
        resp_body, until_close = _read_body(uf, resp_head, no_body=no_body)
        raw_resp = b"\r\n".join(resp_head) + b"\r\n\r\n"
        if fault == "cut_response":
            client.sendall(raw_resp + resp_body[: len(resp_body) // 2])
            return False
        client.sendall(raw_resp + resp_body)
        closing = b"close" in (_header(resp_head, b"connection") or b"").lower()
        return not (until_close or closing)
