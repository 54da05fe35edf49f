"""kubetune's own sections: `job:` (the Kubernetes Job) and `storage:` (S3-compatible)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kubetune.config.base import ConfigModel, FieldProblems, Problems

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
# Env names / storage keys that hold secrets: they must come from a Kubernetes Secret.
SECRET_WORDS = ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY", "PRIVATE_KEY", "CREDENTIAL")
LITERAL_CREDENTIAL_KEYS = {
    "access_key",
    "access_key_id",
    "aws_access_key_id",
    "secret_key",
    "secret_access_key",
    "aws_secret_access_key",
    "session_token",
    "aws_session_token",
    "password",
    "token",
    "account_key",
    "sas_token",
    "service_account_key",
    "private_key",
}
# PodSpec fields (Kubernetes 1.31) and the JSON type of each, for job.pod_patch.
POD_SPEC_FIELDS: dict[str, type] = {
    **dict.fromkeys(("activeDeadlineSeconds", "priority", "terminationGracePeriodSeconds"), int),
    **dict.fromkeys(
        (
            "automountServiceAccountToken",
            "enableServiceLinks",
            "hostIPC",
            "hostNetwork",
            "hostPID",
            "hostUsers",
            "setHostnameAsFQDN",
            "shareProcessNamespace",
        ),
        bool,
    ),
    **dict.fromkeys(
        (
            "containers",
            "ephemeralContainers",
            "hostAliases",
            "imagePullSecrets",
            "initContainers",
            "readinessGates",
            "resourceClaims",
            "schedulingGates",
            "tolerations",
            "topologySpreadConstraints",
            "volumes",
        ),
        list,
    ),
    **dict.fromkeys(
        (
            "affinity",
            "dnsConfig",
            "nodeSelector",
            "os",
            "overhead",
            "resources",
            "securityContext",
        ),
        dict,
    ),
    **dict.fromkeys(
        (
            "dnsPolicy",
            "hostname",
            "nodeName",
            "preemptionPolicy",
            "priorityClassName",
            "restartPolicy",
            "runtimeClassName",
            "schedulerName",
            "serviceAccount",
            "serviceAccountName",
            "subdomain",
        ),
        str,
    ),
}
MAX_RUN_NAME = 52  # leaves room for "-<hash>" suffixes in Job/ConfigMap names (63 max)
Backend = Literal["job", "jobset", "trainjob"]
# What a TrainJob's runtimePatches may set in the pod spec (trainer.kubeflow.org/v1alpha1;
# containers only patch the runtime's own, so kubetune patches its trainer container alone).
TRAINJOB_POD_FIELDS = frozenset(
    {
        "affinity",
        "imagePullSecrets",
        "nodeSelector",
        "schedulingGates",
        "securityContext",
        "serviceAccountName",
        "terminationGracePeriodSeconds",
        "tolerations",
        "volumes",
    }
)
RENDEZVOUS_POD_FIELDS = ("hostname", "subdomain")  # multi-node pods' DNS names come from these


def sanitize_name(raw: str) -> str:
    """Lower-case, replace characters a DNS-1123 label cannot hold by '-', trim '-'."""
    name = re.sub(r"[^a-z0-9-]+", "-", raw.lower())
    return re.sub(r"-{2,}", "-", name).strip("-")


def label_problem(key: str, value: str) -> str | None:
    """The reason a Kubernetes label key/value is invalid, or None."""
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
        return f"label key prefix {prefix!r} is not a DNS subdomain"
    if not name or len(name) > 63 or not LABEL_NAME.match(name):
        return (
            f"label key {key!r} must be <= 63 characters of [A-Za-z0-9-_.], "
            "starting and ending alphanumeric"
        )
    if value and (len(value) > 63 or not LABEL_NAME.match(value)):
        return (
            f"label value {value!r} must be <= 63 characters of [A-Za-z0-9-_.], "
            "starting and ending alphanumeric"
        )
    return None


def _secret_hint(section: str) -> str:
    return (
        f"credentials never go in the config: create a Secret with `kubectl create secret "
        f"generic s3-credentials --from-literal=AWS_ACCESS_KEY_ID=... "
        f"--from-literal=AWS_SECRET_ACCESS_KEY=...` and set {section}.credentials_secret.name"
        f": s3-credentials (locally, export AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    )


class SecretKeyRef(ConfigModel):
    """A key in a Kubernetes Secret."""

    name: str
    """The Secret's name (in the Job's namespace)."""
    key: str = "HF_TOKEN"
    """The key inside the Secret."""


class CredentialsSecretRef(ConfigModel):
    """The Kubernetes Secret holding the storage credentials: the S3 access key pair, the GCS
    service-account key (JSON) or the Azure storage account key, by `storage.provider`."""

    name: str
    """The Secret's name, e.g. `s3-credentials`."""
    access_key_id_key: str = "AWS_ACCESS_KEY_ID"
    """S3: key of the access key id inside the Secret."""
    secret_access_key_key: str = "AWS_SECRET_ACCESS_KEY"
    """S3: key of the secret access key inside the Secret."""
    service_account_key_key: str = "GOOGLE_SERVICE_ACCOUNT_KEY"
    """GCS (kubetune extension): key of the service-account key JSON inside the Secret (given
    to the pod as `GOOGLE_SERVICE_ACCOUNT_KEY`)."""
    account_key_key: str = "AZURE_STORAGE_ACCOUNT_KEY"
    """Azure (kubetune extension): key of the storage account key inside the Secret (given to
    the pod as `AZURE_STORAGE_ACCOUNT_KEY`)."""


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


