"""Connecting to the Kubernetes API: the kubeconfig / in-cluster client, and `api_errors`,
which turns client exceptions into one-line kubetune errors."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubetune.errors import ClusterError

RBAC_HINT = "the kubetune chart's launcher Role grants what submit/status/logs/cancel need"


@contextmanager
def api_errors(action: str) -> Iterator[None]:
    """Translate kubernetes client errors into one-line kubetune errors."""
    try:
        yield
    except ApiException as err:
        raise _translate(err, action) from None
    except urllib3.exceptions.HTTPError as err:
        reason = getattr(err, "reason", None) or err
        raise ClusterError(
            f"{action}: cannot reach the Kubernetes API ({reason})",
            hint="check --kubeconfig / --context and that the cluster is up",
        ) from None


def _translate(err: ApiException, action: str) -> ClusterError:
    try:
        message = json.loads(err.body or "{}").get("message") or err.reason
    except (ValueError, AttributeError):
        message = err.reason
    if err.status == 401:
        return ClusterError(
            f"{action}: unauthorized ({message})", hint="refresh your kubeconfig credentials"
        )
    if err.status == 403:
        return ClusterError(f"{action}: forbidden ({message})", hint=RBAC_HINT)
    return ClusterError(f"{action}: {message} (HTTP {err.status})")


def _kubeconfig_path(kubeconfig: str | None) -> str | None:
    if kubeconfig:
        return kubeconfig
    env = os.environ.get("KUBECONFIG")
    if env:
        return env.split(os.pathsep)[0]
    default = Path("~/.kube/config").expanduser()
    return str(default) if default.exists() else None


def load_api_client(
    kubeconfig: str | None, context: str | None
) -> tuple[client.ApiClient, str | None]:
    """An API client and the context's namespace (kubeconfig, else in-cluster config)."""
    path = _kubeconfig_path(kubeconfig)
    if path is None and not os.environ.get("KUBERNETES_SERVICE_HOST"):  # nor inside a pod
        raise ClusterError(
            "no cluster configured (no --kubeconfig, $KUBECONFIG or ~/.kube/config)",
            hint="`launcher submit --local` trains on this machine; for a cluster pass "
            "--kubeconfig or set KUBECONFIG (docs/kubernetes.md)",
        )
    try:
        if path is None:
            config.load_incluster_config()
            ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
            return client.ApiClient(), ns_file.read_text().strip() if ns_file.exists() else None
        api = config.new_client_from_config(config_file=path, context=context)
        contexts, active = config.list_kube_config_contexts(config_file=path)
        chosen = next((c for c in contexts if c["name"] == context), active) if context else active
        return api, (chosen or {}).get("context", {}).get("namespace")
    except (config.ConfigException, OSError) as err:
        raise ClusterError(
            f"cannot load the Kubernetes configuration: {err}",
            hint="pass --kubeconfig / --context or set KUBECONFIG",
        ) from None
