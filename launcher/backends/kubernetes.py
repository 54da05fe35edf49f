"""The Kubernetes backend: the run's ConfigMap + workload (a Job, an Indexed Job + headless
Service, a JobSet or a TrainJob: `job.backend`) through the real `kubernetes` client.

`submit`, `logs` and `cancel` are mixins of their own (`k8s_submit`, `k8s_logs`,
`k8s_cancel`, and `k8s_resubmit` for a config submitted again); this module reads runs.

Every ApiException / connection error becomes a one-line ClusterError (or UserError when the
user must fix something) at this boundary (`k8s_client.api_errors`).
"""

from __future__ import annotations

from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune.config import PipelineConfig, output_uri, parse_config
from kubetune.config.cluster import sanitize_name
from kubetune.errors import ClusterError, ConfigError, UserError
from launcher.backends import k8s_status
from launcher.backends.base import Backend, RunStatus, read_progress
from launcher.backends.k8s_cancel import Cancels
from launcher.backends.k8s_client import api_errors, load_api_client
from launcher.backends.k8s_logs import Logs
from launcher.backends.k8s_resubmit import Resubmits
from launcher.backends.k8s_submit import Submits
from launcher.backends.k8s_workloads import JOB, KINDS, Workloads, is_child
from launcher.manifests import ANNOTATION_OUTPUT, LABEL_HASH, LABEL_NAME, LABEL_RUN

Obj = dict[str, Any]


