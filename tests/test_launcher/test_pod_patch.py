"""job.pod_patch (a JSON merge patch over the generated pod spec), the restricted Pod
Security warnings it can cause, and the Kubernetes-version gates that `submit` reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from k8s_checks import validate_strict
from kube_configs import config_dict, make_config

from kubetune.errors import ConfigError
from launcher import manifests
from launcher.backends.k8s_features import ignored_features, parse_version
from launcher.pod_security import pod_patch_warnings, restricted_violations

PVC = {"name": "dataset", "persistentVolumeClaim": {"claimName": "cats", "readOnly": True}}


def _pod(**patch: Any) -> dict[str, Any]:
    objs = manifests.build_manifests(make_config(pod_patch=patch))
    job = objs[1]
    validate_strict(job)  # the merged Job is still a valid batch/v1 Job
    return job["spec"]["template"]["spec"]


def test_merge_patch_follows_rfc_7386() -> None:
    target = {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    patch = {"a": {"b": None, "c": [3]}, "e": {"f": True}}
    assert manifests.merge_patch(target, patch) == {"a": {"c": [3]}, "d": "x", "e": {"f": True}}
    assert target == {"a": {"b": 1, "c": [1, 2]}, "d": "x"}  # not modified


def test_patch_sets_removes_and_replaces_pod_fields() -> None:
    plain = _pod()
    spec = _pod(
        hostNetwork=True,
        runtimeClassName="nvidia",
        enableServiceLinks=None,
        volumes=[*plain["volumes"], PVC],
    )
    assert spec["hostNetwork"] is True and spec["runtimeClassName"] == "nvidia"
    assert "enableServiceLinks" not in spec
    assert spec["volumes"][-1] == PVC
    assert [v["name"] for v in spec["volumes"][:-1]] == [v["name"] for v in plain["volumes"]]
    assert spec["containers"][0]["securityContext"] == plain["containers"][0]["securityContext"]
    assert _pod() == plain  # no patch: the pod spec as generated


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"host_network": True}, "not a PodSpec field"),
        ({"hostNetwork": "yes"}, "must be true or false"),
        ({"volumes": {"name": "x"}}, "must be a list"),
        ({"containers": None}, "cannot remove the trainer container"),
        ({"terminationGracePeriodSeconds": True}, "must be an integer"),
    ],
)
def test_bad_patches_name_the_field(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_config(pod_patch=patch)
    (line,) = [ln for ln in str(err.value).splitlines() if "pod_patch" in ln]
    assert f"job.pod_patch.{next(iter(patch))}" in line and message in line


def test_generated_pod_meets_the_restricted_profile() -> None:
    assert restricted_violations(_pod()) == []
    assert pod_patch_warnings(make_config()) == []
    assert pod_patch_warnings(make_config(pod_patch={"runtimeClassName": "nvidia"})) == []


def test_patches_that_break_the_restricted_profile_say_which_rule() -> None:
    plain = _pod()
    root = {**plain["containers"][0], "securityContext": {"privileged": True}}
    cases = {
        "Host Namespaces: hostNetwork is true": {"hostNetwork": True},
        "HostPath Volumes: volume 'data' is hostPath": {
            "volumes": [*plain["volumes"], {"name": "data", "hostPath": {"path": "/data"}}]
        },
        "Privileged Containers: container 'trainer' is privileged": {"containers": [root]},
    }
    for rule, patch in cases.items():
        warnings = pod_patch_warnings(make_config(pod_patch=patch))
        assert any(rule in w for w in warnings), (rule, warnings)
        assert all(w.startswith("job.pod_patch: ") and "\n" not in w for w in warnings)


def test_validate_warns_but_accepts(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from launcher.cli.main import main

    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config_dict(pod_patch={"hostNetwork": True})))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "Host Namespaces: hostNetwork is true" in result.output


def test_version_gates() -> None:
    job = manifests.build_manifests(make_config(queue_name="gpu"))[1]
    assert parse_version("1", "20+") == (1, 20)
    old = ignored_features(job, (1, 20))
    assert len(old) == 2 and "spec.suspend (needs 1.21+)" in old[0]
    assert "spec.podFailurePolicy (needs 1.26+)" in old[1] and "backoff_limit" in old[1]
    assert [w for w in ignored_features(job, (1, 25)) if "suspend" in w] == []
    assert ignored_features(job, (1, 31)) == []
