"""What every backend's manifests share (pure): names, labels, the env contract, the pod
spec with `job.pod_patch` merged in, the ConfigMap, and YAML output."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml

from kubetune.config import PipelineConfig, config_hash, config_to_yaml, output_uri, run_name
from kubetune.config.cluster import JobConfig, StorageConfig
from kubetune.config.notify import HMAC_ENV, NotifyConfig, url_env
from kubetune.errors import UserError

CONTAINER = "trainer"
CONFIG_DIR = "/etc/kubetune"
CONFIG_PATH = f"{CONFIG_DIR}/config.yaml"
RUNNER_UID = 1000
CACHE_DIR = "/cache"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_RUN = "kubetune.io/run"
LABEL_HASH = "kubetune.io/config-hash"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_OUTPUT = "kubetune.io/output-uri"
HASH_LENGTH = 8
MAX_HOSTNAME = 63  # a pod's hostname (and a Service's name) is one DNS label
REPLICATED_JOB = "node"  # the JobSet / TrainJob replicated job (Kubeflow's runtimes name it so)
# Caches and scratch space live on emptyDirs: the root filesystem is read-only.
POD_CACHE_ENV = {
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "XDG_CACHE_HOME": CACHE_DIR,
    "HF_HOME": f"{CACHE_DIR}/huggingface",
    "TORCH_HOME": f"{CACHE_DIR}/torch",
    "TRITON_CACHE_DIR": f"{CACHE_DIR}/triton",
    "MPLCONFIGDIR": "/tmp/matplotlib",
}


def job_name(cfg: PipelineConfig) -> str:
    """`<run>-<config hash>`: deterministic, so resubmitting the same config is a no-op.

    A multi-node workload (or a JobSet / TrainJob) names a headless Service and its pods'
    hostnames after it: it starts with a letter (DNS-1035) and is cut so that the longest
    pod hostname fits in one DNS label."""
    run, digest = run_name(cfg), config_hash(cfg)[:HASH_LENGTH]
    job = cfg.job or JobConfig()
    if job.nodes == 1 and job.backend == "job":
        return f"{run}-{digest}"
    stem = run if run[0].isalpha() else f"kt-{run}"
    budget = MAX_HOSTNAME - len(hostname_suffix(job)) - HASH_LENGTH - 1
    return f"{stem[:budget].rstrip('-')}-{digest}"


def hostname_suffix(job: JobConfig) -> str:
    """What follows the workload's name in its last pod's hostname."""
    last = job.nodes - 1
    return f"-{last}" if job.backend == "job" else f"-{REPLICATED_JOB}-0-{last}"


def object_meta(cfg: PipelineConfig, namespace: str | None) -> dict[str, Any]:
    """name, labels (and namespace) shared by every object of the run."""
    meta: dict[str, Any] = {"name": job_name(cfg), "labels": run_labels(cfg)}
    if namespace:
        meta["namespace"] = namespace
    return meta


def workload_meta(cfg: PipelineConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """The workload's metadata: the run's labels (plus Kueue's queue label) and annotations."""
    job = cfg.job or JobConfig()
    labels = dict(meta["labels"])
    if job.queue_name:
        labels[LABEL_QUEUE] = job.queue_name
    annotations = {ANNOTATION_OUTPUT: output_uri(cfg), "kubetune.io/type": cfg.type}
    return {**meta, "labels": labels, "annotations": annotations}


def config_map(cfg: PipelineConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """The resolved config the pods read at CONFIG_PATH."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": dict(meta),
        "data": {"config.yaml": config_to_yaml(cfg)},
    }


def require_storage(cfg: PipelineConfig) -> None:
    if cfg.storage is None:
        raise UserError(
            "a Kubernetes run needs a `storage:` section: a pod's local disk vanishes with it",
            hint="add storage.bucket (and credentials_secret), or use `launcher submit --local`",
        )


def run_labels(cfg: PipelineConfig) -> dict[str, str]:
    """Labels on the Job and its pod: the backends select runs by them."""
    run = run_name(cfg)
    labels = dict(cfg.job.labels) if cfg.job else {}
    labels.update(
        {
            LABEL_NAME: "kubetune",
            LABEL_INSTANCE: run,
            "app.kubernetes.io/component": "training",
            "app.kubernetes.io/managed-by": "kubetune",
            LABEL_RUN: run,
            LABEL_HASH: config_hash(cfg),
        }
    )
    return labels


def runner_env(cfg: PipelineConfig) -> dict[str, str]:
    """Non-secret environment shared by the pod and local runs (the env contract)."""
    env = {
        "PYTHONUNBUFFERED": "1",
        "KUBETUNE_RUN": run_name(cfg),
        "KUBETUNE_CONFIG_HASH": config_hash(cfg),
    }
    if cfg.storage is not None:
        env.update(storage_env(cfg.storage))
    if cfg.job:
        env.update(cfg.job.env)
    return env


def storage_env(storage: StorageConfig) -> dict[str, str]:
    """The provider's own (non-secret) variables for the storage settings, so tools in the pod
    that read the environment reach the same endpoint and account."""
    env: dict[str, str] = {}
    if storage.provider == "s3":
        if storage.endpoint_url:
            env["AWS_ENDPOINT_URL"] = storage.endpoint_url
        if storage.region:
            env["AWS_REGION"] = env["AWS_DEFAULT_REGION"] = storage.region
    elif storage.provider == "gcs":
        if storage.endpoint_url:
            env["GOOGLE_BASE_URL"] = storage.endpoint_url
    else:
        env["AZURE_STORAGE_ACCOUNT_NAME"] = storage.account_name or ""
        if storage.endpoint_url:
            env["AZURE_STORAGE_ENDPOINT"] = storage.endpoint_url
    return env


def pod_labels(cfg: PipelineConfig) -> dict[str, str]:
    """Labels of the run's pods: the run's, plus what the storage's identity webhook needs."""
    return {**run_labels(cfg), **storage_pod_labels(cfg.storage)}


def storage_pod_labels(storage: StorageConfig | None) -> dict[str, str]:
    """Azure Workload Identity's webhook injects the federated token only into pods carrying
    this label (EKS IRSA and GKE Workload Identity need only the ServiceAccount)."""
    if storage is not None and storage.provider == "azure" and storage.workload_identity:
        return {"azure.workload.identity/use": "true"}
    return {}


# torchrun, in process, exiting with the workers' exit code (bare torchrun exits 1 for a
# worker's exit 2 and on SIGTERM, which the podFailurePolicy would then retry).
TORCHRUN = ["python", "-m", "runner.launch"]
# How long torchrun lets its workers stop (checkpoint) after passing a SIGTERM on, before it
# SIGKILLs them (torch's default: 30 s): the pod's whole grace period.
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"


def runner_command(gpus: int, config_path: str = CONFIG_PATH) -> list[str]:
    """One process, or torchrun (`python -m runner.launch`, which exits with the workers'
    exit code) with one process per GPU."""
    if gpus > 1:
        return [*TORCHRUN, "--standalone", "--nproc_per_node", str(gpus), "-m", "runner",
                config_path]  # fmt: skip
    return ["python", "-m", "runner", config_path]


Container = dict[str, Any]


def pod_spec(
    cfg: PipelineConfig, name: str, adjust: Callable[[Container], Container] | None = None
) -> dict[str, Any]:
    """The pod spec of the run's workload, with `job.pod_patch` merged in (RFC 7386).
    `adjust` rewrites the trainer container first (a multi-node launch command and env)."""
    job = cfg.job or JobConfig()
    spec = _pod_spec(cfg, job, name)
    if adjust is not None:
        spec["containers"] = [adjust(spec["containers"][0])]
    return merge_patch(spec, job.pod_patch)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: mappings merge key by key, `None` deletes a key, anything
    else (lists included) replaces. Neither argument is modified."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pod_spec(cfg: PipelineConfig, job: JobConfig, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": job.termination_grace_period_seconds,
        "automountServiceAccountToken": False,  # the runner never talks to the API
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNNER_UID,
            "runAsGroup": RUNNER_UID,
            "fsGroup": RUNNER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(cfg, job)],
        "volumes": [
            {"name": "config", "configMap": {"name": name}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # DataLoader workers
        ],
    }
    if job.service_account:
        spec["serviceAccountName"] = job.service_account
    if job.priority_class_name:
        spec["priorityClassName"] = job.priority_class_name
    if job.node_selector:
        spec["nodeSelector"] = dict(job.node_selector)
    if job.tolerations:
        spec["tolerations"] = [
            _toleration(t.model_dump(exclude_none=True)) for t in job.tolerations
        ]
    return spec


def _toleration(raw: dict[str, Any]) -> dict[str, Any]:
    seconds = raw.pop("toleration_seconds", None)
    return {**raw, "tolerationSeconds": seconds} if seconds is not None else raw


def _container(cfg: PipelineConfig, job: JobConfig) -> dict[str, Any]:
    return {
        "name": CONTAINER,
        "image": job.image,
        "imagePullPolicy": job.image_pull_policy,
        "command": runner_command(job.gpus),
        "env": _env(cfg, job),
        "resources": _resources(job),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }


def _resources(job: JobConfig) -> dict[str, Any]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if job.gpus:
        limits[job.gpu_resource_name] = str(job.gpus)
    if job.cpu:
        requests["cpu"] = job.cpu
    if job.memory:
        requests["memory"] = limits["memory"] = job.memory
    return {k: v for k, v in (("limits", limits), ("requests", requests)) if v}


def _env(cfg: PipelineConfig, job: JobConfig) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in POD_CACHE_ENV.items()]
    env += [{"name": k, "value": v} for k, v in runner_env(cfg).items()]
    env.append({"name": "KUBETUNE_CONFIG", "value": CONFIG_PATH})
    env += secret_env(cfg.storage, job)
    env += notify_secret_env(cfg.notify)
    if job.gpus > 1 or job.nodes > 1:  # torchrun: SIGKILL 30 s after passing SIGTERM on
        seconds = str(job.termination_grace_period_seconds)
        env.append({"name": SHUTDOWN_TIMEOUT_ENV, "value": seconds})
    return env


