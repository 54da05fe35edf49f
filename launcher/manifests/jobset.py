"""backend `jobset` (pure): a JobSet (jobset.x-k8s.io/v1alpha2) with one replicated Job
`node` of `nodes` indexed pods. The JobSet controller makes the headless Service (named after
the JobSet) and the pod hostnames `<jobset>-node-0-<index>`; rank 0 is `<jobset>-node-0-0`.

Failures restart the whole group, as a multi-node run needs: any failed pod fails its Job
(backoffLimit 0) and the JobSet recreates every Job, resuming from the last checkpoint.
Preemption and the runner's checkpointed exit 143 restart without using up
`job.backoff_limit` (the JobSet's maxRestarts); a config error (exit 2) fails the JobSet."""

from __future__ import annotations

from typing import Any

from kubetune.config import PipelineConfig
from kubetune.config.cluster import JobConfig
from launcher.manifests import kueue
from launcher.manifests.common import REPLICATED_JOB, pod_labels, pod_spec, workload_meta
from launcher.manifests.job import pod_failure_rules
from launcher.manifests.launch import with_launch

Obj = dict[str, Any]
API_VERSION = "jobset.x-k8s.io/v1alpha2"
# The Job controller's message for a FailJob rule on exit code 2 (a config / data error).
CONFIG_ERROR_MESSAGE = "exit code 2 matching FailJob rule"


def jobset_objects(cfg: PipelineConfig, meta: Obj) -> list[Obj]:
    job = cfg.job or JobConfig()
    name = meta["name"]
    spec: Obj = {
        "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
        "failurePolicy": {"maxRestarts": job.backoff_limit, "rules": failure_rules()},
        "replicatedJobs": [
            {"name": REPLICATED_JOB, "replicas": 1, "template": _job(cfg, job, name)}
        ],
    }
    if job.ttl_seconds_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = job.ttl_seconds_after_finished
    if kueue.suspended(job):
        spec["suspend"] = True
    meta = workload_meta(cfg, meta)
    return [{"apiVersion": API_VERSION, "kind": "JobSet", "metadata": meta, "spec": spec}]


def master_addr(name: str) -> str:
    """Rank 0's pod: `<jobset>-<replicated job>-<job index>-<pod index>.<subdomain>`."""
    return f"{name}-{REPLICATED_JOB}-0-0.{name}"


def _job(cfg: PipelineConfig, job: JobConfig, name: str) -> Obj:
    """The replicated Job's template. The run's labels go on its pods only, so a JobSet's
    child Job is never listed as a run of its own."""
    spec: Obj = {
        "completionMode": "Indexed",
        "completions": job.nodes,
        "parallelism": job.nodes,
        "backoffLimit": 0,
        "podFailurePolicy": {"rules": pod_failure_rules(action="FailJob")},
        "template": {
            "metadata": kueue.pod_template_meta(pod_labels(cfg), job),
            "spec": pod_spec(cfg, name, lambda c: with_launch(c, job, master_addr(name))),
        },
    }
    if job.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = job.active_deadline_seconds  # per attempt
    return {"spec": spec}


def failure_rules() -> list[Obj]:
    """First match wins; a Job failure no rule names restarts the group and counts."""
    return [
        {
            "name": "ConfigError",
            "action": "FailJobSet",
            "onJobFailureReasons": ["PodFailurePolicy"],
            "onJobFailureMessagePatterns": [CONFIG_ERROR_MESSAGE],
        },
        {
            "name": "PreemptedOrCheckpointed",
            "action": "RestartJobSetAndIgnoreMaxRestarts",
            "onJobFailureReasons": ["PodFailurePolicy"],
        },
        {"name": "Failed", "action": "RestartJobSet"},
    ]
