"""The test controls of the fake API server in `k8s_fake`: what a test calls to move pods
along (start, log, finish, wait, refuse), as a mixin of `FakeKube`. Split from k8s_fake.py to
keep both files small."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

Obj = dict[str, Any]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class PodControls:
    """Pod lifecycle steps under test control (`FakeKube` provides the storage methods)."""

    def create_namespace(self, name: str) -> None:
        with self.cond:
            self.namespaces.add(name)
            if ("namespaces", "", name) not in self.objects:
                self.create("namespaces", "", {"metadata": {"name": name}})

    def pods(self, job: str, ns: str = "default") -> list[Obj]:
        """The Job's pods, oldest first."""
        with self.cond:
            pods = self.select("pods", ns, f"job-name={job}")
            return sorted(pods, key=lambda p: int(p["metadata"]["resourceVersion"]))

    def latest_pod(self, job: str, ns: str = "default", timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while not (pods := self.pods(job, ns)):
            if time.monotonic() > deadline:
                raise AssertionError(f"no pod for job {job}")
            time.sleep(0.02)
        return pods[-1]["metadata"]["name"]

    def _set_pod(
        self,
        name: str,
        ns: str,
        phase: str,
        container_state: Obj,
        conditions: list[Obj] | None = None,
    ) -> Obj:
        pod = self.get("pods", ns, name)
        container = pod["spec"]["containers"][0]
        pod["status"]["phase"] = phase
        if conditions is not None:
            pod["status"]["conditions"] = conditions
        pod["status"]["containerStatuses"] = [
            {
                "name": container["name"],
                "image": container["image"],
                "imageID": "",
                "ready": phase == "Running",
                "restartCount": 0,
                "state": container_state,
            }
        ]
        self._record("pods", "MODIFIED", pod)
        return pod

    def start_pod(self, name: str, ns: str = "default") -> None:
        with self.cond:
            self._set_pod(
                name,
                ns,
                "Running",
                {"running": {"startedAt": _now()}},
                [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
            )

    def log(self, name: str, *lines: str, ns: str = "default") -> None:
        with self.cond:
            self.logs.setdefault((ns, name), []).extend(lines)
            self.cond.notify_all()

    def finish_pod(
        self,
        name: str,
        exit_code: int = 0,
        *,
        reason: str | None = None,
        disruption: bool = False,
        ns: str = "default",
    ) -> None:
        with self.cond:
            conditions = (
                [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]
                if disruption
                else []
            )
            terminated = {
                "exitCode": exit_code,
                "finishedAt": _now(),
                "reason": reason or ("Completed" if exit_code == 0 else "Error"),
            }
            pod = self._set_pod(
                name,
                ns,
                "Succeeded" if exit_code == 0 else "Failed",
                {"terminated": terminated},
                conditions,
            )
            self._pod_finished(pod, exit_code)

    def pod_waiting(self, name: str, reason: str, message: str, ns: str = "default") -> None:
        with self.cond:
            self._set_pod(
                name,
                ns,
                "Pending",
                {"waiting": {"reason": reason, "message": message}},
                [{"type": "PodScheduled", "status": "True"}],
            )

    def unschedulable(self, name: str, message: str, ns: str = "default") -> None:
        with self.cond:
            pod = self.get("pods", ns, name)
            pod["status"]["conditions"] = [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": message,
                }
            ]
            self._record("pods", "MODIFIED", pod)

    def add_event(
        self, involved: str, reason: str, message: str, kind: str = "Job", ns: str = "default"
    ) -> None:
        self.create(
            "events",
            ns,
            {
                "metadata": {"generateName": f"{involved}."},
                "reason": reason,
                "message": message,
                "type": "Warning",
                "involvedObject": {"kind": kind, "name": involved, "namespace": ns},
                "lastTimestamp": _now(),
            },
        )
