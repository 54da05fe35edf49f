"""kubetune's own sections: `job:` (the Kubernetes Job) and `storage:` (S3-compatible).

`JobConfig` is here; the Kubernetes rules it checks are `kubetune.config.k8s_rules`,
`StorageConfig` is `kubetune.config.storage_config`; their names are importable from here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kubetune.config.base import ConfigModel, Problems
from kubetune.config.k8s_rules import (
    DNS1123_LABEL,
    DNS1123_SUBDOMAIN,
    ENV_NAME,
    LABEL_NAME,
    MAX_RUN_NAME,
    POD_SPEC_FIELDS,
    QUANTITY,
    RENDEZVOUS_POD_FIELDS,
    SECRET_WORDS,
    TRAINJOB_POD_FIELDS,
    label_problem,
    pod_patch_problem,
    sanitize_name,
)
from kubetune.config.storage_config import (
    LITERAL_CREDENTIAL_KEYS,
    CredentialsSecretRef,
    StorageConfig,
)

__all__ = [
    "DNS1123_LABEL",
    "DNS1123_SUBDOMAIN",
    "ENV_NAME",
    "LABEL_NAME",
    "LITERAL_CREDENTIAL_KEYS",
    "MAX_RUN_NAME",
    "POD_SPEC_FIELDS",
    "QUANTITY",
    "RENDEZVOUS_POD_FIELDS",
    "SECRET_WORDS",
    "TRAINJOB_POD_FIELDS",
    "Backend",
    "CredentialsSecretRef",
    "JobConfig",
    "SecretKeyRef",
    "StorageConfig",
    "Toleration",
    "TopologyRequest",
    "label_problem",
    "pod_patch_problem",
    "sanitize_name",
]

Backend = Literal["job", "jobset", "trainjob"]


class SecretKeyRef(ConfigModel):
    """A key in a Kubernetes Secret."""

    name: str
    """The Secret's name (in the Job's namespace)."""
    key: str = "HF_TOKEN"
    """The key inside the Secret."""


class Toleration(ConfigModel):
    """A pod toleration (Kubernetes field names in snake_case)."""

    key: str | None = None
    """Taint key to tolerate (empty with operator Exists tolerates every taint)."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """`Equal` matches key and value; `Exists` matches the key alone."""
    value: str | None = None
    """Taint value (with operator Equal)."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate (empty: all effects)."""
    toleration_seconds: int | None = None
    """For NoExecute: how long the pod stays bound after the taint appears."""


class TopologyRequest(ConfigModel):
    """A Kueue Topology-Aware Scheduling request for the run's pods."""

    level: str
    """Node label of the topology level the pods share, e.g.
    `cloud.provider.com/topology-rack` or `kubernetes.io/hostname` (one of the levels of the
    cluster's Kueue Topology)."""
    mode: Literal["required", "preferred"] = "required"
    """`required`: Kueue admits the run only where all its pods fit in one domain of `level`
    (annotation `kueue.x-k8s.io/podset-required-topology`); `preferred`: it tries that, then
    spreads over as few domains as it can (`kueue.x-k8s.io/podset-preferred-topology`)."""

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        problem = label_problem(value, "")
        if problem:
            raise ValueError(f"must be a node label key ({problem})")
        return value


