"""The HTTP side of the fake API server in `k8s_fake` (routing, JSON, chunked streams).

Split from k8s_fake.py to keep both files small; see that module for what the fake models.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlparse

from k8s_fake import KINDS, ApiError, FakeKube, Obj


def _version_info(major: str, minor: str) -> Obj:
    """GET /version as a real API server answers it (every field the client requires)."""
    git = f"v{major}.{minor.rstrip('+')}.0"
    return {
        "major": major,
        "minor": minor,
        "gitVersion": git,
        "gitCommit": "0" * 40,
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.22.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    }


def _served(fake: FakeKube) -> dict[str, list[str]]:
    """Group/version → plurals the fake serves under /apis (CRDs only when installed)."""
    out: dict[str, list[str]] = {"batch/v1": ["jobs"]}
    for plural in sorted(fake.crds):
        out.setdefault(KINDS[plural][1], []).append(plural)
    return out


def _discovery(fake: FakeKube, path: str) -> Obj | None:
    """GET /apis/<group>/<version>: the APIResourceList, as a real server answers it."""
    group_version = path.strip("/").removeprefix("apis/")
    plurals = _served(fake).get(group_version)
    if plurals is None:
        return None
    resources = [
        {"name": p, "singularName": "", "namespaced": True, "kind": KINDS[p][0],
         "verbs": ["create", "delete", "get", "list", "watch"]}
        for p in plurals
    ]  # fmt: skip
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": resources}  # fmt: skip


def _route(path: str, fake: FakeKube) -> tuple[str, str, str | None, str | None]:
    """URL path → (plural, namespace, name, subresource)."""
    parts = path.strip("/").split("/")
    served = _served(fake)
    if parts[:2] == ["api", "v1"]:
        rest = parts[2:]
    elif parts[:1] == ["apis"] and "/".join(parts[1:3]) in served:
        rest = parts[3:]
        plural = rest[2] if rest[:1] == ["namespaces"] and len(rest) >= 3 else rest[0]
        if plural not in served["/".join(parts[1:3])]:
            raise ApiError(404, "NotFound", f"the server could not find {path}")
    else:
        raise ApiError(404, "NotFound", f"the server could not find {path}")
    if rest[:1] == ["namespaces"] and len(rest) <= 2:
        return "namespaces", "", (rest[1] if len(rest) == 2 else None), None
    if rest[:1] == ["namespaces"] and len(rest) >= 3 and rest[2] in KINDS:
        return (
            rest[2],
            rest[1],
            (rest[3] if len(rest) > 3 else None),
            (rest[4] if len(rest) > 4 else None),
        )
    if len(rest) == 1 and rest[0] in KINDS:
        return rest[0], "", None, None
    raise ApiError(404, "NotFound", f"the server could not find {path}")


def handler_for(fake: FakeKube) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        def do_PATCH(self) -> None:
            self._dispatch("PATCH")

        def do_DELETE(self) -> None:
            self._dispatch("DELETE")

        def _dispatch(self, method: str) -> None:
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null") if length else None
            fake.requests.append((method, self.path))
            if url.path.rstrip("/") == "/version":
                major, minor = fake.version
                self._json(200, _version_info(major, minor))
                return
            if (
                method == "GET"
                and url.path.strip("/").count("/") == 2
                and url.path.startswith("/apis/")
            ):
                found = _discovery(fake, url.path)
                if found is not None:
                    self._json(200, found)
                else:
                    self._json(404, ApiError(404, "NotFound", "404 page not found").body)
                return
            try:
                plural, ns, name, sub = _route(url.path, fake)
                if plural in fake.forbidden:
                    raise ApiError(
                        403, "Forbidden", f'{plural} is forbidden: User "fake" cannot {method} it'
                    )
                self._serve(method, plural, ns, name, sub, query, body)
            except ApiError as err:
                self._json(err.body["code"], err.body)

        def _serve(
            self,
            method: str,
            plural: str,
            ns: str,
            name: str | None,
            sub: str | None,
            query: dict[str, str],
            body: Any,
        ) -> None:
            labels, fields = query.get("labelSelector", ""), query.get("fieldSelector", "")
            if method == "GET" and sub == "log":
                self._log(ns, name or "", query)
            elif (
                method == "GET" and name is None and query.get("watch", "").lower() in ("true", "1")
            ):
                since = query.get("resourceVersion")
                self._chunked(
                    fake.stream_watch(
                        plural,
                        ns or None,
                        labels,
                        fields,
                        int(since) if since else None,
                        float(query.get("timeoutSeconds", 30)),
                    )
                )
            elif method == "GET" and name is None:
                with fake.cond:
                    items = fake.select(plural, ns or None, labels, fields)
                    rv = str(fake.last_rv())
                kind, api_version = KINDS[plural]
                self._json(
                    200,
                    {
                        "kind": f"{kind}List",
                        "apiVersion": api_version,
                        "metadata": {"resourceVersion": rv},
                        "items": items,
                    },
                )
            elif method == "GET":
                with fake.cond:
                    self._json(200, fake.get(plural, ns, name or ""))
            elif method == "POST":
                self._json(201, fake.create(plural, ns, body or {}))
            elif method in ("PUT", "PATCH"):
                self._json(
                    200, fake.update(plural, ns, name or "", body or {}, patch=method == "PATCH")
                )
            elif method == "DELETE":
                policy = (body or {}).get("propagationPolicy") or query.get("propagationPolicy")
                fake.delete(plural, ns, name or "", policy)
                self._json(
                    200,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Success",
                        "details": {"name": name},
                    },
                )

        def _log(self, ns: str, name: str, query: dict[str, str]) -> None:
            with fake.cond:
                pod = fake.get("pods", ns, name)
                names = [c["name"] for c in pod["spec"]["containers"]]
                if query.get("container", names[0]) not in names:
                    raise ApiError(
                        400,
                        "BadRequest",
                        f"container {query['container']} is not valid for pod {name}",
                    )
                statuses = pod["status"].get("containerStatuses") or [{}]
                if pod["status"]["phase"] == "Pending":
                    reason = (
                        statuses[0]
                        .get("state", {})
                        .get("waiting", {})
                        .get("reason", "ContainerCreating")
                    )
                    raise ApiError(
                        400,
                        "BadRequest",
                        f'container "trainer" in pod "{name}" is waiting to start: {reason}',
                    )
            follow = query.get("follow", "").lower() in ("true", "1")
            if follow:
                self._chunked(fake.stream_log(ns, name, True), "text/plain")
            else:
                lines = list(fake.stream_log(ns, name, False))
                if "tailLines" in query:  # the last N lines, then at most limitBytes of them
                    lines = lines[len(lines) - min(len(lines), int(query["tailLines"])) :]
                text = "".join(lines).encode()
                if "limitBytes" in query:
                    text = text[: int(query["limitBytes"])]
                self._send(200, text, "text/plain")

        def _json(self, code: int, obj: Obj) -> None:
            self._send(code, json.dumps(obj).encode(), "application/json")

        def _send(self, code: int, data: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _chunked(self, chunks: Iterator[str], content_type: str = "application/json") -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for chunk in chunks:
                    data = chunk.encode()
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

    return Handler
