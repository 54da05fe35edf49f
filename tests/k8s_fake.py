"""An in-process fake of the Kubernetes API server, for the launcher's backend tests.

It exists for speed and for what a real cluster cannot be made to do on cue (pods that
start, fail or get preempted exactly when a test says). A real single-node Kubernetes does
run here (v1.20, built by tests/cluster/local-cluster.sh: the `cluster` tier of CI), and the
same backend tests also run against it when KUBECONFIG is set (see docs/kubernetes.md). It
speaks real HTTP/JSON on 127.0.0.1 to the real `kubernetes` client,
so request paths, query parameters, status codes, chunked log/watch streams and
(de)serialisation are exercised for real.

What it models: namespaces, ConfigMaps, Secrets, Events, Services, Jobs, JobSets, TrainJobs
and Pods; creation with 409
AlreadyExists and 404 for missing namespaces; label and simple field selectors; resource
versions and `watch=true` streams; pod logs with `follow=true`, `tailLines` and
`limitBytes`; deletion that cascades to objects whose ownerReferences point at the deleted
one; a small Job controller that creates
one Pod per attempt (per index for Indexed Jobs), applies the Job's podFailurePolicy and
backoffLimit, and honours `suspend`; and minimal JobSet / TrainJob controllers
(`k8s_fake_workloads`). Pods only move when the test says so (`start_pod`, `finish_pod`, ...).

What it does not model: authentication/RBAC, admission, scheduling, kubelet behaviour,
finalizers (foreground deletion completes at once), strategic-merge-patch semantics (PATCH
is a JSON merge patch), field validation, pagination, and most of the API surface.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from k8s_fake_controls import PodControls, _now
from k8s_fake_workloads import WorkloadControllers

KINDS = {  # plural -> (kind, apiVersion)
    "namespaces": ("Namespace", "v1"),
    "configmaps": ("ConfigMap", "v1"),
    "secrets": ("Secret", "v1"),
    "pods": ("Pod", "v1"),
    "events": ("Event", "v1"),
    "services": ("Service", "v1"),
    "jobs": ("Job", "batch/v1"),
    "jobsets": ("JobSet", "jobset.x-k8s.io/v1alpha2"),
    "trainjobs": ("TrainJob", "trainer.kubeflow.org/v1alpha1"),
}
CRD_PLURALS = ("jobsets", "trainjobs")
Obj = dict[str, Any]


def _status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.body = _status(code, reason, message)


def _label_match(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if m := re.fullmatch(r"([^!=\s]+)\s*(==|=|!=)\s*(\S*)", term):
            key, op, value = m.groups()
            if (labels.get(key) == value) != (op != "!="):
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _field_match(obj: Obj, selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        path, _, value = term.partition("=")
        node: Any = obj
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if str(node) != value.lstrip("="):
            return False
    return True


def _merge(base: Obj, patch: Obj) -> Obj:
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class FakeKube(WorkloadControllers, PodControls):
    """The fake API server plus the controls a test uses to move pods along."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.history: list[tuple[int, str, str, Obj]] = []  # (rv, plural, type, obj)
        self.logs: dict[tuple[str, str], list[str]] = {}
        self.namespaces: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self.deletions: list[tuple[str, str, str | None]] = []  # (plural, name, propagation)
        self._rv = itertools.count(1)
        self._stopping = False
        self.refuse_pods: str | None = None  # e.g. a ResourceQuota message: no pod, an event
        self.version = ("1", "31")  # what GET /version reports (major, minor)
        self.forbidden: set[str] = set()  # plurals this identity's RBAC refuses (403), e.g. secrets
        self.crds = set(CRD_PLURALS)  # the custom resources the server serves (JobSet, TrainJob)
        from k8s_fake_http import handler_for  # the HTTP side, split off to keep files small

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.create_namespace("default")

    def __enter__(self) -> FakeKube:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self.cond:
            self._stopping = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "fake",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {"token": "fake-token"}}],
                    "contexts": [
                        {
                            "name": "fake",
                            "context": {"cluster": "fake", "user": "fake", "namespace": namespace},
                        }
                    ],
                }
            )
        )
        return path

    # --- storage ------------------------------------------------------------------------

    def _record(self, plural: str, kind: str, obj: Obj) -> None:
        rv = next(self._rv)
        obj["metadata"]["resourceVersion"] = str(rv)
        self.history.append((rv, plural, kind, json.loads(json.dumps(obj))))
        self.cond.notify_all()

    def last_rv(self) -> int:
        return self.history[-1][0] if self.history else 0

    def create(self, plural: str, ns: str, obj: Obj) -> Obj:
        with self.cond:
            kind, api_version = KINDS[plural]
            if plural != "namespaces" and ns not in self.namespaces:
                raise ApiError(404, "NotFound", f'namespaces "{ns}" not found')
            meta = obj.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            key = (plural, "" if plural == "namespaces" else ns, meta.get("name", ""))
            if key in self.objects:
                group = api_version.rpartition("/")[0]
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{plural}{"." + group if group else ""} "{key[2]}" already exists',
                )
            obj.update(kind=kind, apiVersion=api_version)
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now())
            if plural != "namespaces":
                meta["namespace"] = ns
            if plural == "secrets" and "stringData" in obj:
                obj.setdefault("data", {}).update(
                    {
                        k: base64.b64encode(v.encode()).decode()
                        for k, v in obj.pop("stringData").items()
                    }
                )
            self.objects[key] = obj
            self._record(plural, "ADDED", obj)
            if plural == "jobs":
                self._job_started(obj)
            elif plural in CRD_PLURALS:
                self._group_started(plural, obj)
            return obj

    def get(self, plural: str, ns: str, name: str) -> Obj:
        obj = self.objects.get((plural, ns, name))
        if obj is None:
            group = KINDS[plural][1].rpartition("/")[0]
            raise ApiError(
                404, "NotFound", f'{plural}{"." + group if group else ""} "{name}" not found'
            )
        return obj

    def update(self, plural: str, ns: str, name: str, body: Obj, *, patch: bool) -> Obj:
        with self.cond:
            old = self.get(plural, ns, name)
            new = (
                _merge(old, body)
                if patch
                else {**body, "status": body.get("status", old.get("status"))}
            )
            new["metadata"] = {
                **new.get("metadata", {}),
                **{
                    k: old["metadata"][k]
                    for k in ("uid", "creationTimestamp", "namespace")
                    if k in old["metadata"]
                },
            }
            new.update(kind=old["kind"], apiVersion=old["apiVersion"])
            self.objects[(plural, ns, name)] = new
            self._record(plural, "MODIFIED", new)
            return new

    def delete(self, plural: str, ns: str, name: str, policy: str | None = None) -> None:
        with self.cond:
            obj = self.get(plural, ns, name)
            self.deletions.append((plural, name, policy))
            del self.objects[(plural, ns, name)]
            self._record(plural, "DELETED", obj)
            if policy == "Orphan":
                return
            uid = obj["metadata"]["uid"]
            for (p, n, child), dep in list(self.objects.items()):
                owners = dep["metadata"].get("ownerReferences", [])
                if any(o.get("uid") == uid for o in owners) and (p, n, child) in self.objects:
                    self.delete(p, n, child, policy)

    def select(self, plural: str, ns: str | None, labels: str = "", fields: str = "") -> list[Obj]:
        return [
            o
            for (p, n, _), o in sorted(self.objects.items())
            if p == plural
            and (ns is None or n == ns)
            and _label_match(o["metadata"].get("labels", {}), labels)
            and _field_match(o, fields)
        ]

    # --- streams ------------------------------------------------------------------------

    def stream_log(self, ns: str, name: str, follow: bool) -> Iterator[str]:
        sent = 0
        while True:
            with self.cond:
                lines = self.logs.get((ns, name), [])
                new, sent = lines[sent:], len(lines)
                pod = self.objects.get(("pods", ns, name))
                finished = (
                    pod is None
                    or pod["status"]["phase"] in ("Succeeded", "Failed")
                    or self._stopping
                )
                if not new and follow and not finished:
                    self.cond.wait(0.5)
                    continue
            yield from (line + "\n" for line in new)
            if not follow or (finished and not new):
                return

    def stream_watch(
        self,
        plural: str,
        ns: str | None,
        labels: str,
        fields: str,
        since: int | None,
        timeout: float,
    ) -> Iterator[str]:
        deadline = time.monotonic() + timeout
        if since is None:
            with self.cond:
                current = self.select(plural, ns, labels, fields)
                since = self.last_rv()
            for obj in current:
                yield json.dumps({"type": "ADDED", "object": obj}) + "\n"
        while time.monotonic() < deadline and not self._stopping:
            with self.cond:
                events = [
                    (rv, kind, obj)
                    for rv, p, kind, obj in self.history
                    if rv > since
                    and p == plural
                    and (ns is None or obj["metadata"].get("namespace") == ns)
                    and _label_match(obj["metadata"].get("labels", {}), labels)
                    and _field_match(obj, fields)
                ]
                if not events:
                    self.cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))
                    continue
            for rv, kind, obj in events:
                since = rv
                yield json.dumps({"type": kind, "object": obj}) + "\n"
