"""What `logs` does on Kubernetes (a mixin of `KubernetesBackend`): every pod's log of one
node, oldest first, after the log tails saved when submit replaced an earlier workload;
followed through the API's watch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from kubetune.config.cluster import sanitize_name
from kubetune.errors import UserError
from kubetune.humanize import count
from launcher.backends import k8s_saved_logs, k8s_status
from launcher.backends.k8s_client import api_errors
from launcher.backends.k8s_workloads import kind_of
from launcher.manifests import LABEL_HASH, LABEL_RUN

Obj = dict[str, Any]


class Logs:
    """Needs the backend's core, workloads, namespace, _pods, _find_job_or_saved, _log_stores
    and _saved_lines."""

    core: Any
    workloads: Any
    namespace: str
    _pods: Any
    _find_job_or_saved: Any
    _log_stores: Any
    _saved_lines: Any

    def logs(
        self, run: str, *, follow: bool = False, latest: bool = False, rank: int | None = None
    ) -> Iterator[str]:
        """Every pod's log of one node, oldest first: node `rank` (default 0, the node that
        logs progress) of a multi-node run; first (unless `latest`) the log tails saved when
        submit replaced an earlier workload of the run (`k8s_saved_logs`)."""
        job = self._find_job_or_saved(run)
        if job is None:  # no workload, but logs saved here when one was replaced
            local = self._log_stores(None, sanitize_name(run))
            yield from k8s_saved_logs.saved_lines(local, rank or 0)
            return
        nodes = k8s_status.workload_nodes(job)
        if rank is not None and not 0 <= rank < nodes:
            raise UserError(
                f"run {run} has {count(nodes, 'node')}: --rank takes 0..{nodes - 1}",
                hint="--rank is the node rank (the pod's completion index)",
            )
        saved = [] if latest else list(self._saved_lines(job, rank or 0))
        yield from saved
        want = None if nodes == 1 else (rank or 0)
        seen, container = set[str](), kind_of(job).container
        while True:
            finished = follow and self._finished(job)
            pods, version = self._pods(job)
            pods = [p for p in pods if want is None or k8s_status.node_rank(p) == want]
            for pod in pods:
                pod_name = pod["metadata"]["name"]
                if pod_name in seen or pod["status"].get("phase") == "Pending":
                    continue
                if seen:  # a retry: mark where the next attempt's log starts
                    yield f"==> pod {pod_name} (attempt {pods.index(pod) + 1}) <=="
                elif saved:
                    yield f"==> pod {pod_name} (the current {job['kind']}) <=="
                seen.add(pod_name)
                yield from self._pod_log(pod_name, follow and not finished, container)
            if not follow or finished:
                return
            self._wait_for_pods(job, version)

    def _finished(self, workload: Obj) -> bool:
        name, kind = workload["metadata"]["name"], kind_of(workload)
        with api_errors(f"reading {kind.kind} {name}"):
            try:
                job = self.workloads.read(kind, self.namespace, name)
            except ApiException as err:
                if err.status == 404:
                    return True
                raise
        return k8s_status.finished(job)

    def _pod_log(self, pod: str, follow: bool, container: str) -> Iterator[str]:
        with api_errors(f"reading logs of pod {pod}"):
            if follow:  # kubernetes' Watch streams `follow=true` logs line by line
                yield from watch.Watch().stream(
                    self.core.read_namespaced_pod_log,
                    name=pod,
                    namespace=self.namespace,
                    container=container,
                )
                return
            resp = self.core.read_namespaced_pod_log(
                pod, self.namespace, container=container, _preload_content=False
            )
            yield from resp.data.decode("utf-8", errors="replace").splitlines()

    def _wait_for_pods(self, job: Obj, version: str, timeout: int = 5) -> None:
        """Block until one of the Job's pods changes (or `timeout` seconds pass)."""
        labels = job["metadata"].get("labels", {})
        selector = f"{LABEL_RUN}={labels.get(LABEL_RUN)},{LABEL_HASH}={labels.get(LABEL_HASH)}"
        stream = watch.Watch()
        with api_errors("watching pods"):
            for _ in stream.stream(
                self.core.list_namespaced_pod,
                self.namespace,
                label_selector=selector,
                resource_version=version,
                timeout_seconds=timeout,
            ):
                stream.stop()
                return