def secret_env(storage: StorageConfig | None, job: JobConfig) -> list[dict[str, Any]]:
    """Credentials as secretKeyRefs only: the values never appear in a manifest."""
    refs: list[tuple[str, str, str]] = []
    if storage is not None and storage.credentials_secret is not None:
        sec = storage.credentials_secret
        refs += {
            "s3": [
                ("AWS_ACCESS_KEY_ID", sec.name, sec.access_key_id_key),
                ("AWS_SECRET_ACCESS_KEY", sec.name, sec.secret_access_key_key),
            ],
            "gcs": [("GOOGLE_SERVICE_ACCOUNT_KEY", sec.name, sec.service_account_key_key)],
            "azure": [("AZURE_STORAGE_ACCOUNT_KEY", sec.name, sec.account_key_key)],
        }[storage.provider]
    if job.hf_token_secret is not None:
        refs.append(("HF_TOKEN", job.hf_token_secret.name, job.hf_token_secret.key))
    return [
        {"name": env, "valueFrom": {"secretKeyRef": {"name": name, "key": key}}}
        for env, name, key in refs
    ]


def notify_secret_env(notify: NotifyConfig | None) -> list[dict[str, Any]]:
    """Webhook URLs kept in Secrets and the HMAC signing key, as secretKeyRefs only."""
    if notify is None:
        return []
    refs = [(url_env(i), hook.url_secret) for i, hook in enumerate(notify.webhooks)]
    refs.append((HMAC_ENV, notify.hmac_secret))
    return [
        {"name": env, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        for env, ref in refs
        if ref is not None
    ]


def to_yaml(objs: list[dict[str, Any]]) -> str:
    """Multi-document YAML, as `kubectl apply -f -` reads it."""
    return yaml.safe_dump_all(objs, sort_keys=False, allow_unicode=True)
