"""An in-process fake of the Kubernetes API server, for the launcher's backend tests.

It exists for speed and for what a real cluster cannot be made to do on cue (pods that
start, fail or get preempted exactly when a test says). A real single-node Kubernetes does
run here (v1.20, built by tests/cluster/local-cluster.sh: the `cluster` tier of CI), and the
same backend tests also run against it when KUBECONFIG is set (see docs/kubernetes.md). It
speaks real HTTP/JSON on 127.0.0.1 to the real `kubernetes` client,
so request paths, query parameters, status codes, chunked log/watch streams and
(de)serialisation are exercised for real.

What it models: namespaces, ConfigMaps, Secrets, Events, Jobs and Pods; creation with 409
AlreadyExists and 404 for missing namespaces; label and simple field selectors; resource
versions and `watch=true` streams; pod logs with `follow=true`; deletion that cascades to
objects whose ownerReferences point at the deleted one; and a small Job controller that
creates one Pod per attempt, applies the Job's podFailurePolicy and backoffLimit, and honours
`suspend`. Pods only move when the test says so (`start_pod`, `finish_pod`, ...).

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

KINDS = {  # plural -> (kind, apiVersion)
    "namespaces": ("Namespace", "v1"),
    "configmaps": ("ConfigMap", "v1"),
    "secrets": ("Secret", "v1"),
    "pods": ("Pod", "v1"),
    "events": ("Event", "v1"),
    "jobs": ("Job", "batch/v1"),
}
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


class FakeKube(PodControls):
    """The fake API server plus the controls a test uses to move pods along."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.history: list[tuple[int, str, str, Obj]] = []  # (rv, plural, type, obj)
        self.logs: dict[tuple[str, str], list[str]] = {}
        self.namespaces: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self._rv = itertools.count(1)
        self._stopping = False
        self.refuse_pods: str | None = None  # e.g. a ResourceQuota message: no pod, an event
        self.version = ("1", "31")  # what GET /version reports (major, minor)
        self.forbidden: set[str] = set()  # plurals this identity's RBAC refuses (403), e.g. secrets
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
                group = "batch" if plural == "jobs" else ""
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
            return obj

    def get(self, plural: str, ns: str, name: str) -> Obj:
        obj = self.objects.get((plural, ns, name))
        if obj is None:
            group = ".batch" if plural == "jobs" else ""
            raise ApiError(404, "NotFound", f'{plural}{group} "{name}" not found')
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

    # --- the Job controller -------------------------------------------------------------

    def _job_started(self, job: Obj) -> None:
        job.setdefault("status", {})
        if job["spec"].get("suspend"):
            job["status"]["conditions"] = [
                {
                    "type": "Suspended",
                    "status": "True",
                    "reason": "JobSuspended",
                    "message": "Job suspended",
                    "lastTransitionTime": _now(),
                }
            ]
        else:
            job["status"]["startTime"] = _now()
            self._new_pod(job)

    def _new_pod(self, job: Obj) -> Obj | None:
        meta, template = job["metadata"], job["spec"]["template"]
        if self.refuse_pods:
            self.add_event(
                meta["name"],
                "FailedCreate",
                f'Error creating: pods "{meta["name"]}-xxxxx" is forbidden: {self.refuse_pods}',
                ns=meta["namespace"],
            )
            return None
        labels = {
            **template["metadata"].get("labels", {}),
            "batch.kubernetes.io/job-name": meta["name"],
            "job-name": meta["name"],
            "batch.kubernetes.io/controller-uid": meta["uid"],
        }
        pod = {
            "metadata": {
                "generateName": meta["name"] + "-",
                "labels": labels,
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": json.loads(json.dumps(template["spec"])),
            "status": {"phase": "Pending", "conditions": []},
        }
        pod = self.create("pods", meta["namespace"], pod)
        job["status"]["active"] = 1
        self._record("jobs", "MODIFIED", job)
        return pod

    def _owner_job(self, pod: Obj) -> Obj | None:
        for ref in pod["metadata"].get("ownerReferences", []):
            if ref["kind"] == "Job":
                return self.objects.get(("jobs", pod["metadata"]["namespace"], ref["name"]))
        return None

    def _policy_action(self, job: Obj, pod: Obj, exit_code: int) -> tuple[str, int | None]:
        conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
        rules = job["spec"].get("podFailurePolicy", {}).get("rules", [])
        for index, rule in enumerate(rules):
            if any(
                conditions.get(p["type"]) == p.get("status", "True")
                for p in rule.get("onPodConditions", [])
            ):
                return rule["action"], index
            codes = rule.get("onExitCodes")
            if codes and (exit_code in codes["values"]) == (codes["operator"] == "In"):
                return rule["action"], index
        return "Count", None

    def _pod_finished(self, pod: Obj, exit_code: int) -> None:
        job = self._owner_job(pod)
        if job is None:
            return
        status = job["status"]
        status["active"] = 0
        if exit_code == 0:
            status.update(succeeded=1, completionTime=_now())
            self._set_job_condition(job, "Complete", "Completed", "")
            return
        action, index = self._policy_action(job, pod, exit_code)
        if action == "FailJob":
            self._set_job_condition(
                job,
                "Failed",
                "PodFailurePolicy",
                (
                    f"Container trainer for pod {pod['metadata']['namespace']}/"
                    f"{pod['metadata']['name']} failed with exit code {exit_code} matching "
                    f"FailJob rule at index {index}"
                ),
            )
            return
        if action == "Count":
            status["failed"] = status.get("failed", 0) + 1
            if status["failed"] > job["spec"].get("backoffLimit", 6):
                self._set_job_condition(
                    job,
                    "Failed",
                    "BackoffLimitExceeded",
                    "Job has reached the specified backoff limit",
                )
                return
        self._new_pod(job)

    def _set_job_condition(self, job: Obj, kind: str, reason: str, message: str) -> None:
        job["status"]["conditions"] = [
            c for c in job["status"].get("conditions", []) if c["type"] != "Suspended"
        ] + [
            {
                "type": kind,
                "status": "True",
                "reason": reason,
                "message": message,
                "lastTransitionTime": _now(),
            }
        ]
        self._record("jobs", "MODIFIED", job)

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
