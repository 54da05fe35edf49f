"""backend `trainjob` (pure): a Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1)
on a torch ClusterTrainingRuntime (default `torch-distributed`).

The trainer sets image, command, env, `numNodes`, `numProcPerNode` and `resourcesPerNode`;
the runtime's torch plugin gives the container PET_NNODES, PET_NPROC_PER_NODE,
PET_NODE_RANK, PET_MASTER_ADDR (`<trainjob>-node-0-0.<trainjob>`) and PET_MASTER_PORT, which
torchrun reads as its defaults. The rest of kubetune's pod (labels, security contexts, the
config volume, scheduling) goes in `runtimePatches`, which allows only some pod fields
(`kubetune.config.cluster.TRAINJOB_POD_FIELDS`): the runtime decides restart policy, pull
policy and failure handling."""

from __future__ import annotations

from typing import Any

from kubetune.config import PipelineConfig
from kubetune.config.cluster import TRAINJOB_POD_FIELDS, JobConfig
from launcher.manifests import kueue
from launcher.manifests.common import REPLICATED_JOB, pod_labels, pod_spec, workload_meta
from launcher.manifests.launch import node_env, pet_command, procs_per_node

Obj = dict[str, Any]
API_VERSION = "trainer.kubeflow.org/v1alpha1"
DEFAULT_RUNTIME = "torch-distributed"
CONTAINER = "node"  # the runtime's trainer container (Kubeflow's torch runtimes)
PATCH_MANAGER = "kubetune.io/launcher"


def trainjob_objects(cfg: PipelineConfig, meta: Obj) -> list[Obj]:
    job = cfg.job or JobConfig()
    pod = pod_spec(cfg, meta["name"])
    container = pod["containers"][0]
    spec: Obj = {
        "runtimeRef": {
            "name": job.training_runtime or DEFAULT_RUNTIME,
            "apiGroup": "trainer.kubeflow.org",
            "kind": "ClusterTrainingRuntime",
        },
        "trainer": {
            "image": container["image"],
            "command": pet_command(),
            "env": [*container["env"], *node_env(job)],
            "numNodes": job.nodes,
            "numProcPerNode": procs_per_node(job),
            "resourcesPerNode": container["resources"],
        },
        "runtimePatches": [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": _patch(cfg, pod)}],
    }
    if job.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = job.active_deadline_seconds
    if kueue.suspended(job):
        spec["suspend"] = True
    meta = workload_meta(cfg, meta)
    return [{"apiVersion": API_VERSION, "kind": "TrainJob", "metadata": meta, "spec": spec}]


def pod_patch(pod: Obj) -> Obj:
    """kubetune's pod spec cut to what runtimePatches may set; the trainer container is the
    runtime's `node`, patched with its security context and mounts only."""
    out = {k: v for k, v in pod.items() if k in TRAINJOB_POD_FIELDS}
    trainer = pod["containers"][0]
    patch = {"name": CONTAINER}
    patch.update({k: trainer[k] for k in ("securityContext", "volumeMounts") if k in trainer})
    out["containers"] = [patch]
    return out


def _patch(cfg: PipelineConfig, pod: Obj) -> Obj:
    job = cfg.job or JobConfig()
    template = {
        "metadata": kueue.pod_template_meta(pod_labels(cfg), job),
        "spec": pod_patch(pod),
    }
    replicated = {"name": REPLICATED_JOB, "template": {"spec": {"template": template}}}
    return {"template": {"spec": {"replicatedJobs": [replicated]}}}
