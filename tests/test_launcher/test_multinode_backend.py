"""`launcher submit / status / logs [--rank K] / cancel / list` for every backend (issue 23),
through the real `kubernetes` client against the in-process fake API server (k8s_fake: a
real cluster here is v1.20, which has no Indexed Jobs, JobSet or Kubeflow Trainer; the fake's
JobSet / TrainJob controllers are minimal stand-ins, see k8s_fake_workloads)."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from k8s_fake import FakeKube
from kube_configs import TEST_ACCESS_KEY, TEST_SECRET_KEY, config_dict, make_config
from kubernetes import client, config

from kubetune.errors import UserError
from launcher.backends import k8s_status
from launcher.backends.kubernetes import KubernetesBackend
from launcher.manifests import job_name

Obj = dict[str, Any]


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKube]:
    monkeypatch.setenv("KUBETUNE_HOME", str(tmp_path / "kubetune-home"))  # saved pod logs
    with FakeKube() as kube:
        kube.kubeconfig = str(kube.write_kubeconfig(tmp_path / "kubeconfig"))
        core = client.CoreV1Api(config.new_client_from_config(config_file=kube.kubeconfig))
        data = {"AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY}
        core.create_namespaced_secret(
            "default",
            {
                "metadata": {"name": "s3-credentials"},
                "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
            },
        )
        yield kube


def _backend(fake: FakeKube) -> KubernetesBackend:
    return KubernetesBackend(kubeconfig=fake.kubeconfig, namespace="default")


def _submit(fake: FakeKube, name: str = "my-run", **job: Any) -> tuple[str, list[str]]:
    cfg = make_config("SDXL_LORA", name=name, **{"nodes": 2, "gpus": 8, **job})
    result = _backend(fake).submit(cfg)
    assert result.created and result.job_name == job_name(cfg)
    return result.job_name, _wait_pods(fake, result.job_name, cfg.job.nodes)


def _wait_pods(fake: FakeKube, name: str, count: int, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(pods := fake.owned_pods(name)) < count:
        assert time.monotonic() < deadline, f"{name}: {len(pods)} pods, wanted {count}"
        time.sleep(0.02)
    live = [p for p in pods if p["status"]["phase"] in ("Pending", "Running")]
    return [p["metadata"]["name"] for p in sorted(live, key=k8s_status.node_rank)]


def _owners(fake: FakeKube, plural: str, name: str) -> list[str]:
    obj = fake.get(plural, "default", name)
    return [o["kind"] for o in obj["metadata"].get("ownerReferences", [])]


def _eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return result


# --- backend job: Indexed Job + headless Service ----------------------------------------------


@pytest.mark.slow
def test_indexed_job_runs_one_pod_per_node(fake: FakeKube) -> None:
    name, pods = _submit(fake)
    assert fake.get("jobs", "default", name)["spec"]["completionMode"] == "Indexed"
    assert _owners(fake, "services", name) == ["Job"] == _owners(fake, "configmaps", name)
    assert fake.get("services", "default", name)["spec"]["clusterIP"] == "None"
    hosts = [fake.get("pods", "default", p)["spec"]["hostname"] for p in pods]
    assert hosts == [f"{name}-0", f"{name}-1"]
    backend = _backend(fake)
    assert backend.status("my-run").phase == "Pending"
    fake.start_pod(pods[0])
    status = backend.status("my-run")
    assert (status.phase, status.reason) == ("Pending", "Starting")  # node 1 not running yet
    fake.start_pod(pods[1])
    assert backend.status("my-run").phase == "Running"
    fake.finish_pod(pods[0], 0)
    assert backend.status("my-run").phase == "Running"  # the Job waits for every index
    fake.finish_pod(pods[1], 0)
    assert backend.status("my-run").phase == "Succeeded"


def test_logs_of_each_node(fake: FakeKube) -> None:
    _, pods = _submit(fake)
    for rank, pod in enumerate(pods):
        fake.start_pod(pod)
        fake.log(pod, f"node {rank} says hi")
    backend = _backend(fake)
    assert list(backend.logs("my-run")) == ["node 0 says hi"]  # default: node 0
    assert list(backend.logs("my-run", rank=1)) == ["node 1 says hi"]
    with pytest.raises(UserError, match=r"2 nodes: --rank takes 0..1"):
        list(backend.logs("my-run", rank=2))
    from launcher.cli.main import main

    args = ["--kubeconfig", fake.kubeconfig, "--namespace", "default"]
    result = CliRunner().invoke(main, ["logs", "my-run", "--rank", "1", *args])
    assert result.exit_code == 0 and result.output == "node 1 says hi\n", result.output
    result = CliRunner().invoke(main, ["logs", "my-run", "--rank", "5", *args])
    assert result.exit_code == 2 and "--rank takes 0..1" in result.output
    result = CliRunner().invoke(main, ["status", "my-run", *args])
    assert "nodes: 2  pods: 2  failed pods: 0" in result.output, result.output


def test_a_lost_node_is_replaced_and_counted(fake: FakeKube) -> None:
    name, pods = _submit(fake, backoff_limit=1)  # 1 group restart = 2 failed pods
    for pod in pods:
        fake.start_pod(pod)
    fake.finish_pod(pods[1], 137, reason="OOMKilled")
    status = _backend(fake).status("my-run")
    assert status.phase == "Pending" and status.retries == 1 and status.nodes == 2
    assert status.summary().endswith("1 failed pod")
    replacement = _wait_pods(fake, name, 3)[1]
    assert fake.get("pods", "default", replacement)["spec"]["hostname"] == f"{name}-1"
    fake.finish_pod(pods[0], 1)
    fake.finish_pod(replacement, 1)  # the 3rd failed pod: past backoffLimit 2
    status = _backend(fake).status("my-run")
    assert (status.phase, status.reason) == ("Failed", "BackoffLimitExceeded")


def test_cancel_removes_job_service_and_config(fake: FakeKube) -> None:
    name, _ = _submit(fake)
    status = _backend(fake).cancel("my-run", wait=True, timeout=10)
    assert status.phase == "Cancelled"
    for plural in ("jobs", "services", "configmaps"):
        assert fake.select(plural, "default", "kubetune.io/run=my-run") == []
    assert fake.owned_pods(name) == []


def test_a_cluster_without_indexed_jobs_is_refused(fake: FakeKube) -> None:
    fake.version = ("1", "20")
    with pytest.raises(UserError, match=r"Kubernetes 1.20.*Indexed Jobs"):
        _backend(fake).submit(make_config(nodes=2))
    assert fake.select("jobs", "default") == []
    _backend(fake).submit(make_config())  # one node: runs, with the usual warnings


# --- backend jobset ---------------------------------------------------------------------------


@pytest.mark.slow
def test_jobset_submit_status_logs_list(fake: FakeKube) -> None:
    name, pods = _submit(fake, backend="jobset")
    assert fake.get("jobsets", "default", name)["kind"] == "JobSet"
    assert _owners(fake, "configmaps", name) == ["JobSet"]
    assert fake.select("services", "default") == []  # the JobSet controller makes its own
    backend = _backend(fake)
    for rank, pod in enumerate(pods):
        fake.start_pod(pod)
        fake.log(pod, f"rank {rank}")
    status = backend.status("my-run")
    assert (status.phase, status.job_name) == ("Running", name)
    assert list(backend.logs("my-run", rank=1)) == ["rank 1"]
    assert [(r.run, r.job_name) for r in backend.list()] == [("my-run", name)]
    for pod in pods:
        fake.finish_pod(pod, 0)
    assert backend.status("my-run").phase == "Succeeded"


def test_jobset_restarts_the_group_then_a_config_error_fails_it(fake: FakeKube) -> None:
    name, pods = _submit(fake, backend="jobset", backoff_limit=2)
    for pod in pods:
        fake.start_pod(pod)
    fake.finish_pod(pods[1], 1)
    new = _wait_pods(fake, name, 2)
    assert not set(new) & set(pods)  # every pod of the group was replaced
    assert fake.get("jobsets", "default", name)["status"]["restarts"] == 1
    fake.start_pod(new[0])
    fake.finish_pod(new[0], 2)
    status = _backend(fake).status("my-run")
    assert status.phase == "Failed" and "exit code 2" in status.message


def test_queued_jobset_is_suspended_until_admitted(fake: FakeKube) -> None:
    cfg = make_config(nodes=2, backend="jobset", queue_name="gpu")
    name = _backend(fake).submit(cfg).job_name
    status = _backend(fake).status("my-run")
    assert (status.phase, status.reason) == ("Suspended", "Queued") and "gpu" in status.message
    assert fake.owned_pods(name) == []
    fake.admit(name, plural="jobsets")
    assert len(_wait_pods(fake, name, 2)) == 2


# --- backend trainjob -------------------------------------------------------------------------


def test_trainjob_submit_status_logs_cancel(fake: FakeKube) -> None:
    name, pods = _submit(fake, backend="trainjob")
    assert _owners(fake, "configmaps", name) == ["TrainJob"]
    pod = fake.get("pods", "default", pods[0])
    assert [c["name"] for c in pod["spec"]["containers"]] == ["node"]
    backend = _backend(fake)
    for rank, p in enumerate(pods):
        fake.start_pod(p)
        fake.log(p, f"trainjob rank {rank}")
    assert backend.status("my-run").phase == "Running"
    assert list(backend.logs("my-run")) == ["trainjob rank 0"]  # container `node`
    status = backend.cancel("my-run", wait=True, timeout=10)
    assert status.phase == "Cancelled" and "TrainJob deleted" in status.message
    assert fake.select("trainjobs", "default") == [] == fake.owned_pods(name)


def test_missing_crd_names_what_to_install(fake: FakeKube) -> None:
    fake.crds = set()
    with pytest.raises(UserError, match=r"no TrainJob API.*Kubeflow Trainer"):
        _backend(fake).submit(make_config(nodes=2, backend="trainjob"))
    with pytest.raises(UserError, match=r"no JobSet API.*install JobSet"):
        _backend(fake).submit(make_config(nodes=2, backend="jobset"))
    _backend(fake).submit(make_config(name="plain"))
    assert [r.run for r in _backend(fake).list()] == ["plain"]  # list skips the absent kinds


def test_list_shows_every_kind_once(fake: FakeKube) -> None:
    _submit(fake, name="a-job")
    _submit(fake, name="b-jobset", backend="jobset")
    _submit(fake, name="c-trainjob", backend="trainjob")
    runs = sorted((r.run, r.phase) for r in _backend(fake).list())
    assert runs == [("a-job", "Pending"), ("b-jobset", "Pending"), ("c-trainjob", "Pending")]


def test_resubmit_is_idempotent_and_replace_crosses_kinds(fake: FakeKube) -> None:
    name, _ = _submit(fake, backend="jobset")
    cfg = make_config("SDXL_LORA", nodes=2, gpus=8, backend="jobset")
    assert not _backend(fake).submit(cfg).created
    other = make_config("SDXL_LORA", nodes=2, gpus=8)  # the same run as an Indexed Job
    with pytest.raises(UserError, match="already exists"):
        _backend(fake).submit(other)
    assert _backend(fake).submit(other, replace=True).created
    assert _eventually(lambda: not fake.select("jobsets", "default"))
    assert [r.job_name for r in _backend(fake).list()] == [job_name(other)]


@pytest.mark.parametrize(
    ("backend", "plural"), [("job", "jobs"), ("jobset", "jobsets"), ("trainjob", "trainjobs")]
)
def test_resubmit_of_a_failed_workload_replaces_it(
    fake: FakeKube, backend: str, plural: str
) -> None:
    """Every kind, as a one-node Job does: the same config submitted after the workload failed
    deletes it (foreground) and creates it anew with its ConfigMap (and an Indexed Job's
    headless Service), whose pods resume from the newest checkpoint."""
    name, pods = _submit(fake, backend=backend, backoff_limit=0)
    for pod in pods:
        fake.start_pod(pod)
    fake.finish_pod(pods[0], 2)  # config error: fails every kind at once
    old = fake.get(plural, "default", name)
    assert "Failed" in k8s_status.conditions(old)
    cfg = make_config("SDXL_LORA", nodes=2, gpus=8, backend=backend, backoff_limit=0)
    again = _backend(fake).submit(cfg)
    assert again.created and again.resumed_after == "Failed" and again.job_name == name
    assert (plural, name, "Foreground") in fake.deletions
    new = fake.get(plural, "default", name)
    assert new["metadata"]["uid"] != old["metadata"]["uid"] and not k8s_status.finished(new)
    assert _owners(fake, "configmaps", name) == [new["kind"]]
    if backend == "job":
        assert _owners(fake, "services", name) == ["Job"]
    assert not set(_wait_pods(fake, name, 2)) & set(pods)


def test_cli_submit_of_a_two_node_config(fake: FakeKube, tmp_path: Path) -> None:
    import json

    from launcher.cli.main import main

    path = tmp_path / "two.yaml"
    path.write_text(json.dumps(config_dict("SDXL_LORA", gpus=8, nodes=2)))
    args = ["--kubeconfig", fake.kubeconfig, "--namespace", "default"]
    result = CliRunner().invoke(main, ["submit", str(path), *args])
    assert result.exit_code == 0, result.output
    assert len(fake.select("pods", "default")) == 2


# --- phases -----------------------------------------------------------------------------------


def _pod(phase: str, index: int | None = None) -> Obj:
    annotations = {} if index is None else {k8s_status.COMPLETION_INDEX: str(index)}
    return {"metadata": {"annotations": annotations}, "status": {"phase": phase}}


def test_pods_phase() -> None:
    assert k8s_status.pods_phase([_pod("Running")]) == ("Running", None, None)
    assert k8s_status.pods_phase([_pod("Running", 0), _pod("Running", 1)], 2)[0] == "Running"
    assert k8s_status.pods_phase([_pod("Succeeded", 0), _pod("Running", 1)], 2)[0] == "Running"
    two = [_pod("Running", 0), _pod("Pending", 1)]
    assert k8s_status.pods_phase(two, 2)[:2] == ("Pending", "Starting")
    two = [_pod("Running", 0), _pod("Failed", 1)]
    assert k8s_status.pods_phase(two, 2)[:2] == ("Pending", "Retrying")
    assert k8s_status.pods_phase([_pod("Running", 0)], 2)[:2] == ("Pending", "NoPod")
    assert k8s_status.pods_phase([_pod("Failed")])[1] == "Retrying"
    assert k8s_status.node_rank(_pod("Running", 3)) == 3 and k8s_status.node_rank(_pod("x")) is None
