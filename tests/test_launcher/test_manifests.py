"""launcher.manifests: every config variant renders schema-valid, restricted, secret-free
manifests with deterministic names."""

from __future__ import annotations

import copy

import pytest
import yaml
from k8s_checks import leaked, restricted_problems, validate_strict
from kube_configs import (
    TEST_ACCESS_KEY,
    TEST_HF_TOKEN,
    TEST_SECRET_KEY,
    VARIANTS,
    config_dict,
    make_config,
)

from kubetune.config import config_hash, parse_config
from kubetune.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, UserError
from launcher import manifests


@pytest.fixture(params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    cfg = parse_config(yaml.safe_dump(VARIANTS[request.param]))
    return request.param, manifests.build_manifests(cfg, namespace="team-a")


def _job(objs: list[dict]) -> dict:
    return next(o for o in objs if o["kind"] == "Job")


def _container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


def test_every_variant_is_schema_valid_and_restricted(variant: tuple[str, list[dict]]) -> None:
    name, objs = variant
    assert [o["kind"] for o in objs] == ["ConfigMap", "Job"]
    for obj in objs:
        validate_strict(obj)
        assert restricted_problems(obj) == [], name
        assert obj["metadata"]["namespace"] == "team-a"


def test_no_secret_values_anywhere(variant: tuple[str, list[dict]]) -> None:
    _, objs = variant
    assert leaked(objs, [TEST_ACCESS_KEY, TEST_SECRET_KEY, TEST_HF_TOKEN]) == []
    env = _container(_job(objs))["env"]
    for item in env:
        if any(w in item["name"] for w in ("SECRET", "TOKEN", "ACCESS_KEY")):
            assert "value" not in item and "secretKeyRef" in item["valueFrom"], item


def test_the_checks_catch_violations() -> None:
    """The semantic checks must be able to fail."""
    job = _job(manifests.build_manifests(make_config()))
    bad = copy.deepcopy(job)
    spec = bad["spec"]["template"]["spec"]
    spec["restartPolicy"] = "Sometimes"
    spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    spec["containers"][0]["image"] = "kubetune:latest"
    spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    problems = " ".join(restricted_problems(bad))
    for word in ("restartPolicy", "allowPrivilegeEscalation", "latest", "host"):
        assert word in problems
    assert leaked([bad], ["kubetune:latest"]) == ["kubetune:latest"]


def test_job_shape_defaults() -> None:
    cfg = make_config()
    cm, job = manifests.build_manifests(cfg)
    h = config_hash(cfg)
    assert job["metadata"]["name"] == f"my-run-{h[:8]}" == cm["metadata"]["name"]
    labels = job["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "kubetune"
    assert labels["app.kubernetes.io/instance"] == "my-run" == labels["kubetune.io/run"]
    assert labels["kubetune.io/config-hash"] == h
    assert job["spec"]["template"]["metadata"]["labels"]["kubetune.io/run"] == "my-run"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] == 300
    assert job["spec"]["backoffLimit"] == 3 and job["spec"]["ttlSecondsAfterFinished"] == 604800
    assert "suspend" not in job["spec"] and "activeDeadlineSeconds" not in job["spec"]
    c = _container(job)
    assert c["command"] == ["python", "-m", "runner", "/etc/kubetune/config.yaml"]
    assert c["resources"]["limits"] == {"nvidia.com/gpu": "1", "memory": "32Gi"}
    assert c["resources"]["requests"] == {"cpu": "4", "memory": "32Gi"}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert {"/etc/kubetune", "/tmp", "/cache", "/dev/shm"} <= set(mounts)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"] == {"medium": "Memory"}
    assert volumes[mounts["/etc/kubetune"]["name"]]["configMap"]["name"] == cm["metadata"]["name"]
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_HOME"]["value"].startswith("/cache")
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.kubetune:9000"
    assert env["AWS_REGION"]["value"] == "us-east-1"
    ref = env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "s3-credentials", "key": "AWS_SECRET_ACCESS_KEY"}
    assert "HF_TOKEN" not in env
    assert (
        job["metadata"]["annotations"]["kubetune.io/output-uri"] == "s3://kubetune/kubetune/my-run"
    )


def test_config_map_holds_the_resolved_config() -> None:
    cfg = make_config()
    cm = manifests.build_manifests(cfg)[0]
    again = parse_config(cm["data"]["config.yaml"])
    assert config_hash(again) == config_hash(cfg)


def test_pod_failure_policy_matches_runner_exit_codes() -> None:
    job = _job(manifests.build_manifests(make_config()))
    rules = job["spec"]["podFailurePolicy"]["rules"]
    by_action = {}
    for rule in rules:
        by_action.setdefault(rule["action"], []).append(rule)
    assert by_action["Ignore"][0]["onPodConditions"] == [
        {"type": "DisruptionTarget", "status": "True"}
    ]
    assert by_action["Ignore"][1]["onExitCodes"]["values"] == [EXIT_PREEMPTED]
    assert by_action["FailJob"][0]["onExitCodes"]["values"] == [EXIT_USER_ERROR]
    assert all(r.get("onExitCodes", {}).get("containerName", "trainer") == "trainer" for r in rules)


def test_multi_gpu_uses_the_torchrun_launch_and_custom_resource() -> None:
    job = _job(
        manifests.build_manifests(make_config("SDXL_LORA", gpus=2, gpu_resource_name="amd.com/gpu"))
    )
    c = _container(job)
    assert c["command"][:5] == ["python", "-m", "runner.launch", "--standalone", "--nproc_per_node"]
    assert c["command"][5] == "2"  # torchrun in process, exiting with the workers' exit code
    assert c["command"][-3:] == ["-m", "runner", "/etc/kubetune/config.yaml"]
    assert c["resources"]["limits"]["amd.com/gpu"] == "2"
    assert "nvidia.com/gpu" not in c["resources"]["limits"]


def test_kueue_and_scheduling_options() -> None:
    job = _job(
        manifests.build_manifests(
            make_config(
                queue_name="gpu-queue",
                priority_class_name="high",
                service_account="kubetune-runner",
                node_selector={"pool": "gpu"},
                active_deadline_seconds=3600,
                tolerations=[
                    {
                        "key": "gpu",
                        "operator": "Exists",
                        "effect": "NoSchedule",
                        "toleration_seconds": 5,
                    }
                ],
                hf_token_secret={"name": "hf", "key": "token"},
                env={"FOO": "bar"},
            )
        )
    )
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True and job["spec"]["activeDeadlineSeconds"] == 3600
    pod = job["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "high" and pod["serviceAccountName"] == "kubetune-runner"
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == [
        {"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 5}
    ]
    env = {e["name"]: e for e in _container(job)["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    assert env["FOO"]["value"] == "bar"


def test_names_are_deterministic_and_change_with_the_config() -> None:
    a = manifests.build_manifests(make_config())
    b = manifests.build_manifests(make_config())
    assert a == b
    other = make_config(cpu="8")
    assert manifests.job_name(other) != a[1]["metadata"]["name"]
    assert manifests.job_name(other).startswith("my-run-")
    long = make_config()
    long.job.name = "x" * 52
    assert len(manifests.job_name(long)) <= 63


def test_kubernetes_needs_storage() -> None:
    data = config_dict()
    del data["storage"]
    with pytest.raises(UserError, match="storage"):
        manifests.build_manifests(parse_config(yaml.safe_dump(data)))


def test_render_yaml_round_trips() -> None:
    cfg = make_config()
    docs = list(yaml.safe_load_all(manifests.to_yaml(manifests.build_manifests(cfg))))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Job"]
