"""Issue 23's launcher fields in the schema (`job.nodes`, `job.backend`, `job.topology`,
`job.training_runtime`, `job.rendezvous_port`): documented kubetune extensions, defaults that
keep today's single-pod Job, and each cross-field rule rejected at validate with a fix."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from kube_configs import config_dict

from kubetune.config import parse_config
from kubetune.config.base import document_fields
from kubetune.config.cluster import JobConfig, TopologyRequest
from kubetune.errors import ConfigError

NEW_FIELDS = ("nodes", "backend", "topology", "training_runtime", "rendezvous_port")


def _errors(**job: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(config_dict(**job)))
    return "\n".join(info.value.problems)


def test_new_fields_are_documented_kubetune_extensions() -> None:
    document_fields([JobConfig, TopologyRequest])
    for name in NEW_FIELDS:
        doc = " ".join((JobConfig.model_fields[name].description or "").split())
        assert "kubetune extension" in doc, f"{name}: {doc!r}"
    for name, field in TopologyRequest.model_fields.items():
        assert field.description, name


def test_defaults_are_one_pod_on_a_plain_job() -> None:
    job = JobConfig()
    assert (job.nodes, job.backend, job.topology) == (1, "job", None)
    assert job.training_runtime is None and job.rendezvous_port == 29500


def test_one_line_takes_a_run_from_one_node_to_two() -> None:
    """`job.gpus: 8` → add `job.nodes: 2`: nothing else needs to change."""
    one = parse_config(yaml.safe_dump(config_dict(gpus=8)))
    two = parse_config(yaml.safe_dump(config_dict(gpus=8, nodes=2)))
    assert (two.job.nodes, two.job.gpus, two.job.backend) == (2, 8, "job")
    assert one.job.model_dump(exclude={"nodes"}) == two.job.model_dump(exclude={"nodes"})


@pytest.mark.parametrize("nodes", [0, -1])
def test_nodes_is_at_least_one(nodes: int) -> None:
    assert "job.nodes" in _errors(nodes=nodes)


def test_unknown_backend_names_the_choices() -> None:
    text = _errors(backend="mpijob")
    assert "job.backend" in text and "jobset" in text and "trainjob" in text


def test_topology_needs_a_kueue_queue() -> None:
    text = _errors(nodes=2, topology={"level": "cloud.provider.com/topology-rack"})
    assert "job.topology" in text and "queue_name" in text
    ok = parse_config(
        yaml.safe_dump(
            config_dict(
                nodes=2,
                queue_name="gpu",
                topology={"level": "cloud.provider.com/topology-rack", "mode": "preferred"},
            )
        )
    )
    assert ok.job.topology.mode == "preferred"


def test_topology_level_must_be_a_label_key() -> None:
    text = _errors(queue_name="q", topology={"level": "not a label!"})
    assert "job.topology.level" in text


def test_training_runtime_only_with_trainjob() -> None:
    text = _errors(nodes=2, training_runtime="torch-distributed")
    assert "job.training_runtime" in text and "trainjob" in text
    parse_config(yaml.safe_dump(config_dict(backend="trainjob", training_runtime="my-torch")))


def test_trainjob_rejects_what_a_trainjob_cannot_set() -> None:
    text = _errors(backend="trainjob", priority_class_name="high")
    assert "job.priority_class_name" in text and "jobset" in text
    text = _errors(backend="trainjob", image_pull_policy="Always")
    assert "job.image_pull_policy" in text
    text = _errors(backend="trainjob", pod_patch={"hostNetwork": True})
    assert "job.pod_patch.hostNetwork" in text and "runtimePatches" in text
    ok = parse_config(
        yaml.safe_dump(config_dict(backend="trainjob", pod_patch={"nodeSelector": {"a": "b"}}))
    )
    assert ok.job.pod_patch == {"nodeSelector": {"a": "b"}}


@pytest.mark.parametrize("key", ["subdomain", "hostname"])
def test_multi_node_keeps_the_rendezvous_dns(key: str) -> None:
    text = _errors(nodes=2, pod_patch={key: "x"})
    assert f"job.pod_patch.{key}" in text and "rendezvous" in text
    parse_config(yaml.safe_dump(config_dict(pod_patch={key: "x"})))  # one node: allowed


@pytest.mark.parametrize("backend", ["job", "jobset", "trainjob"])
def test_resolved_config_round_trips(backend: str) -> None:
    """The ConfigMap holds config_to_yaml(cfg): every backend's config must parse back."""
    from kubetune.config import config_hash, config_to_yaml

    cfg = parse_config(
        yaml.safe_dump(
            config_dict(
                nodes=2,
                gpus=8,
                backend=backend,
                queue_name="q",
                topology={"level": "kubernetes.io/hostname"},
            )
        )
    )
    again = parse_config(config_to_yaml(cfg))
    assert config_hash(again) == config_hash(cfg) and again.job.backend == backend
