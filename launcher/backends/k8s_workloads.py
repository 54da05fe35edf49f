"""The three kinds a run's workload can be (Job, JobSet, TrainJob), behind one small API:
create / list / read / delete as API JSON dicts, through BatchV1Api for Jobs and
CustomObjectsApi for the custom resources. Client exceptions pass through: callers wrap
calls in `k8s_client.api_errors`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune.errors import UserError

Obj = dict[str, Any]


@dataclass(frozen=True)
class WorkloadKind:
    """One kind of workload: its API coordinates and how to install it."""

    backend: str  # the job.backend value that renders it
    kind: str
    group: str
    version: str
    plural: str
    container: str  # the trainer container's name in the workload's pods
    install: str = ""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


JOB = WorkloadKind("job", "Job", "batch", "v1", "jobs", "trainer")
JOBSET = WorkloadKind(
    "jobset",
    "JobSet",
    "jobset.x-k8s.io",
    "v1alpha2",
    "jobsets",
    "trainer",
    "install JobSet (https://jobset.sigs.k8s.io/docs/installation/)",
)
TRAINJOB = WorkloadKind(
    "trainjob",
    "TrainJob",
    "trainer.kubeflow.org",
    "v1alpha1",
    "trainjobs",
    "node",
    "install Kubeflow Trainer v2 and its runtimes (https://www.kubeflow.org/docs/components/trainer/)",
)
KINDS = (JOB, JOBSET, TRAINJOB)
BY_KIND = {k.kind: k for k in KINDS}


def kind_of(obj: Obj) -> WorkloadKind:
    return BY_KIND[obj["kind"]]


def is_child(obj: Obj) -> bool:
    """A Job run by a JobSet, or a JobSet run by a TrainJob: part of another run's workload."""
    owners = obj["metadata"].get("ownerReferences") or []
    return any(o.get("kind") in ("JobSet", "TrainJob") for o in owners)


class Workloads:
    """create / list / read / delete of any workload kind, as API JSON dicts."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.batch = client.BatchV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def _dict(self, obj: Any) -> Obj:
        return self.api.sanitize_for_serialization(obj)

    def served(self, kind: WorkloadKind) -> bool:
        """Whether the API server serves the kind (its CRD is installed)."""
        if kind is JOB:
            return True
        try:
            resources = self.custom.get_api_resources(kind.group, kind.version)
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return any(r.name == kind.plural for r in resources.resources or [])

    def require(self, kind: WorkloadKind) -> None:
        """UserError naming what to install when the cluster lacks the kind."""
        if not self.served(kind):
            raise UserError(
                f"the cluster has no {kind.kind} API ({kind.api_version}), which job.backend: "
                f"{kind.backend} needs",
                hint=f"{kind.install}, or set job.backend: job",
            )

    def create(self, ns: str, obj: Obj) -> Obj:
        kind = kind_of(obj)
        if kind is JOB:
            return self._dict(self.batch.create_namespaced_job(ns, obj))
        return self.custom.create_namespaced_custom_object(
            kind.group, kind.version, ns, kind.plural, obj
        )

    def list(self, kind: WorkloadKind, ns: str, selector: str) -> list[Obj]:
        if kind is JOB:
            items = [
                self._dict(j)
                for j in self.batch.list_namespaced_job(ns, label_selector=selector).items
            ]
        else:
            items = self.custom.list_namespaced_custom_object(
                kind.group, kind.version, ns, kind.plural, label_selector=selector
            )["items"]
        return [{**o, "kind": kind.kind, "apiVersion": kind.api_version} for o in items]

    def read(self, kind: WorkloadKind, ns: str, name: str) -> Obj:
        if kind is JOB:
            obj = self._dict(self.batch.read_namespaced_job(name, ns))
        else:
            obj = self.custom.get_namespaced_custom_object(
                kind.group, kind.version, ns, kind.plural, name
            )
        return {**obj, "kind": kind.kind, "apiVersion": kind.api_version}

    def delete(self, kind: WorkloadKind, ns: str, name: str) -> None:
        body = client.V1DeleteOptions(propagation_policy="Foreground")
        if kind is JOB:
            self.batch.delete_namespaced_job(name, ns, body=body)
        else:
            self.custom.delete_namespaced_custom_object(
                kind.group, kind.version, ns, kind.plural, name, body=body
            )


def workload_ref(workload: Obj) -> tuple[str, str]:
    """(kind, name): a workload's identity in its namespace."""
    return workload["kind"], workload["metadata"]["name"]
