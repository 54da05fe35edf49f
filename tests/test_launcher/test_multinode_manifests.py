"""The multi-node renderers (issue 23): an Indexed Job + headless Service, a JobSet and a
TrainJob, each schema-valid offline (Kubernetes 1.31 OpenAPI, strict; the JobSet / TrainJob
CRD schemas, strict), restricted, Kueue-aware, and launching the torchrun command torch's own
argument parser reads as intended."""

from __future__ import annotations

import copy
import os
from typing import Any
from unittest import mock

import pytest
from crd_schemas import crd_api_version, crd_errors, torch_runtime
from k8s_checks import restricted_problems, validate_strict
from kube_configs import make_config

from launcher import manifests
from launcher.manifests.common import merge_patch
from launcher.manifests.launch import pet_command
from launcher.pod_security import restricted_violations

Obj = dict[str, Any]
TWO_NODES = {"nodes": 2, "gpus": 8}
LAUNCH = ["python", "-m", "runner.launch"]


def _objs(**job: Any) -> list[Obj]:
    return manifests.build_manifests(make_config("SDXL_LORA", **job), namespace="team-a")


def _kind(objs: list[Obj], kind: str) -> Obj:
    return next(o for o in objs if o["kind"] == kind)


def _env(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container["env"]}


def _torchrun_args(command: list[str], env: dict[str, str]) -> Any:
    """torch's own torchrun parser, after the kubelet's $(VAR) expansion, with the PET_*
    variables of `env` (and no others) in the environment, as torchrun reads them."""
    from torch.distributed.run import get_args_parser

    argv = [a.replace("$(KUBETUNE_NODE_RANK)", env.get("KUBETUNE_NODE_RANK", "")) for a in command]
    assert argv[:3] == LAUNCH  # torchrun, in process, exiting with the workers' exit code
    pet = {k: v for k, v in env.items() if k.startswith("PET_")}
    with mock.patch.dict(os.environ, pet):
        for key in [k for k in os.environ if k.startswith("PET_") and k not in pet]:
            del os.environ[key]
        return get_args_parser().parse_args(argv[3:])


# --- backend job ------------------------------------------------------------------------------


def test_one_node_is_todays_job() -> None:
    objs = _objs(gpus=8)
    assert [o["kind"] for o in objs] == ["ConfigMap", "Job"]
    job = objs[1]
    assert "completionMode" not in job["spec"] and job["spec"]["completions"] == 1
    args = _torchrun_args(job["spec"]["template"]["spec"]["containers"][0]["command"], {})
    assert args.standalone and args.nproc_per_node == "8" and args.nnodes == "1:1"
    assert args.module and args.training_script == "runner"
    assert args.training_script_args == ["/etc/kubetune/config.yaml"]


def test_indexed_job_and_headless_service() -> None:
    objs = _objs(**TWO_NODES, backoff_limit=3)
    assert [o["kind"] for o in objs] == ["ConfigMap", "Job", "Service"]
    cm, job, svc = objs
    name = job["metadata"]["name"]
    assert cm["metadata"]["name"] == svc["metadata"]["name"] == name
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    assert spec["backoffLimit"] == 6  # 3 group restarts of 2 pods
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == name and "hostname" not in pod
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    labels = spec["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    c = pod["containers"][0]
    assert c["ports"] == [{"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"}]
    assert svc["spec"]["ports"][0]["port"] == 29500
    rank = _env(c)["KUBETUNE_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert rank == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert c["command"] == [
        *LAUNCH,
        "--nnodes",
        "2",
        "--nproc_per_node",
        "8",
        "--node_rank",
        "$(KUBETUNE_NODE_RANK)",
        "--master_addr",
        f"{name}-0.{name}",
        "--master_port",
        "29500",
        "--rdzv_conf",
        "timeout=1800",
        "-m",
        "runner",
        "/etc/kubetune/config.yaml",
    ]
    # the podFailurePolicy of today's Job: preemption / exit 143 ignored, exit 2 fails it
    actions = [r["action"] for r in spec["podFailurePolicy"]["rules"]]
    assert actions == ["Ignore", "Ignore", "FailJob"]


def test_torch_parses_the_pod_command_as_intended() -> None:
    job = _kind(_objs(**TWO_NODES, rendezvous_port=23456), "Job")
    c = job["spec"]["template"]["spec"]["containers"][0]
    args = _torchrun_args(c["command"], {"KUBETUNE_NODE_RANK": "1"})
    name = job["metadata"]["name"]
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert (args.master_addr, args.master_port) == (f"{name}-0.{name}", 23456)
    assert args.rdzv_backend == "static" and args.rdzv_conf == "timeout=1800"
    assert args.module and args.training_script == "runner"
    assert args.training_script_args == ["/etc/kubetune/config.yaml"]


def test_cpu_only_nodes_run_one_process_each() -> None:
    c = _kind(_objs(nodes=3, gpus=0), "Job")["spec"]["template"]["spec"]["containers"][0]
    assert c["command"][c["command"].index("--nproc_per_node") + 1] == "1"
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})