class JobConfig(ConfigModel):
    """How the training Job runs on Kubernetes. Ignored by local runs."""

    name: str | None = None
    """Run name (DNS-1123 after lower-casing). Default: the last part of base_output_dir."""
    namespace: str | None = None
    """Namespace for the Job. Default: the kubeconfig context's namespace."""
    image: str = "ghcr.io/kubetune/kubetune:0.1.0"
    """Container image with `kubetune[train]` installed (see the Dockerfile)."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """Kubernetes imagePullPolicy."""
    gpus: int = Field(default=1, ge=0, le=16)
    """GPUs per pod (per node when `nodes` > 1): one training process per GPU. On one node,
    more than 1 or on several, torchrun (`python -m runner.launch`; 0: one CPU process)."""
    gpu_resource_name: str = "nvidia.com/gpu"
    """Extended resource name of the GPUs (e.g. `amd.com/gpu`)."""
    gpu_memory_gib: float | None = Field(default=None, gt=0)
    """Memory of one GPU in GiB, for `launcher validate`'s warning when the run clearly
    will not fit (kubetune extension; default: read from a `nvidia.com/gpu.product`
    node_selector such as `NVIDIA-A100-SXM4-80GB`; unknown: no check)."""
    cpu: str | None = "4"
    """CPU request (a Kubernetes quantity, e.g. `4` or `3500m`)."""
    memory: str | None = "32Gi"
    """Memory request and limit (a Kubernetes quantity, e.g. `32Gi`)."""
    node_selector: dict[str, str] = {}
    """Node labels the pod must run on, e.g. `{nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}`."""
    tolerations: list[Toleration] = []
    """Tolerations, e.g. for tainted GPU nodes."""
    priority_class_name: str | None = None
    """PriorityClass of the pod."""
    queue_name: str | None = None
    """Kueue LocalQueue: adds the queue-name label and creates the Job suspended."""
    service_account: str | None = None
    """ServiceAccount the pod runs as (the chart creates `kubetune-runner`)."""
    backoff_limit: int = Field(default=3, ge=0)
    """Failed pods before the Job fails (preemptions and SIGTERM checkpoints do not count)."""
    active_deadline_seconds: int | None = Field(default=None, gt=0)
    """Hard wall-clock limit of the Job."""
    ttl_seconds_after_finished: int | None = Field(default=604800, ge=0)
    """Delete the finished Job (not its outputs) after this many seconds (default 7 days)."""
    termination_grace_period_seconds: int = Field(default=300, ge=30)
    """Time the pod gets after SIGTERM to write its checkpoint."""
    process_group_timeout_minutes: float = Field(default=60, gt=0, le=1440)
    """kubetune extension: how long a process of a multi-process run waits for the others in
    a collective (torch.distributed's process-group timeout) before it stops with an error;
    it must outlast what rank 0 does alone (validation, uploads). Local runs use 60."""
    env: dict[str, str] = {}
    """Extra non-secret environment variables for the container."""
    labels: dict[str, str] = {}
    """Extra labels for the Job and its pod."""
    hf_token_secret: SecretKeyRef | None = None
    """Optional Secret key holding a Hugging Face token (`HF_TOKEN`), for gated models."""
    nodes: int = Field(default=1, ge=1, le=512)
    """Pods (machines) the run spans, each with `gpus` GPUs (kubetune extension): `nodes` ×
    max(gpus, 1) training processes in all. 1 (default): one pod, as before; more: every pod
    runs torchrun with rank 0's pod as the rendezvous (docs/kubernetes.md). Going from one
    8-GPU node to two is `nodes: 2`."""
    backend: Backend = "job"
    """What runs the pods (kubetune extension): `job` (default; with nodes > 1 an Indexed Job
    plus a headless Service, core Kubernetes 1.24+), `jobset` (a JobSet,
    jobset.x-k8s.io/v1alpha2: needs the JobSet controller; one lost pod restarts the whole
    group) or `trainjob` (a Kubeflow Trainer v2 TrainJob on `training_runtime`: needs Kubeflow
    Trainer)."""
    training_runtime: str | None = None
    """backend trainjob only (kubetune extension): the ClusterTrainingRuntime the TrainJob runs
    on (default `torch-distributed`). It must be a torch runtime whose trainer container is
    named `node`, as Kubeflow's `torch-distributed`: it gives torchrun PET_NNODES,
    PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT."""
    rendezvous_port: int = Field(default=29500, ge=1024, le=65535)
    """nodes > 1 (kubetune extension): the port rank 0's pod listens on for torchrun's
    rendezvous (backend job and jobset; a TrainJob's runtime picks its own, 29500)."""
    topology: TopologyRequest | None = None
    """Kueue topology request (kubetune extension): keep all the run's pods within one domain
    of a node-label level (a rack, a block) for fast inter-node links. Needs `queue_name`
    and a cluster queue whose ResourceFlavor has a Topology. Empty: no request."""
    pod_patch: dict[str, Any] = {}
    """kubetune extension: a JSON merge patch (RFC 7386) applied to the generated pod spec,
    for what a cluster needs and kubetune does not model, e.g. `{hostNetwork: true}` for
    InfiniBand/NCCL, `runtimeClassName`, extra `volumes` for a dataset PVC or NFS, sidecars.
    Keys are PodSpec fields (camelCase); `null` removes a field; a list replaces the whole
    list (`launcher render` shows the result). Empty: the pod spec as generated. `validate`
    and `submit` warn when the patched pod breaks the restricted Pod Security profile."""

    @model_validator(mode="after")
    def _check(self) -> JobConfig:
        p = Problems()
        if self.name is not None:
            clean = sanitize_name(self.name)
            p.check(
                bool(clean), "name", f"{self.name!r} has no letters or digits; use e.g. my-lora"
            )
            p.check(
                len(clean) <= MAX_RUN_NAME,
                "name",
                f"must be at most {MAX_RUN_NAME} characters (got {len(clean)}); shorten it",
            )
        if self.namespace is not None:
            p.check(
                bool(DNS1123_LABEL.match(self.namespace)) and len(self.namespace) <= 63,
                "namespace",
                f"{self.namespace!r} is not a valid namespace name "
                "(lower-case letters, digits and '-')",
            )
        for field in ("cpu", "memory"):
            value = getattr(self, field)
            if value is not None and not QUANTITY.match(value):
                p.add(field, f"{value!r} is not a Kubernetes quantity (e.g. '4', '500m', '32Gi')")
        for key, value in self.labels.items():
            problem = label_problem(key, value)
            if problem:
                p.add(f"labels.{key}", problem)
        for key in self.env:
            if not ENV_NAME.match(key):
                p.add(f"env.{key}", f"{key!r} is not a valid environment variable name")
            elif any(word in key.upper() for word in SECRET_WORDS):
                p.add(
                    f"env.{key}",
                    f"{key} looks like a secret: keep it in a Kubernetes Secret "
                    "and reference it (job.hf_token_secret for the HF token, "
                    "storage.credentials_secret for S3 keys), never in env",
                )
        for key, value in self.pod_patch.items():
            problem = pod_patch_problem(key, value)
            if problem:
                p.add(f"pod_patch.{key}", problem)
        self._workload_problems(p)
        p.raise_if_any()
        return self

    def _workload_problems(self, p: Problems) -> None:
        """Rules of job.nodes / backend / topology: what each backend can express."""
        p.check(
            self.topology is None or self.queue_name is not None,
            "topology",
            "Kueue places only the workloads of its queues: set job.queue_name (a LocalQueue "
            "whose ClusterQueue has a Topology) or remove job.topology",
        )
        p.check(
            self.backend == "trainjob" or self.training_runtime is None,
            "training_runtime",
            "only used by backend trainjob: set job.backend: trainjob or remove it",
        )
        if self.nodes > 1:
            for key in RENDEZVOUS_POD_FIELDS:
                p.check(
                    key not in self.pod_patch,
                    f"pod_patch.{key}",
                    f"with job.nodes > 1 kubetune sets the pods' {key}: rank 0's DNS name is "
                    "the rendezvous address; remove it from pod_patch",
                )
        if self.backend == "trainjob":
            self._trainjob_problems(p)

    def _trainjob_problems(self, p: Problems) -> None:
        hint = "use backend jobset, or set it in the ClusterTrainingRuntime"
        p.check(
            self.priority_class_name is None,
            "priority_class_name",
            f"a TrainJob cannot set its pods' priorityClassName: {hint}",
        )
        p.check(
            self.image_pull_policy == "IfNotPresent",
            "image_pull_policy",
            f"a TrainJob takes the pull policy from its runtime (IfNotPresent for a tagged "
            f"image): remove it ({hint})",
        )
        for key in self.pod_patch:
            p.check(
                key in TRAINJOB_POD_FIELDS or key not in POD_SPEC_FIELDS,
                f"pod_patch.{key}",
                f"a TrainJob's runtimePatches cannot set {key} (only "
                f"{', '.join(sorted(TRAINJOB_POD_FIELDS))}): {hint}",
            )
