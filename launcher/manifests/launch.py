"""The multi-node launch contract (pure): what every pod of a multi-node run runs.

Each pod runs one torchrun agent (`python -m runner.launch`: torchrun in process, exiting
with the workers' exit code) with static rendezvous: node rank = the pod's completion index,
rank 0's pod (its stable DNS name) hosts the rendezvous store on `rendezvous_port`.
A JobSet's and an Indexed Job's pods get the arguments on the command line; a TrainJob's
get them from the PET_* variables Kubeflow Trainer's torch runtime sets, which torchrun
reads as its defaults. The same contract either way:

    python -m runner.launch --nnodes N --nproc_per_node G --node_rank $(KUBETUNE_NODE_RANK)
             --master_addr <rank 0's pod DNS name> --master_port 29500
             --rdzv_conf timeout=<s> -m runner /etc/kubetune/config.yaml
"""

from __future__ import annotations

from typing import Any

from kubetune.config.cluster import JobConfig
from launcher.manifests.common import CONFIG_PATH, TORCHRUN

NODE_RANK_ENV = "KUBETUNE_NODE_RANK"
NUM_NODES_ENV = "KUBETUNE_NUM_NODES"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
COMPLETION_INDEX_FIELD = f"metadata.annotations['{COMPLETION_INDEX}']"
# How long rank 0 waits for every pod to join (torchrun's static default is 600 s; pods of
# one run can be scheduled and pull their image minutes apart).
RENDEZVOUS_TIMEOUT_S = 1800
PORT_NAME = "rendezvous"


def procs_per_node(job: JobConfig) -> int:
    """Training processes per pod: one per GPU, one on a CPU-only pod."""
    return max(job.gpus, 1)


def torchrun_command(job: JobConfig, master_addr: str) -> list[str]:
    """The command of every pod of an Indexed Job or a JobSet."""
    return [
        *TORCHRUN,
        "--nnodes",
        str(job.nodes),
        "--nproc_per_node",
        str(procs_per_node(job)),
        "--node_rank",
        f"$({NODE_RANK_ENV})",  # expanded by the kubelet from the env below
        "--master_addr",
        master_addr,
        "--master_port",
        str(job.rendezvous_port),
        "--rdzv_conf",
        f"timeout={RENDEZVOUS_TIMEOUT_S}",
        "-m",
        "runner",
        CONFIG_PATH,
    ]


def pet_command() -> list[str]:
    """The command of a TrainJob's pods: torchrun takes every launch argument from the
    runtime's PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT."""
    return [
        *TORCHRUN,
        "--rdzv_conf",
        f"timeout={RENDEZVOUS_TIMEOUT_S}",
        "-m",
        "runner",
        CONFIG_PATH,
    ]


def node_env(job: JobConfig) -> list[dict[str, Any]]:
    """The pod's node rank (its completion index) and the node count, for the command and
    for the runner's logs."""
    return [
        {"name": NODE_RANK_ENV, "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX_FIELD}}},
        {"name": NUM_NODES_ENV, "value": str(job.nodes)},
    ]


def with_launch(container: dict[str, Any], job: JobConfig, master_addr: str) -> dict[str, Any]:
    """The trainer container of a multi-node pod: torchrun, node env, the rendezvous port."""
    return {
        **container,
        "command": torchrun_command(job, master_addr),
        "env": [*container["env"], *node_env(job)],
        "ports": [{"name": PORT_NAME, "containerPort": job.rendezvous_port, "protocol": "TCP"}],
    }