@pytest.mark.parametrize("backend", ["job", "jobset", "trainjob"])
def test_kubernetes_objects_are_schema_valid_and_restricted(backend: str) -> None:
    """Every core object strictly valid against Kubernetes 1.31; a JobSet's Job template too
    (wrapped in a Job); every pod restricted by both checks."""
    objs = _objs(**TWO_NODES, backend=backend, queue_name="q", topology={"level": "rack"})
    for obj in objs:
        if obj["kind"] in ("ConfigMap", "Job", "Service"):
            validate_strict(obj)
            assert restricted_problems(obj) == []
    for pod in _pod_specs(objs):
        assert restricted_violations(pod) == []
        assert restricted_problems({"kind": "Job", "spec": {"template": {"spec": pod}}}) == []
    if backend == "jobset":
        template = _kind(objs, "JobSet")["spec"]["replicatedJobs"][0]["template"]
        validate_strict(
            {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"}, **template}
        )


def _pod_specs(objs: list[Obj]) -> list[Obj]:
    out = []
    for obj in objs:
        if obj["kind"] == "Job":
            out.append(obj["spec"]["template"]["spec"])
        elif obj["kind"] == "JobSet":
            out += [
                r["template"]["spec"]["template"]["spec"] for r in obj["spec"]["replicatedJobs"]
            ]
        elif obj["kind"] == "TrainJob":
            out.append(trainjob_pod(obj))
    return out


# --- backend jobset ---------------------------------------------------------------------------


def test_jobset_shape() -> None:
    objs = _objs(**TWO_NODES, backend="jobset", backoff_limit=4, active_deadline_seconds=60)
    assert [o["kind"] for o in objs] == ["ConfigMap", "JobSet"]
    js = objs[1]
    name = js["metadata"]["name"]
    assert js["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    assert js["spec"]["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True}
    (rjob,) = js["spec"]["replicatedJobs"]
    assert rjob["name"] == "node" and rjob["replicas"] == 1
    job = rjob["template"]["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] == 2
    assert job["backoffLimit"] == 0 and job["activeDeadlineSeconds"] == 60
    assert "labels" not in rjob["template"].get("metadata", {})  # child Jobs are not runs
    assert job["template"]["metadata"]["labels"]["kubetune.io/run"] == "my-run"
    c = job["template"]["spec"]["containers"][0]
    args = _torchrun_args(c["command"], {"KUBETUNE_NODE_RANK": "0"})
    assert args.master_addr == f"{name}-node-0-0.{name}" and args.nnodes == "2"
    assert "subdomain" not in job["template"]["spec"]  # the JobSet controller sets it
    policy = js["spec"]["failurePolicy"]
    assert policy["maxRestarts"] == 4
    assert [(r["name"], r["action"]) for r in policy["rules"]] == [
        ("ConfigError", "FailJobSet"),
        ("PreemptedOrCheckpointed", "RestartJobSetAndIgnoreMaxRestarts"),
        ("Failed", "RestartJobSet"),
    ]
    assert [r["action"] for r in job["podFailurePolicy"]["rules"]] == ["FailJob"] * 3


def test_jobset_config_error_pattern_matches_the_job_controllers_message() -> None:
    """What the Job controller writes for a FailJob rule (k8s pkg/controller/job); the
    JobSet rule must match exit 2 and not exit 20 or 143."""
    import re

    js = _kind(_objs(**TWO_NODES, backend="jobset"), "JobSet")
    (pattern,) = js["spec"]["failurePolicy"]["rules"][0]["onJobFailureMessagePatterns"]

    def message(code: int) -> str:
        return (
            f"Container trainer for pod team-a/x-node-0-1-abcde failed with exit code {code} "
            "matching FailJob rule at index 2"
        )

    assert re.search(pattern, message(2))
    assert not re.search(pattern, message(20)) and not re.search(pattern, message(143))


# --- backend trainjob -------------------------------------------------------------------------


def trainjob_pod(tj: Obj) -> Obj:
    """The pod the trainer would build: the runtime's pod template, the TrainJob's trainer
    fields on the `node` container, then the runtimePatches (what pod security sees)."""
    runtime = torch_runtime()
    (rjob,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    pod = copy.deepcopy(rjob["template"]["spec"]["template"]["spec"])
    trainer = tj["spec"]["trainer"]
    node = next(c for c in pod["containers"] if c["name"] == "node")
    node.update(
        image=trainer["image"],
        command=trainer["command"],
        env=trainer["env"],
        resources=trainer["resourcesPerNode"],
    )
    (patch,) = tj["spec"]["runtimePatches"]
    (prj,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    spec_patch = copy.deepcopy(prj["template"]["spec"]["template"]["spec"])
    for cpatch in spec_patch.pop("containers"):
        target = next(c for c in pod["containers"] if c["name"] == cpatch["name"])
        target.update(merge_patch(target, cpatch))
    pod.setdefault("restartPolicy", "OnFailure")  # the JobSet webhook's default
    return merge_patch(pod, spec_patch)


def test_trainjob_shape_and_the_runtime_it_names() -> None:
    objs = _objs(**TWO_NODES, backend="trainjob", active_deadline_seconds=90)
    assert [o["kind"] for o in objs] == ["ConfigMap", "TrainJob"]
    tj = objs[1]
    assert tj["apiVersion"] == crd_api_version("TrainJob")
    spec = tj["spec"]
    runtime = torch_runtime()
    assert spec["runtimeRef"] == {
        "name": runtime["metadata"]["name"],
        "apiGroup": "trainer.kubeflow.org",
        "kind": runtime["kind"],
    }
    assert "torch" in runtime["spec"]["mlPolicy"]
    trainer = spec["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 8)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert spec["activeDeadlineSeconds"] == 90
    reserved = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR"}
    assert not reserved & {e["name"] for e in trainer["env"]}  # the trainer's webhook refuses
    (patch,) = spec["runtimePatches"]
    (prj,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    (rjob,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert prj["name"] == rjob["name"] == "node"
    runtime_containers = {
        c["name"] for c in rjob["template"]["spec"]["template"]["spec"]["containers"]
    }
    patched = {c["name"] for c in prj["template"]["spec"]["template"]["spec"]["containers"]}
    assert patched <= runtime_containers  # a patch may only name the runtime's containers
    pod = trainjob_pod(tj)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {v["name"] for v in pod["volumes"]} >= {"config", "tmp", "cache", "dshm"}
    name = tj["metadata"]["name"]
    env = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "1",
           "PET_MASTER_ADDR": f"{name}-node-0-0.{name}", "PET_MASTER_PORT": "29500"}  # fmt: skip
    args = _torchrun_args(trainer["command"], env)  # what the runtime's torch plugin sets
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert args.master_addr == env["PET_MASTER_ADDR"] and args.master_port == 29500
    assert args.module and args.training_script == "runner"


def test_torch_parses_the_trainjob_command_with_the_runtimes_pet_variables() -> None:
    """The TrainJob's command (no CRD needed): every launch argument from PET_*."""
    env = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "1",
           "PET_MASTER_ADDR": "run-node-0-0.run", "PET_MASTER_PORT": "29500"}  # fmt: skip
    args = _torchrun_args(pet_command(), env)
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert (args.master_addr, args.master_port) == ("run-node-0-0.run", 29500)
    assert args.rdzv_conf == "timeout=1800" and args.module and args.training_script == "runner"


def test_trainjob_custom_runtime() -> None:
    tj = _kind(_objs(backend="trainjob", training_runtime="torch-gb200"), "TrainJob")
    assert tj["spec"]["runtimeRef"]["name"] == "torch-gb200"


# --- the CRD schemas (strict) ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["jobset", "trainjob"])
@pytest.mark.parametrize(
    "job",
    [
        TWO_NODES,
        {"nodes": 4, "gpus": 0, "cpu": "500m", "memory": None, "ttl_seconds_after_finished": None},
        {**TWO_NODES, "queue_name": "gpu", "topology": {"level": "rack", "mode": "preferred"}},
        {**TWO_NODES, "pod_patch": {"nodeSelector": {"pool": "a"}}, "service_account": "sa"},
    ],
)
def test_crd_schema_valid(backend: str, job: dict[str, Any]) -> None:
    obj = next(o for o in _objs(**job, backend=backend) if o["kind"] in ("JobSet", "TrainJob"))
    assert obj["apiVersion"] == crd_api_version(obj["kind"])
    assert crd_errors(obj) == []
    name = obj["metadata"]["name"]
    assert name[0].isalpha() and len(name) <= 63  # the TrainJob CRD's CEL rules


def test_crd_check_can_fail() -> None:
    js = _kind(_objs(**TWO_NODES, backend="jobset"), "JobSet")
    js["spec"]["replicatedJobs"][0]["replica"] = 2  # a typo
    js["spec"]["failurePolicy"]["rules"][0]["action"] = "Retry"
    errors = " ".join(crd_errors(js))
    assert "replica" in errors and "Retry" in errors


# --- names, Kueue -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["job", "jobset", "trainjob"])
def test_long_and_digit_names_fit_the_pod_hostnames(backend: str) -> None:
    for run in ("x" * 52, "7-up-run"):
        cfg = make_config(nodes=64, backend=backend, name=run)
        name = manifests.job_name(cfg)
        last = f"{name}-63" if backend == "job" else f"{name}-node-0-63"
        assert len(last) <= 63 and name[0].isalpha(), last
        assert name.endswith("-" + cfg_hash(cfg))


def cfg_hash(cfg: Any) -> str:
    from kubetune.config import config_hash

    return config_hash(cfg)[:8]


@pytest.mark.parametrize("backend", ["job", "jobset", "trainjob"])
@pytest.mark.parametrize("mode", ["required", "preferred"])
def test_kueue_label_suspend_and_topology(backend: str, mode: str) -> None:
    topology = {"level": "cloud.provider.com/topology-rack", "mode": mode}
    objs = _objs(**TWO_NODES, backend=backend, queue_name="gpu", topology=topology)
    workload = objs[1]
    assert workload["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    assert workload["spec"]["suspend"] is True
    for svc in objs[2:]:
        assert "kueue.x-k8s.io/queue-name" not in svc["metadata"]["labels"]
    key = f"kueue.x-k8s.io/podset-{mode}-topology"
    assert _pod_template_meta(workload)["annotations"] == {key: topology["level"]}


def test_no_queue_no_suspend_no_topology() -> None:
    for backend in ("job", "jobset", "trainjob"):
        workload = _objs(**TWO_NODES, backend=backend)[1]
        assert "suspend" not in workload["spec"]
        assert "annotations" not in _pod_template_meta(workload)


def _pod_template_meta(workload: Obj) -> Obj:
    if workload["kind"] == "Job":
        return workload["spec"]["template"]["metadata"]
    if workload["kind"] == "JobSet":
        return workload["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["metadata"]
    (patch,) = workload["spec"]["runtimePatches"]
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    return rjob["template"]["spec"]["template"]["metadata"]


@pytest.mark.parametrize("backend", ["job", "jobset", "trainjob"])
def test_render_of_the_two_node_example(backend: str) -> None:
    """`launcher render examples/two-nodes.yaml --set job.backend=...`: what a user sees is
    valid for the API server (core objects) and the CRD (custom resources)."""
    from pathlib import Path

    import yaml
    from click.testing import CliRunner

    from launcher.cli.main import main

    example = Path(__file__).resolve().parents[2] / "examples" / "two-nodes.yaml"
    result = CliRunner().invoke(main, ["render", str(example), "--set", f"job.backend={backend}"])
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(result.output))
    kinds = {"job": ["ConfigMap", "Job", "Service"], "jobset": ["ConfigMap", "JobSet"]}
    assert [d["kind"] for d in docs] == kinds.get(backend, ["ConfigMap", "TrainJob"])
    for doc in docs:
        if doc["kind"] in ("JobSet", "TrainJob"):
            assert crd_errors(doc) == []
        else:
            validate_strict(doc)


def test_validate_says_how_many_nodes_and_processes() -> None:
    from launcher.config_files import summarize

    assert summarize(make_config(nodes=2, gpus=8, backend="jobset")).endswith(
        "; 2 nodes x 8 GPUs = 16 processes (jobset)"
    )
    assert "node(s)" not in summarize(make_config(gpus=8))


@pytest.mark.parametrize(
    ("job", "expected"),
    [({"gpus": 8, "termination_grace_period_seconds": 600}, "600"), (TWO_NODES, "300"),
     ({"gpus": 1}, None)],
    ids=["gpus", "nodes", "one-process"],
)  # fmt: skip
def test_stopping_workers_get_the_grace_period(job: Obj, expected: str | None) -> None:
    """torchrun SIGKILLs a worker still checkpointing 30 s after passing SIGTERM on; a
    multi-process pod's TORCH_ELASTIC_SHUTDOWN_TIMEOUT gives it the pod's whole grace period
    (tests/test_runner/test_launch_exit_codes.py shows torchrun honours it)."""
    workload = next(o for o in _objs(**job) if o["kind"] == "Job")
    value = _env(workload["spec"]["template"]["spec"]["containers"][0]).get(
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
    )
    assert (value or {}).get("value") == expected
