"""backend `job` (pure): one pod in a batch/v1 Job, or with `job.nodes` > 1 an Indexed Job
(one pod per node, hostname `<job>-<index>`) plus the headless Service that gives rank 0's
pod the stable DNS name `<job>-0.<job>` every pod rendezvouses at (the Kubernetes task "Job
with Pod-to-Pod Communication")."""

from __future__ import annotations

from typing import Any

from kubetune.config import PipelineConfig
from kubetune.config.cluster import JobConfig
from kubetune.errors import EXIT_PREEMPTED, EXIT_USER_ERROR
from launcher.manifests import kueue
from launcher.manifests.common import (
    CONTAINER,
    LABEL_HASH,
    LABEL_RUN,
    pod_labels,
    pod_spec,
    workload_meta,
)
from launcher.manifests.launch import PORT_NAME, with_launch

Obj = dict[str, Any]


def job_objects(cfg: PipelineConfig, meta: Obj) -> list[Obj]:
    """The Job, and with nodes > 1 the headless Service after it (creation order)."""
    job = cfg.job or JobConfig()
    name = meta["name"]
    if job.nodes == 1:
        return [_job(cfg, workload_meta(cfg, meta), pod_spec(cfg, name))]
    master = f"{name}-0.{name}"
    spec = pod_spec(cfg, name, lambda c: with_launch(c, job, master))
    spec["subdomain"] = name
    indexed = _job(cfg, workload_meta(cfg, meta), spec)
    indexed["spec"].update(
        completionMode="Indexed",
        completions=job.nodes,
        parallelism=job.nodes,
        # A Job counts failed pods: one lost node makes every other rank stop too, so
        # backoff_limit group restarts allow backoff_limit x nodes failed pods.
        backoffLimit=job.backoff_limit * job.nodes,
    )
    return [indexed, headless_service(cfg, meta, job)]


def _job(cfg: PipelineConfig, meta: Obj, pod: Obj) -> Obj:
    job = cfg.job or JobConfig()
    spec: Obj = {
        "backoffLimit": job.backoff_limit,
        "completions": 1,
        "parallelism": 1,
        "podFailurePolicy": {"rules": pod_failure_rules()},
        "template": {"metadata": kueue.pod_template_meta(pod_labels(cfg), job), "spec": pod},
    }
    if job.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = job.active_deadline_seconds
    if job.ttl_seconds_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = job.ttl_seconds_after_finished
    if kueue.suspended(job):
        spec["suspend"] = True
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


def pod_failure_rules(container: str = CONTAINER, action: str = "Ignore") -> list[Obj]:
    """Preemption and the runner's checkpointed-on-SIGTERM exit do not count against
    backoffLimit (`action` Ignore); a config/user error (exit 2) fails the Job at once."""

    def codes(values: list[int]) -> Obj:
        return {"containerName": container, "operator": "In", "values": values}

    return [
        {"action": action, "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": action, "onExitCodes": codes([EXIT_PREEMPTED])},
        {"action": "FailJob", "onExitCodes": codes([EXIT_USER_ERROR])},
    ]


def headless_service(cfg: PipelineConfig, meta: Obj, job: JobConfig) -> Obj:
    """DNS records `<pod hostname>.<service>` for the Job's pods, published before they are
    ready (rank 0 must be reachable while the others are still starting)."""
    labels = meta["labels"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": dict(meta),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_RUN: labels[LABEL_RUN], LABEL_HASH: labels[LABEL_HASH]},
            "ports": [{"name": PORT_NAME, "port": job.rendezvous_port, "protocol": "TCP"}],
        },
    }
