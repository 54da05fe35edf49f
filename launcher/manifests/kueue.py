"""Kueue on every backend (pure): the queue-name label goes on the workload (the manifests'
`workload_meta`), the workload is created suspended, and a topology request is an annotation
on the pod template (Kueue's Topology-Aware Scheduling)."""

from __future__ import annotations

from typing import Any

from kubetune.config.cluster import JobConfig

TOPOLOGY_ANNOTATIONS = {
    "required": "kueue.x-k8s.io/podset-required-topology",
    "preferred": "kueue.x-k8s.io/podset-preferred-topology",
}


def pod_template_meta(labels: dict[str, str], job: JobConfig) -> dict[str, Any]:
    """A pod template's metadata: the run's labels, plus the topology request if any."""
    meta: dict[str, Any] = {"labels": dict(labels)}
    if job.topology is not None:
        meta["annotations"] = {TOPOLOGY_ANNOTATIONS[job.topology.mode]: job.topology.level}
    return meta


def suspended(job: JobConfig) -> bool:
    """Created suspended: Kueue unsuspends it on admission."""
    return job.queue_name is not None
