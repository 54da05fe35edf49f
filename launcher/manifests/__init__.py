"""Config → Kubernetes manifests (pure: no cluster, no I/O).

`build_manifests(cfg)` is the one source of truth for a run's objects: the ConfigMap (the
resolved config) and the workload of `job.backend`, in creation order. `render` prints them
and the Kubernetes backend creates them. One renderer per backend behind `RENDERERS`:
`job` (`launcher.manifests.job`: a Job, or an Indexed Job + headless Service), `jobset`
(`launcher.manifests.jobset`), `trainjob` (`launcher.manifests.trainjob`); what they share
is in `launcher.manifests.common`, the torchrun contract in `launcher.manifests.launch`,
Kueue's labels and annotations in `launcher.manifests.kueue`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kubetune.config import PipelineConfig
from kubetune.config.cluster import JobConfig
from kubetune.layout import START_OVER_ENV
from launcher.manifests.common import (
    ANNOTATION_OUTPUT,
    CACHE_DIR,
    CONFIG_DIR,
    CONFIG_PATH,
    CONTAINER,
    HASH_LENGTH,
    LABEL_HASH,
    LABEL_INSTANCE,
    LABEL_NAME,
    LABEL_QUEUE,
    LABEL_RUN,
    POD_CACHE_ENV,
    RUNNER_UID,
    config_map,
    job_name,
    merge_patch,
    notify_secret_env,
    object_meta,
    pod_spec,
    require_storage,
    run_labels,
    runner_command,
    runner_env,
    secret_env,
    to_yaml,
)
from launcher.manifests.job import job_objects
from launcher.manifests.jobset import jobset_objects
from launcher.manifests.trainjob import trainjob_objects

Obj = dict[str, Any]
RENDERERS: dict[str, Callable[[PipelineConfig, Obj], list[Obj]]] = {
    "job": job_objects,
    "jobset": jobset_objects,
    "trainjob": trainjob_objects,
}


def build_manifests(
    cfg: PipelineConfig, *, namespace: str | None = None, start_over: str | None = None
) -> list[Obj]:
    """The run's ConfigMap, its workload and what the workload needs (a headless Service),
    in creation order. `start_over`: a token that makes the workload's first pod start the
    run over from step 0 (`submit --replace` of a finished run; `kubetune.layout`)."""
    require_storage(cfg)
    job = cfg.job or JobConfig()
    meta = object_meta(cfg, namespace or job.namespace)
    config, workload, *extras = [config_map(cfg, meta), *RENDERERS[job.backend](cfg, meta)]
    if start_over is not None:
        workload = with_runner_env(workload, START_OVER_ENV, start_over)
    return [config, workload, *extras]


def with_runner_env(obj: Any, name: str, value: str) -> Any:
    """`obj` with NAME=VALUE added to every env list that carries the runner's env contract
    (KUBETUNE_CONFIG_HASH): the trainer container of each kind of workload."""
    if isinstance(obj, list):
        if any(isinstance(e, dict) and e.get("name") == "KUBETUNE_CONFIG_HASH" for e in obj):
            return [*obj, {"name": name, "value": value}]
        return [with_runner_env(item, name, value) for item in obj]
    if isinstance(obj, dict):
        return {key: with_runner_env(item, name, value) for key, item in obj.items()}
    return obj


__all__ = [
    "ANNOTATION_OUTPUT",
    "CACHE_DIR",
    "CONFIG_DIR",
    "CONFIG_PATH",
    "CONTAINER",
    "HASH_LENGTH",
    "LABEL_HASH",
    "LABEL_INSTANCE",
    "LABEL_NAME",
    "LABEL_QUEUE",
    "LABEL_RUN",
    "POD_CACHE_ENV",
    "RENDERERS",
    "RUNNER_UID",
    "build_manifests",
    "job_name",
    "merge_patch",
    "notify_secret_env",
    "pod_spec",
    "run_labels",
    "runner_command",
    "runner_env",
    "secret_env",
    "to_yaml",
]