def pod_patch_problem(key: str, value: Any) -> str | None:
    """Why `key: value` cannot be a top-level entry of job.pod_patch, or None."""
    expected = POD_SPEC_FIELDS.get(key)
    if expected is None:
        return (
            f"{key!r} is not a PodSpec field; use the Kubernetes (camelCase) name, e.g. "
            "hostNetwork, volumes, runtimeClassName, containers"
        )
    if value is None:
        if key == "containers":
            return "cannot remove the trainer container; patch it or add sidecars instead"
        return None
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        kind = {int: "an integer", bool: "true or false", list: "a list", dict: "a mapping"}
        return f"must be {kind.get(expected, 'a string')} (got {type(value).__name__})"
    return None


class StorageConfig(ConfigModel):
    """Object storage for datasets and outputs: S3 or any S3-compatible server, Google Cloud
    Storage or Azure Blob Storage (`provider`)."""

    provider: Literal["s3", "gcs", "azure"] = "s3"
    """kubetune extension: the cloud of `bucket`, and so the outputs' URI scheme (`s3://`,
    `gs://`, `az://`). These settings apply to that cloud's URIs only; a dataset on another
    cloud uses that cloud's environment (e.g. `GOOGLE_*`, `AZURE_STORAGE_*`)."""
    endpoint_url: str | None = None
    """Endpoint override, e.g. `http://minio.kubetune:9000` (S3), an emulator's URL (GCS), or
    `http://azurite:10000/devstoreaccount1` (Azure). Default: the cloud's own (S3: AWS or
    $AWS_ENDPOINT_URL)."""
    bucket: str
    """Bucket (Azure: container) that receives the run's outputs under `<prefix>/<run name>/`."""
    account_name: str | None = None
    """kubetune extension, Azure only (required there): the storage account holding the
    container."""
    workload_identity: bool = False
    """kubetune extension: credentials come from the pod's ServiceAccount (`job.service_account`)
    instead of a Secret: EKS IRSA (the ServiceAccount annotated with
    `eks.amazonaws.com/role-arn`), GKE Workload Identity (`iam.gke.io/gcp-service-account`) or
    Azure Workload Identity (`azure.workload.identity/client-id`; the Job's pod gets the
    `azure.workload.identity/use: "true"` label). Not with `credentials_secret`."""
    prefix: str = "kubetune"
    """Key prefix inside the bucket for all runs."""
    region: str | None = None
    """S3: region name (many S3-compatible servers accept any, e.g. us-east-1)."""
    addressing_style: Literal["auto", "path", "virtual"] = "path"
    """S3: bucket addressing: `path` suits most self-hosted servers, `virtual` suits AWS."""
    verify_tls: bool = True
    """Verify the endpoint's TLS certificate."""
    credentials_secret: CredentialsSecretRef | None = None
    """Kubernetes Secret with the credentials (injected as environment variables; which keys
    by `provider`)."""

    @model_validator(mode="after")
    def _provider_fields(self) -> StorageConfig:
        problems = []
        if self.provider == "azure" and not self.account_name:
            problems.append(("account_name", "required with provider: azure (the storage account)"))
        if self.provider != "azure" and self.account_name:
            problems.append(("account_name", "only for provider: azure"))
        if self.workload_identity and self.credentials_secret is not None:
            problems.append(
                ("workload_identity", "use either workload_identity or credentials_secret")
            )
        if problems:
            raise FieldProblems(problems)
        return self

    @model_validator(mode="before")
    @classmethod
    def _reject_literal_credentials(cls, data: Any) -> Any:
        if isinstance(data, dict):
            literal = sorted(k for k in data if str(k).lower() in LITERAL_CREDENTIAL_KEYS)
            if literal:
                raise FieldProblems([(key, _secret_hint("storage")) for key in literal])
        return data

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", value):
            raise ValueError(
                f"{value!r} is not a valid bucket name (3-63 lower-case letters, "
                "digits, '.' and '-')"
            )
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.strip("/")
        if ".." in value.split("/"):
            raise ValueError("must not contain '..' segments")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} must be an http(s):// URL, e.g. http://127.0.0.1:8333")
        if value is not None and re.match(r"^https?://[^/]*@", value):
            raise ValueError("must not embed credentials; " + _secret_hint("storage"))
        return value
