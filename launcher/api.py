"""What the CLI and tests call: load a config, render it, pick a backend, submit, wait.

Backends are imported lazily so `launcher validate` never pays for the kubernetes client.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kubetune.errors import ClusterError, UserError

if TYPE_CHECKING:
    from kubetune.config import PipelineConfig
    from launcher.backends.base import Backend, RunStatus, SubmitResult

# The schema and manifest builder are imported inside the functions that need them, so
# `launcher --help` / `status` stay fast (building the pydantic schema costs ~0.3 s).


@dataclass(frozen=True)
class ClusterOptions:
    """kubectl-like connection flags (all optional)."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None

    @property
    def given(self) -> bool:
        return any((self.kubeconfig, self.context, self.namespace))


def load(
    config: str | Path, overrides: Iterable[str] = (), name: str | None = None
) -> PipelineConfig:
    """Validate a config (same errors as `launcher validate`); `name` sets job.name and, for
    a run without `storage:`, puts its outputs beside base_output_dir's in a folder of that
    name (else two runs would share one output folder and resume each other's checkpoints)."""
    from kubetune.config import load_config

    extra = [*overrides, *([f"job.name={name}"] if name else [])]
    cfg = load_config(config, overrides=extra or None)
    chosen = any(o.startswith("base_output_dir=") for o in overrides)
    if name and not chosen and cfg.storage is None and cfg.base_output_dir is not None:
        beside = Path(cfg.base_output_dir).parent / name
        if Path(cfg.base_output_dir) != beside:
            cfg = load_config(config, overrides=[*extra, f"base_output_dir={beside}"])
    return cfg


def render(cfg: PipelineConfig, namespace: str | None = None) -> str:
    """The manifests `submit` would create, as multi-document YAML."""
    from launcher.manifests import build_manifests, to_yaml

    return to_yaml(build_manifests(cfg, namespace=namespace))


def get_backend(*, local: bool = False, cluster: ClusterOptions | None = None) -> Backend:
    if local:
        from launcher.backends.local import LocalBackend

        return LocalBackend()
    from launcher.backends.kubernetes import KubernetesBackend

    opts = cluster or ClusterOptions()
    return KubernetesBackend(
        kubeconfig=opts.kubeconfig, context=opts.context, namespace=opts.namespace
    )


def cluster_configured(cluster: ClusterOptions | None = None) -> bool:
    """Whether a cluster can be reached at all: a connection flag, $KUBECONFIG,
    ~/.kube/config, or a pod's service account (without importing the kubernetes client)."""
    if cluster is not None and cluster.given:
        return True
    if os.environ.get("KUBECONFIG") or os.environ.get("KUBERNETES_SERVICE_HOST"):
        return True
    return Path("~/.kube/config").expanduser().is_file()


def backend_for_run(
    run: str, *, local: bool = False, cluster: ClusterOptions | None = None
) -> Backend:
    """`--local`, or a local run of that name when no cluster flag was given, or this
    machine when no cluster is configured; else the cluster. A path is a UserError."""
    if "/" in run:  # a run name is a DNS label: a slash means a folder was given
        raise UserError(
            f"{run!r} is a path, not a run name",
            hint="name the run (`launcher list` shows them); `launcher report` and "
            "`launcher pull` also take a run's output folder",
        )
    if not local and not (cluster and cluster.given):
        from kubetune.config.cluster import sanitize_name
        from launcher.backends.local import kubetune_home

        local = (kubetune_home() / "runs" / sanitize_name(run) / "run.json").is_file()
        local = local or not cluster_configured(cluster)
    return get_backend(local=local, cluster=cluster)


def submit(cfg: PipelineConfig, backend: Backend, *, replace: bool = False) -> SubmitResult:
    return backend.submit(cfg, replace=replace)


def wait(
    backend: Backend,
    run: str,
    *,
    timeout: float | None = None,
    poll: float = 2.0,
    on_change: Callable[[RunStatus], None] | None = None,
) -> RunStatus:
    """Poll until the run succeeds, fails or is cancelled; `on_change` sees each new state."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last = None
    while True:
        status = backend.status(run)
        key = (status.phase, status.reason, status.progress and status.progress.step)
        if on_change is not None and key != last:
            on_change(status)
        last = key
        if status.done:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise ClusterError(
                f"run {run} still {status.phase} after {timeout:.0f}s",
                hint="`launcher status` shows where it stands",
            )
        time.sleep(poll)
