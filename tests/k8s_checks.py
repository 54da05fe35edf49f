"""Semantic checks kubernetes_validate does not make: the restricted Pod Security Standard,
enum values, and leaked secrets. Shared by the manifest and chart tests."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate

KUBE_VERSION = "1.31"
ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
RESTART_POLICIES = {"Job": {"Never", "OnFailure"}, "Deployment": {"Always"}}
PULL_POLICIES = {"Always", "IfNotPresent", "Never"}


def validate_strict(obj: dict[str, Any]) -> None:
    """Schema-validate one object offline (unknown fields are errors)."""
    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] == "Pod":
        return obj["spec"]
    if obj["kind"] in ("Job", "Deployment", "StatefulSet", "DaemonSet"):
        return obj["spec"]["template"]["spec"]
    return None


def restricted_problems(obj: dict[str, Any]) -> list[str]:
    """Violations of the restricted Pod Security Standard (plus a read-only root FS)."""
    spec = pod_spec(obj)
    if spec is None:
        return []
    out: list[str] = []
    pod_sc = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            out.append(f"{key} is set")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            out.append(f"volume {volume['name']} uses {kinds - ALLOWED_VOLUMES}")
    restart = spec.get("restartPolicy", "Always")
    if restart not in RESTART_POLICIES.get(obj["kind"], {"Always", "OnFailure", "Never"}):
        out.append(f"restartPolicy {restart!r} is not valid for a {obj['kind']}")
    for c in spec.get("initContainers", []) + spec["containers"]:
        out.extend(f"container {c['name']}: {p}" for p in _container_problems(c, pod_sc))
    return out


def _container_problems(c: dict[str, Any], pod_sc: dict[str, Any]) -> list[str]:
    sc = c.get("securityContext", {})
    out = []
    if sc.get("privileged"):
        out.append("privileged")
    if sc.get("allowPrivilegeEscalation") is not False:
        out.append("allowPrivilegeEscalation is not false")
    caps = sc.get("capabilities", {})
    if "ALL" not in caps.get("drop", []):
        out.append("capabilities do not drop ALL")
    if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
        out.append(f"adds capabilities {caps['add']}")
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
        out.append("runAsNonRoot is not true")
    if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
        out.append("runs as UID 0")
    seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        out.append(f"seccompProfile is {seccomp!r}")
    if sc.get("readOnlyRootFilesystem") is not True:
        out.append("root filesystem is writable")
    if any(p.get("hostPort") for p in c.get("ports", [])):
        out.append("uses a hostPort")
    if c.get("imagePullPolicy", "IfNotPresent") not in PULL_POLICIES:
        out.append(f"imagePullPolicy {c['imagePullPolicy']!r}")
    image = c["image"]
    if image.endswith(":latest") or ":" not in image.rsplit("/", 1)[-1]:
        out.append(f"image {image!r} is not pinned to a tag")
    return out


def leaked(objs: list[dict[str, Any]], secrets: list[str]) -> list[str]:
    """The secret strings that appear anywhere in the objects."""
    text = json.dumps(objs)
    return [s for s in secrets if s in text]
