"""The `launcher ui` web server (Starlette on uvicorn): the page, its static files, and a
small JSON API over launcher.ui's modules. Every answer to bad input is a one-line
`{"error": ...}`; the page shows it where it was asked."""

from __future__ import annotations

import contextlib
import errno
import json
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from kubetune.errors import KubetuneError
from launcher.ui import security
from launcher.ui.runs import Runs
from launcher.ui.security import UiSettings

STATIC = Path(__file__).parent / "static"
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class UiState:
    """What the handlers share: settings, the forms (built once), the run backends."""

    def __init__(
        self, settings: UiSettings, classes: Iterable[type[BaseModel]] | None, runs: Runs | None
    ) -> None:
        from launcher.ui.forms import forms

        if classes is None:
            from kubetune.config import PIPELINE_CLASSES

            classes = PIPELINE_CLASSES
        self.settings = settings
        self.forms_json = json.dumps({"tabs": starters(forms(classes), settings)}).encode()
        self.runs = runs or Runs(local_only=settings.local_only, cluster_only=settings.cluster_only)
        page = (STATIC / "index.html").read_text(encoding="utf-8")
        self.page = _targets(page.replace("{{csrf}}", settings.csrf), settings)


def starters(tabs: list[dict[str, Any]], settings: UiSettings) -> list[dict[str, Any]]:
    """Each tab with the `launcher init` starter it opens on (paths under the first root)."""
    from launcher.ui.configs import starter_values

    base = settings.roots[0] if settings.roots else None
    return [{**tab, "starter": starter_values(tab["type"], base)} for tab in tabs]


def _targets(page: str, settings: UiSettings) -> str:
    """The page offers only the places this server may run training."""
    for value, dropped in (("local", settings.cluster_only), ("cluster", settings.local_only)):
        if dropped:
            page = re.sub(rf'<option value="{value}">[^<]*</option>', "", page)
    return page


def create_app(
    settings: UiSettings,
    *,
    classes: Iterable[type[BaseModel]] | None = None,
    runs: Runs | None = None,
) -> Starlette:
    """The app; `classes` (default: every training type) gives the tabs."""
    state = UiState(settings, classes, runs)
    app = Starlette(
        routes=_routes(),
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=_guard)],
    )
    app.state.ui = state
    return app


def _routes() -> list[Any]:
    from launcher.ui import handlers as h

    return [
        Route("/", index),
        Route("/favicon.ico", lambda _: Response(status_code=204)),
        Route("/api/forms", forms_route),
        Route("/api/reference", h.reference, methods=["POST"]),
        Route("/api/generate", h.generate, methods=["POST"]),
        Route("/api/save", h.save, methods=["POST"]),
        Route("/api/submit", h.submit, methods=["POST"]),
        Route("/api/dataset", h.dataset, methods=["POST"]),
        Route("/api/runs", h.runs),
        Route("/api/runs/{backend}/{run}", h.run_detail),
        Route("/api/runs/{backend}/{run}/logs", h.run_logs),
        Route("/api/runs/{backend}/{run}/cancel", h.run_cancel, methods=["POST"]),
        Route("/api/runs/{backend}/{run}/pull", h.run_pull, methods=["POST"]),
        Route("/api/runs/{backend}/{run}/resume", h.run_resume, methods=["POST"]),
        Route("/api/runs/{backend}/{run}/files/{key:path}", h.run_file),
        Route("/api/sweeps/{backend}/{sweep}", h.sweep),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]


async def _guard(request: Request, call_next: Any) -> Response:
    settings: UiSettings = request.app.state.ui.settings
    if not security.host_ok(settings, request.headers.get("host", "")):
        return PlainTextResponse("unexpected Host header", status_code=400)
    given = request.query_params.get("token")
    if settings.token and given and request.url.path == "/" and given == settings.token:
        response: Response = RedirectResponse("/", status_code=303)
        response.set_cookie(security.TOKEN_COOKIE, given, httponly=True, samesite="strict")
        return response
    if not security.token_ok(settings, request.headers, request.cookies):
        return PlainTextResponse(
            "token required: open the URL `launcher ui` printed, or send "
            "Authorization: Bearer <token>",
            status_code=401,
        )
    if not security.csrf_ok(settings, request.method, request.headers):
        return PlainTextResponse("cross-site request refused", status_code=403)
    response = await call_next(request)
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    return response


async def index(request: Request) -> Response:
    return Response(request.app.state.ui.page, media_type="text/html; charset=utf-8")


async def forms_route(request: Request) -> Response:
    return Response(request.app.state.ui.forms_json, media_type="application/json")


@contextlib.contextmanager
def serve_in_thread(app: Starlette, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` on uvicorn in a thread (tests, benchmarks); yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the UI server did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def serve(settings: UiSettings, *, open_browser: bool = False) -> None:
    """Serve until interrupted; print the URL (with the token, on this terminal only) once
    the port is ours (the one `--port 0` got)."""
    import uvicorn

    app = create_app(settings)
    sock = _listen(settings.host, settings.port)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"http://{host}:{sock.getsockname()[1]}/"
    shown = f"{url}?token={settings.token}" if settings.token else url
    print(f"kubetune ui: {shown}  (Ctrl-C stops it)", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(shown)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one line saying why not (a port another server
    holds, an address this machine does not have, a port below 1024 without root)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as err:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if err.errno == errno.EADDRINUSE:
            raise KubetuneError(
                f"{where} is in use (another `launcher ui`, or another server)",
                hint="pass --port N for a free one, or --port 0 for any",
            ) from None
        raise KubetuneError(f"cannot listen on {where}: {err.strerror or err}") from None
