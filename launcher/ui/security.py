"""What keeps `launcher ui` safe: loopback by default, a token for any other bind, CSRF and
Host checks on every request, paths kept under the started-with folders, secrets redacted."""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.errors import UserError

TOKEN_ENV = "KUBETUNE_UI_TOKEN"
TOKEN_COOKIE = "kubetune_ui_token"
CSRF_HEADER = "x-kubetune-csrf"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
SECRET_ENV_HINTS = ("SECRET", "TOKEN", "PASSWORD", "KEY", "CREDENTIAL")
"""Environment variables whose names hold one of these words are never shown: their values
are replaced by *** in every text the page gets (logs, errors)."""
MIN_SECRET_LEN = 6


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost` are loopback; any other name or address is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class UiSettings:
    """How the server was started: bind, token, the folders it may read and write."""

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    roots: list[Path] = field(default_factory=lambda: [Path.cwd()])
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    local_only: bool = False
    """Never contact a cluster (runs listed and submitted locally only)."""
    cluster_only: bool = False
    """Never run training on this machine (the chart's in-cluster UI: its pod is no GPU
    node): runs are submitted to, and listed from, the cluster only."""

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def restricted(self) -> bool:
        """Paths stay under `roots` (any bind beyond loopback)."""
        return not self.loopback


def settings_for(
    host: str,
    port: int,
    roots: list[Path],
    *,
    new_token: bool = False,
    local_only: bool = False,
    cluster_only: bool = False,
) -> UiSettings:
    """Check the bind: beyond loopback a token is required (from KUBETUNE_UI_TOKEN, or a
    fresh one with `new_token`); UserError (exit 2) otherwise."""
    token = os.environ.get(TOKEN_ENV) or None
    if token is None and new_token:
        token = secrets.token_urlsafe(24)
    if not is_loopback(host) and not token:
        raise UserError(
            f"--host {host} is reachable from other machines and needs a token",
            hint=f"set {TOKEN_ENV} (e.g. from a Secret) or pass --new-token; "
            "or keep the default --host 127.0.0.1",
        )
    if token is not None and len(token) < 16:
        raise UserError(f"{TOKEN_ENV} is too short", hint="use at least 16 random characters")
    if local_only and cluster_only:
        raise UserError("--local-only and --cluster-only exclude each other", hint="pass one")
    resolved = [r.expanduser().resolve() for r in roots]
    return UiSettings(host, port, token, resolved, local_only=local_only, cluster_only=cluster_only)


def token_ok(settings: UiSettings, headers: Any, cookies: dict[str, str]) -> bool:
    """The request carries the token (cookie or `Authorization: Bearer`); always true when
    the server has none."""
    if settings.token is None:
        return True
    given = cookies.get(TOKEN_COOKIE) or ""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:]
    return hmac.compare_digest(given.encode(), settings.token.encode())


def host_ok(settings: UiSettings, host_header: str) -> bool:
    """On loopback only loopback Host headers are served (no DNS rebinding)."""
    if not settings.loopback:
        return True
    name = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
    return is_loopback(name.strip("[]"))


def csrf_ok(settings: UiSettings, method: str, headers: Any) -> bool:
    """A state-changing request must carry the page's CSRF value in a header (a cross-site
    form cannot set one) and, if the browser says, come from this origin."""
    if method in SAFE_METHODS:
        return True
    if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = headers.get("origin")
    if origin and origin.split("://", 1)[-1] != headers.get("host", ""):
        return False
    return hmac.compare_digest(headers.get(CSRF_HEADER, "").encode(), settings.csrf.encode())


def checked_path(settings: UiSettings, raw: str, what: str = "path") -> Path:
    """`raw` as a path; beyond loopback it must lie under one of the started-with folders
    (UserError otherwise). Relative paths are relative to the first folder."""
    if not raw or not raw.strip():
        raise UserError(f"{what}: empty", hint="give a file path")
    path = Path(raw.strip()).expanduser()
    if not path.is_absolute():
        path = settings.roots[0] / path
    path = path.resolve()
    if settings.restricted and not any(path.is_relative_to(r) for r in settings.roots):
        folders = ", ".join(str(r) for r in settings.roots)
        raise UserError(f"{what} {raw!r} is outside the folders this UI serves ({folders})")
    return path


def redact(text: str, env: dict[str, str] | None = None) -> str:
    """`text` with the value of every secret-looking environment variable replaced."""
    for name, value in (env if env is not None else os.environ).items():
        if len(value) >= MIN_SECRET_LEN and any(h in name.upper() for h in SECRET_ENV_HINTS):
            text = text.replace(value, "***")
    return text
