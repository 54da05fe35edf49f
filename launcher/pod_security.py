"""The restricted Pod Security Standard (Kubernetes 1.23+ admission), checked offline.

`restricted_violations(pod_spec)` names each broken rule the way the standard does, so a
`job.pod_patch` that needs e.g. hostNetwork is reported before a namespace that enforces
`restricted` refuses the pod.
"""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]
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
SECCOMP_OK = ("RuntimeDefault", "Localhost")


def restricted_violations(spec: Obj) -> list[str]:
    """Each rule of the restricted profile the pod spec breaks, as `Rule: detail`."""
    out = [
        f"Host Namespaces: {k} is true"
        for k in ("hostNetwork", "hostPID", "hostIPC")
        if spec.get(k)
    ]
    for volume in spec.get("volumes") or []:
        kinds = sorted(set(volume) - {"name"} - ALLOWED_VOLUMES)
        if kinds:
            rule = "HostPath Volumes" if "hostPath" in kinds else "Volume Types"
            out.append(f"{rule}: volume {volume.get('name')!r} is {', '.join(kinds)}")
    pod_sc = spec.get("securityContext") or {}
    if pod_sc.get("sysctls"):
        out.append("Sysctls: the pod sets sysctls")
    containers = [
        *(spec.get("initContainers") or []),
        *(spec.get("containers") or []),
        *(spec.get("ephemeralContainers") or []),
    ]
    for container in containers:
        name = container.get("name", "?")
        out += [
            f"{rule}: container {name!r} {detail}" for rule, detail in _container(container, pod_sc)
        ]
    return out


def _container(c: Obj, pod_sc: Obj) -> list[tuple[str, str]]:
    sc = c.get("securityContext") or {}
    out: list[tuple[str, str]] = []
    if sc.get("privileged"):
        out.append(("Privileged Containers", "is privileged"))
    if sc.get("allowPrivilegeEscalation") is not False:
        out.append(("Privilege Escalation", "does not set allowPrivilegeEscalation: false"))
    caps = sc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        out.append(("Capabilities", "does not drop ALL"))
    added = sorted(set(caps.get("add") or []) - {"NET_BIND_SERVICE"})
    if added:
        out.append(("Capabilities", f"adds {', '.join(added)}"))
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
        out.append(("Running as Non-root", "does not set runAsNonRoot: true"))
    if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
        out.append(("Running as Non-root user", "runs as UID 0"))
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp not in SECCOMP_OK:
        out.append(("Seccomp", f"has seccompProfile {seccomp or 'unset'}"))
    if any(p.get("hostPort") for p in c.get("ports") or []):
        out.append(("Host Ports", "uses a hostPort"))
    if sc.get("procMount") not in (None, "Default"):
        out.append(("/proc Mount Type", f"uses procMount {sc['procMount']}"))
    return out


def pod_patch_warnings(cfg: Any) -> list[str]:
    """One line per restricted-profile rule that `job.pod_patch` makes the pod break."""
    if cfg.job is None or not cfg.job.pod_patch:
        return []
    from launcher.manifests import pod_spec

    return [
        f"job.pod_patch: the pod breaks the restricted Pod Security profile ({v}); a "
        "namespace that enforces it refuses the pod"
        for v in restricted_violations(pod_spec(cfg, "run"))
    ]
