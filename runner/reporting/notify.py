"""Webhook notifications (the `notify:` section): JSON POSTs about a run's events, sent from a
background thread with bounded retries. Nothing here blocks or fails training: a full queue
drops the event, an endpoint that keeps failing is logged and skipped. Torch-free."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.config.notify import HMAC_ENV, NotifyConfig, url_env

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "X-Kubetune-Signature"
EVENT_HEADER = "X-Kubetune-Event"
QUEUE_SIZE = 64
_STOP = object()


def sign(secret: str, body: bytes) -> str:
    """The signature header value: ``sha256=<hex HMAC-SHA256 of the body>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Target:
    """One resolved endpoint and the events it wants."""

    url: str
    events: frozenset[str]


def resolve_targets(cfg: NotifyConfig, env: Mapping[str, str]) -> list[Target]:
    """Webhook URLs from the config or their Secret-fed environment variables."""
    targets = []
    for index, hook in enumerate(cfg.webhooks):
        url = hook.url or env.get(url_env(index))
        if not url:
            log.warning(
                "notify.webhooks[%d]: %s is not set; this webhook is skipped", index, url_env(index)
            )
            continue
        targets.append(Target(url, frozenset(hook.events)))
    return targets


class Notifier:
    """``emit(event, **fields)`` queues a notification; ``close(timeout)`` drains the queue
    for at most ``timeout`` seconds. With no ``notify:`` section both do nothing."""

    def __init__(
        self,
        cfg: NotifyConfig | None,
        context: Mapping[str, Any],
        env: Mapping[str, str] | None = None,
        *,
        backoff_s: float = 1.0,
    ) -> None:
        env = os.environ if env is None else env
        self.cfg, self.context, self.backoff_s = cfg, dict(context), backoff_s
        self.targets = resolve_targets(cfg, env) if cfg else []
        self.secret = env.get(HMAC_ENV) if cfg and cfg.hmac_secret else None
        if cfg and cfg.hmac_secret and not self.secret:
            log.warning("notify.hmac_secret: %s is not set; notifications are off", HMAC_ENV)
            self.targets = []
        self._queue: queue.Queue[Any] = queue.Queue(QUEUE_SIZE)
        self._thread: threading.Thread | None = None
        self._abandon = threading.Event()
        if self.targets:
            self._thread = threading.Thread(target=self._work, name="notify", daemon=True)
            self._thread.start()

    def emit(self, event: str, **fields: Any) -> None:
        """Queue ``event`` for every webhook that wants it (never blocks, never raises)."""
        if not any(event in t.events for t in self.targets):
            return
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        payload = {"event": event, "time": now, **self.context, **fields}
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            log.warning("notify: queue full, dropping the %s event", event)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued, waiting at most ``timeout`` seconds; then stop."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self._queue.put(_STOP, timeout=max(0.01, deadline - time.monotonic()))
                break
            except queue.Full:
                continue
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._abandon.set()  # the worker drops what is left instead of sending it
            log.warning("notify: gave up waiting for webhooks after %.0fs", timeout)
        self._thread = None

    def _work(self) -> None:
        while (payload := self._queue.get()) is not _STOP:
            if self._abandon.is_set():
                continue
            body = json.dumps(payload, default=str).encode()
            for target in self.targets:
                if payload["event"] in target.events:
                    self._post(target.url, payload["event"], body)

    def _post(self, url: str, event: str, body: bytes) -> bool:
        """POST with bounded retries (network errors, 429 and 5xx); True once delivered."""
        assert self.cfg is not None
        headers = {"Content-Type": "application/json", EVENT_HEADER: event}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        for attempt in range(1, self.cfg.max_attempts + 1):
            error = _send(url, body, headers, self.cfg.timeout_seconds)
            if error is None:
                return True
            retryable = not error.startswith("HTTP 4") or error.startswith("HTTP 429")
            if not retryable or attempt == self.cfg.max_attempts or self._abandon.is_set():
                log.warning("notify: %s to %s dropped: %s", event, _host(url), error)
                return False
            self._abandon.wait(self.backoff_s * 2 ** (attempt - 1))
        return False


def _send(url: str, body: bytes, headers: dict[str, str], timeout: float) -> str | None:
    """One POST; None on a 2xx answer, else a short reason."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            response.read()
        return None
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}"
    except (urllib.error.URLError, OSError, ValueError) as err:
        return str(getattr(err, "reason", err))


def _host(url: str) -> str:
    """The URL without its path (which may carry a token) for log lines."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/')[0]}"
