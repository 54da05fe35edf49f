"""The JSON API's handlers: parse the request, call launcher.ui's modules in the thread
pool, answer JSON; a kubetune error is a one-line `{"error": ...}`."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kubetune.errors import KubetuneError, UserError
from launcher.ui import configs, security
from launcher.ui.runs import one_line
from launcher.ui.security import UiSettings

TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".html": "text/html; charset=utf-8"}
REPORT_CSP = (
    "sandbox allow-scripts; default-src 'none'; img-src 'self' data:; "
    "style-src 'unsafe-inline'; script-src 'unsafe-inline'"
)


async def call(fn: Any, *args: Any, **kwargs: Any) -> JSONResponse:
    """Run a blocking function in the thread pool; a kubetune error is a one-line 400."""
    try:
        return JSONResponse(await run_in_threadpool(fn, *args, **kwargs))
    except UserError as err:
        return JSONResponse({"error": one_line(err)}, status_code=400)
    except KubetuneError as err:
        return JSONResponse({"error": one_line(err)}, status_code=502)
    except Exception as err:  # noqa: BLE001 - the page shows one line, never a broken page
        return JSONResponse({"error": f"{type(err).__name__}: {one_line(err)}"}, status_code=500)


async def body(request: Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError:
        raise UserError("the request body is not JSON") from None
    if not isinstance(data, dict):
        raise UserError("the request body is not a JSON object")
    return data


def reload_text(settings: UiSettings, data: dict[str, Any]) -> dict[str, Any]:
    """The reference config's text: uploaded, or read from a path (checked)."""
    if isinstance(data.get("text"), str):
        name = str(data.get("name") or "upload")
        return configs.reload_reference(data["text"], name, settings.roots[0])
    path = security.checked_path(settings, str(data.get("path") or ""), "reference config")
    if not path.is_file():
        return {"error": f"{data.get('path')}: no such file"}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        return {"error": f"{data.get('path')}: cannot read: {err}"}
    return configs.reload_reference(text, str(data.get("path")), path.parent)


def save_text(settings: UiSettings, data: dict[str, Any]) -> dict[str, Any]:
    """Write the generated YAML: `{"saved": path}`; `{"exists": path}` for a file that is
    already there, until the request says `overwrite` (the page asks for a second Save)."""
    path = security.checked_path(settings, str(data.get("path") or ""), "save path")
    text = data.get("text")
    if not isinstance(text, str) or not text:
        raise UserError("nothing to save: Generate Config first")
    if path.exists() and data.get("overwrite") is not True:
        return {"exists": str(path)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror}") from None
    return {"saved": str(path)}


def _ui(request: Request) -> Any:
    return request.app.state.ui


Handler = Callable[[Request, dict[str, Any]], Awaitable[Response]]


def with_body(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """A POST handler that gets the request's JSON object (a bad body is a one-line 400)."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        try:
            data = await body(request)
        except UserError as err:
            return JSONResponse({"error": one_line(err)}, status_code=400)
        return await handler(request, data)

    return wrapper


@with_body
async def reference(request: Request, data: dict[str, Any]) -> Response:
    return await call(reload_text, _ui(request).settings, data)


@with_body
async def generate(request: Request, data: dict[str, Any]) -> Response:
    return await call(configs.generate, data.get("values"), _ui(request).settings.roots[0])


@with_body
async def save(request: Request, data: dict[str, Any]) -> Response:
    return await call(save_text, _ui(request).settings, data)


@with_body
async def submit(request: Request, data: dict[str, Any]) -> Response:
    from launcher.ui.submit import start_training

    given = data.get("sweeps")
    sweeps = [str(s).strip() for s in given if str(s).strip()] if isinstance(given, list) else []
    ui = _ui(request)
    return await call(
        start_training,
        data.get("values"),
        target="cluster" if data.get("target") == "cluster" else "local",
        sweeps=sweeps,
        replace=bool(data.get("replace")),
        runs=ui.runs,
        settings=ui.settings,
    )


@with_body
async def dataset(request: Request, data: dict[str, Any]) -> Response:
    from launcher.ui.dataset_preview import preview

    return await call(preview, data.get("values"), _ui(request).settings)


async def runs(request: Request) -> Response:
    return await call(_ui(request).runs.listing)


async def run_detail(request: Request) -> Response:
    p = request.path_params
    return await call(_ui(request).runs.detail, p["backend"], p["run"])


async def run_logs(request: Request) -> Response:
    p = request.path_params
    raw = request.query_params.get("lines", "")
    lines = min(int(raw), 5000) if raw.isdigit() else 200
    return await call(lambda: {"lines": _ui(request).runs.logs(p["backend"], p["run"], lines)})


async def sweep(request: Request) -> Response:
    p = request.path_params
    return await call(_ui(request).runs.sweep, p["backend"], p["sweep"])


@with_body
async def run_pull(request: Request, data: dict[str, Any]) -> Response:
    p, ui = request.path_params, _ui(request)

    def pull() -> dict[str, Any]:
        dest = security.checked_path(ui.settings, str(data.get("path") or ""), "pull folder")
        return ui.runs.pull(p["backend"], p["run"], dest)

    return await call(pull)


async def run_cancel(request: Request) -> Response:
    p = request.path_params
    return await call(_ui(request).runs.cancel, p["backend"], p["run"])


async def run_resume(request: Request) -> Response:
    from launcher.ui.submit import resume_run

    p = request.path_params
    return await call(resume_run, _ui(request).runs, p["backend"], p["run"])


async def run_file(request: Request) -> Response:
    p = request.path_params
    key = p["key"]
    try:
        data = await run_in_threadpool(_ui(request).runs.file, p["backend"], p["run"], key)
    except FileNotFoundError:
        return JSONResponse({"error": f"{key}: not there (yet)"}, status_code=404)
    except KubetuneError as err:
        return JSONResponse({"error": one_line(err)}, status_code=400)
    suffix = key[key.rfind(".") :] if "." in key else ""
    response = Response(data, media_type=TYPES.get(suffix, "application/octet-stream"))
    if suffix == ".html":
        response.headers["Content-Security-Policy"] = REPORT_CSP
    elif suffix not in TYPES:
        name = key.rsplit("/", 1)[-1]
        response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return response
