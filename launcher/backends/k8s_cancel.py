"""What `cancel` does on Kubernetes (a mixin of `KubernetesBackend`): the run's workloads
deleted (foreground), and waiting until they and their ConfigMaps are gone."""

from __future__ import annotations

import functools
import time
from typing import Any

from kubernetes.client.exceptions import ApiException

from kubetune.errors import ClusterError
from launcher.backends.base import RunStatus
from launcher.backends.k8s_client import api_errors
from launcher.backends.k8s_workloads import BY_KIND, WorkloadKind, kind_of, workload_ref
from launcher.manifests import LABEL_RUN

Obj = dict[str, Any]


class Cancels:
    """Needs the backend's core, workloads, namespace, _find_job, _status and _jobs."""

    core: Any
    workloads: Any
    namespace: str
    _find_job: Any
    _status: Any
    _jobs: Any

    def cancel(self, run: str, *, wait: bool = False, timeout: float = 300.0) -> RunStatus:
        """Delete the run's workloads (foreground: pods, the owned ConfigMap and Service go
        too). The run is Cancelling while the API server still shows a workload, Cancelled
        once all are gone."""
        job = self._find_job(run)
        status = self._status(job, with_progress=False)
        jobs = self._jobs(self.namespace, job["metadata"].get("labels", {}).get(LABEL_RUN))
        refs = [workload_ref(j) for j in jobs or [job]]
        for kind, name in refs:
            self._delete(self.namespace, BY_KIND[kind], name)
        gone = self._wait_gone(refs, timeout if wait else 0.0, self.namespace)
        status.phase = "Cancelled" if gone else "Cancelling"
        status.reason = "Deleted" if gone else "Terminating"
        status.message = f"{job['kind']} deleted; outputs stay in {status.output_uri}"
        return status

    def _wait_gone(self, refs: list[tuple[str, str]], timeout: float, ns: str) -> bool:
        """Whether the workloads and their ConfigMaps are gone, polling up to `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            if not any(self._exists(read, name, ns) for read, name in self._readers(refs)):
                return True
            if time.monotonic() >= deadline:
                if timeout:
                    kind, name = refs[-1]
                    raise ClusterError(
                        f"{kind} {name} is still being deleted after {timeout:.0f}s",
                        hint="`launcher status` shows it; the garbage collector may be slow",
                    )
                return False
            time.sleep(0.5)

    def _readers(self, refs: list[tuple[str, str]]) -> list[tuple[Any, str]]:
        """(read function, name) of each workload and its ConfigMap."""
        out: list[tuple[Any, str]] = []
        for kind, name in refs:
            read = functools.partial(self._read_workload, BY_KIND[kind])
            out += [(read, name), (self.core.read_namespaced_config_map, name)]
        return out

    def _read_workload(self, kind: WorkloadKind, name: str, ns: str) -> Obj:
        return self.workloads.read(kind, ns, name)

    def _exists(self, read: Any, name: str, ns: str) -> bool:
        with api_errors(f"reading {name}"):
            try:
                read(name, ns)
            except ApiException as err:
                if err.status == 404:
                    return False
                raise
        return True

    def _delete_job(self, ns: str, workload: Obj) -> None:
        self._delete(ns, kind_of(workload), workload["metadata"]["name"])

    def _delete(self, ns: str, kind: WorkloadKind, name: str) -> None:
        with api_errors(f"deleting {kind.kind} {name}"):
            try:
                self.workloads.delete(kind, ns, name)
            except ApiException as err:
                if err.status != 404:
                    raise