class KubernetesBackend(Submits, Resubmits, Logs, Cancels, Backend):
    """Runs as Jobs, JobSets or TrainJobs (`job.backend`) in one namespace."""

    name = "kubernetes"

    def __init__(
        self,
        *,
        kubeconfig: str | None = None,
        context: str | None = None,
        namespace: str | None = None,
    ) -> None:
        self.api, context_ns = load_api_client(kubeconfig, context)
        self.explicit_namespace = namespace
        self.namespace = namespace or context_ns or "default"
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.workloads = Workloads(self.api)

    def _dict(self, obj: Any) -> Obj:
        return self.api.sanitize_for_serialization(obj)

    # --- reading ------------------------------------------------------------------------

    def _jobs(self, ns: str, run: str | None = None) -> list[Obj]:
        selector = (
            f"{LABEL_NAME}=kubetune,{LABEL_RUN}={run}"
            if run
            else f"{LABEL_NAME}=kubetune,{LABEL_RUN}"
        )
        jobs: list[Obj] = []
        for kind in KINDS:  # a kind the cluster lacks, or the caller may not list, has none
            with api_errors(f"listing {kind.kind}s"):
                try:
                    jobs += self.workloads.list(kind, ns, selector)
                except ApiException as err:
                    if kind is JOB or err.status not in (403, 404):
                        raise
        return sorted(
            (j for j in jobs if not is_child(j)),  # a JobSet's Jobs are not runs of their own
            key=lambda j: (j["metadata"].get("creationTimestamp") or "", j["metadata"]["name"]),
        )

    def _find_job(self, run: str) -> Obj:
        jobs = self._jobs(self.namespace, sanitize_name(run))
        if not jobs:
            with api_errors(f"reading Job {run}"):
                try:
                    return self.workloads.read(JOB, self.namespace, run)
                except ApiException as err:
                    if err.status != 404:
                        raise
            raise UserError(
                f"no kubetune run {run!r} in namespace {self.namespace}",
                hint="`launcher list` shows the runs; pass --namespace if it is elsewhere",
            )
        return jobs[-1]

    def _pods(self, job: Obj) -> tuple[list[Obj], str]:
        labels = job["metadata"].get("labels", {})
        selector = f"{LABEL_RUN}={labels.get(LABEL_RUN)},{LABEL_HASH}={labels.get(LABEL_HASH)}"
        with api_errors("listing pods"):
            pod_list = self.core.list_namespaced_pod(self.namespace, label_selector=selector)
        pods = _by_age([self._dict(p) for p in pod_list.items])
        return pods, pod_list.metadata.resource_version

    def _events(self, name: str | None = None) -> list[Obj]:
        """The events about object `name` (None: every event in the namespace)."""
        selector = f"involvedObject.name={name}" if name else None
        with api_errors("listing events"):
            items = self.core.list_namespaced_event(self.namespace, field_selector=selector).items
        return [self._dict(e) for e in items]

    def status(self, run: str) -> RunStatus:
        return self._status(self._find_job(run), with_progress=True)

    def _status(
        self, job: Obj, *, with_progress: bool, known: tuple[list[Obj], list[Obj]] | None = None
    ) -> RunStatus:
        """`known`: the job's pods and events, already listed (`list`)."""
        meta = job["metadata"]
        if known is not None:
            pods, events = known
        else:
            pods = self._pods(job)[0]
            events = [] if pods else self._events(meta["name"])
        phase, reason, message = k8s_status.workload_phase(job, pods, events)
        status = RunStatus(
            backend=self.name,
            run=meta.get("labels", {}).get(LABEL_RUN, meta["name"]),
            job_name=meta["name"],
            phase=phase,
            reason=reason,
            message=message,
            retries=k8s_status.retries(pods),
            pods=[p["metadata"]["name"] for p in pods],
            labels=dict(meta.get("labels") or {}),
            output_uri=meta.get("annotations", {}).get(ANNOTATION_OUTPUT),
            config_hash=meta.get("labels", {}).get(LABEL_HASH),
            namespace=self.namespace,
            nodes=k8s_status.workload_nodes(job),
        )
        if with_progress and phase not in ("Pending", "Suspended"):
            status.progress, status.progress_error = self._progress(meta["name"])
        return status

    def _progress(self, name: str) -> tuple[Any, str | None]:
        """Progress from the run's storage, located through the config in its ConfigMap."""
        try:
            cfg = self._config(name)
        except (ClusterError, ConfigError) as err:
            return None, str(err).splitlines()[0]
        return read_progress(output_uri(cfg), cfg.storage)

    def _config(self, name: str) -> PipelineConfig:
        """The resolved config in the Job's ConfigMap."""
        with api_errors(f"reading ConfigMap {name}"):
            cm = self.core.read_namespaced_config_map(name, self.namespace)
        return parse_config((cm.data or {}).get("config.yaml", ""), name=f"configmap/{name}")

    def run_config(self, run: str) -> PipelineConfig:
        return self._config(self._find_job(run)["metadata"]["name"])

    def list(self) -> list[RunStatus]:
        """Every run, from one listing of the jobs, one of their pods and (if a run has no
        pod) one of the namespace's events: not two API calls per run."""
        jobs = self._jobs(self.namespace)
        if not jobs:
            return []
        with api_errors("listing pods"):
            items = self.core.list_namespaced_pod(self.namespace, label_selector=LABEL_RUN).items
        pods: dict[tuple[str | None, str | None], list[Obj]] = {}
        for pod in _by_age([self._dict(p) for p in items]):
            labels = pod["metadata"].get("labels") or {}
            pods.setdefault((labels.get(LABEL_RUN), labels.get(LABEL_HASH)), []).append(pod)
        events: list[Obj] | None = None
        statuses = []
        for job in jobs:
            labels = job["metadata"].get("labels") or {}
            mine = pods.get((labels.get(LABEL_RUN), labels.get(LABEL_HASH)), [])
            if not mine and events is None:
                events = self._events()
            about = [
                e
                for e in events or []
                if e.get("involvedObject", {}).get("name") == job["metadata"]["name"]
            ]
            statuses.append(
                self._status(job, with_progress=False, known=(mine, [] if mine else about))
            )
        return statuses


def _by_age(pods: list[Obj]) -> list[Obj]:
    """Pods oldest first (creation time, then resource version)."""
    return sorted(
        pods,
        key=lambda p: (
            p["metadata"].get("creationTimestamp") or "",
            int(p["metadata"].get("resourceVersion") or 0),
        ),
    )
