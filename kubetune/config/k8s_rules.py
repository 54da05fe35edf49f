"""What Kubernetes accepts, checked without a cluster: names, labels, quantities, environment
variable names, and the PodSpec fields `job.pod_patch` may set (and a TrainJob may patch)."""

from __future__ import annotations

import re
from typing import Any

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
# Env names that hold secrets: they must come from a Kubernetes Secret.
SECRET_WORDS = ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY", "PRIVATE_KEY", "CREDENTIAL")
# PodSpec fields (Kubernetes 1.31) and the JSON type of each, for job.pod_patch.
POD_SPEC_FIELDS: dict[str, type] = {
    **dict.fromkeys(("activeDeadlineSeconds", "priority", "terminationGracePeriodSeconds"), int),
    **dict.fromkeys(
        (
            "automountServiceAccountToken",
            "enableServiceLinks",
            "hostIPC",
            "hostNetwork",
            "hostPID",
            "hostUsers",
            "setHostnameAsFQDN",
            "shareProcessNamespace",
        ),
        bool,
    ),
    **dict.fromkeys(
        (
            "containers",
            "ephemeralContainers",
            "hostAliases",
            "imagePullSecrets",
            "initContainers",
            "readinessGates",
            "resourceClaims",
            "schedulingGates",
            "tolerations",
            "topologySpreadConstraints",
            "volumes",
        ),
        list,
    ),
    **dict.fromkeys(
        (
            "affinity",
            "dnsConfig",
            "nodeSelector",
            "os",
            "overhead",
            "resources",
            "securityContext",
        ),
        dict,
    ),
    **dict.fromkeys(
        (
            "dnsPolicy",
            "hostname",
            "nodeName",
            "preemptionPolicy",
            "priorityClassName",
            "restartPolicy",
            "runtimeClassName",
            "schedulerName",
            "serviceAccount",
            "serviceAccountName",
            "subdomain",
        ),
        str,
    ),
}
MAX_RUN_NAME = 52  # leaves room for "-<hash>" suffixes in Job/ConfigMap names (63 max)
# What a TrainJob's runtimePatches may set in the pod spec (trainer.kubeflow.org/v1alpha1;
# containers only patch the runtime's own, so kubetune patches its trainer container alone).
TRAINJOB_POD_FIELDS = frozenset(
    {
        "affinity",
        "imagePullSecrets",
        "nodeSelector",
        "schedulingGates",
        "securityContext",
        "serviceAccountName",
        "terminationGracePeriodSeconds",
        "tolerations",
        "volumes",
    }
)
RENDEZVOUS_POD_FIELDS = ("hostname", "subdomain")  # multi-node pods' DNS names come from these


def sanitize_name(raw: str) -> str:
    """Lower-case, replace characters a DNS-1123 label cannot hold by '-', trim '-'."""
    name = re.sub(r"[^a-z0-9-]+", "-", raw.lower())
    return re.sub(r"-{2,}", "-", name).strip("-")


def label_problem(key: str, value: str) -> str | None:
    """The reason a Kubernetes label key/value is invalid, or None."""
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
        return f"label key prefix {prefix!r} is not a DNS subdomain"
    if not name or len(name) > 63 or not LABEL_NAME.match(name):
        return (
            f"label key {key!r} must be <= 63 characters of [A-Za-z0-9-_.], "
            "starting and ending alphanumeric"
        )
    if value and (len(value) > 63 or not LABEL_NAME.match(value)):
        return (
            f"label value {value!r} must be <= 63 characters of [A-Za-z0-9-_.], "
            "starting and ending alphanumeric"
        )
    return None


def pod_patch_problem(key: str, value: Any) -> str | None:
    """Why `key: value` cannot be a top-level entry of job.pod_patch, or None."""
    expected = POD_SPEC_FIELDS.get(key)
    if expected is None:
        return (
            f"{key!r} is not a PodSpec field; use the Kubernetes (camelCase) name, e.g. "
            "hostNetwork, volumes, runtimeClassName, containers"
        )
    if value is None:
        if key == "containers":
            return "cannot remove the trainer container; patch it or add sidecars instead"
        return None
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        kind = {int: "an integer", bool: "true or false", list: "a list", dict: "a mapping"}
        return f"must be {kind.get(expected, 'a string')} (got {type(value).__name__})"
    return None
