"""What `submit` does on Kubernetes (a mixin of `KubernetesBackend`): the run's Secrets and the
server's version checked, then the workload created, and the ConfigMap (and headless Service)
owned by it; a workload of the same config is handed to `k8s_resubmit`."""

from __future__ import annotations

from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune.config import PipelineConfig, config_hash, output_uri, run_name
from kubetune.errors import ClusterError, UserError
from launcher.backends import k8s_features
from launcher.backends.base import SubmitResult
from launcher.backends.k8s_client import api_errors
from launcher.backends.k8s_resubmit import DELETION_WAIT
from launcher.backends.k8s_workloads import JOB, kind_of, workload_ref
from launcher.manifests import LABEL_HASH, build_manifests, job_name
from launcher.pod_security import pod_patch_warnings

Obj = dict[str, Any]


class Submits:
    """Needs the backend's name, api, core, workloads, explicit_namespace, namespace, _jobs,
    _again, _over_if_completed, _delete_job and _wait_gone."""

    name: str
    api: Any
    core: Any
    workloads: Any
    explicit_namespace: str | None
    namespace: str
    _jobs: Any
    _again: Any
    _over_if_completed: Any
    _delete_job: Any
    _wait_gone: Any

    def submit(self, cfg: PipelineConfig, *, replace: bool = False) -> SubmitResult:
        ns = self.explicit_namespace or (cfg.job.namespace if cfg.job else None) or self.namespace
        self.namespace = ns  # status/logs/wait after submit follow the run where it was created
        config_map, job, *extras = build_manifests(cfg, namespace=ns)
        run, name = run_name(cfg), job_name(cfg)
        result = SubmitResult(
            backend=self.name,
            run=run,
            job_name=name,
            config_hash=config_hash(cfg),
            output_uri=output_uri(cfg),
            created=True,
            namespace=ns,
        )
        unchecked = self._check_secrets(cfg, ns)
        result = _replace_field(result, warnings=(*unchecked, *self._warnings(cfg, job)))
        jobs = self._jobs(ns, run)
        deleting = [workload_ref(j) for j in jobs if j["metadata"].get("deletionTimestamp")]
        if workload_ref(job) in deleting:  # a cancel still in progress: wait, then create it anew
            self._wait_gone([workload_ref(job)], DELETION_WAIT, ns)
        existing = [j for j in jobs if not j["metadata"].get("deletionTimestamp")]
        same = next((j for j in existing if workload_ref(j) == workload_ref(job)), None)
        if same is not None:
            return self._again(ns, same, result, cfg, replace)
        if existing and not replace:
            other = existing[-1]["metadata"]
            raise UserError(
                f"run {run!r} already exists in namespace {ns} with a different config "
                f"(Job {other['name']}, config hash {other['labels'].get(LABEL_HASH)})",
                hint="pass --replace to delete it and submit this config, or --name to start "
                "a new run",
            )
        for old in existing:
            self._delete_job(ns, old)
        over = self._over_if_completed(cfg, ns) if replace and not existing else None
        if over is not None:  # --replace of a run that completed and whose Job is gone (TTL)
            config_map, job, *extras = over[0]
            result = _replace_field(result, note=over[1])
        if not self._create(ns, config_map, job, extras):
            return _replace_field(result, created=False)
        return result

    def _warnings(self, cfg: PipelineConfig, workload: Obj) -> tuple[str, ...]:
        """pod_patch against the restricted profile and the Job fields the server's version
        ignores (warnings); a Job the version cannot run, or a custom resource the cluster
        does not serve (UserError)."""
        kind = kind_of(workload)
        with api_errors(f"looking up the {kind.kind} API"):
            self.workloads.require(kind)
        ignored: list[str] = []
        if kind is JOB:
            version = self.version()
            missing = k8s_features.missing_features(workload, version)
            if missing:
                raise UserError(missing[0], hint="use a newer cluster, or job.nodes: 1")
            ignored = k8s_features.ignored_features(workload, version)
        return (*pod_patch_warnings(cfg), *ignored)

    def version(self) -> tuple[int, int]:
        """The API server's (major, minor) Kubernetes version."""
        with api_errors("reading the server version"):
            info = client.VersionApi(self.api).get_code()
        return k8s_features.parse_version(info.major, info.minor)

    def _check_secrets(self, cfg: PipelineConfig, ns: str) -> list[str]:
        """Check the Secrets the run names; the warnings for those this identity may not read
        (the chart's UI ServiceAccount has no access to Secrets)."""
        refs = []
        if cfg.storage is not None and cfg.storage.credentials_secret is not None:
            ref = cfg.storage.credentials_secret
            keys = [ref.access_key_id_key, ref.secret_access_key_key]
            refs.append((ref.name, keys, "storage.credentials_secret"))
        if cfg.job is not None and cfg.job.hf_token_secret is not None:
            ref2 = cfg.job.hf_token_secret
            refs.append((ref2.name, [ref2.key], "job.hf_token_secret"))
        return [w for name, keys, field in refs if (w := self._check_secret(ns, name, keys, field))]

    def _check_secret(self, ns: str, name: str, keys: list[str], field: str) -> str | None:
        """The Secret exists and has the keys (values are never read into messages); a
        warning instead when this identity may not read Secrets."""
        literals = " ".join(f"--from-literal={k}=..." for k in keys)
        create = f"kubectl -n {ns} create secret generic {name} {literals}"
        with api_errors(f"checking Secret {name!r}"):
            try:
                secret = self.core.read_namespaced_secret(name, ns)
            except ApiException as err:
                if err.status == 404:
                    raise UserError(
                        f"Secret {name!r} ({field}) not found in namespace {ns}",
                        hint=f"create it: {create}",
                    ) from None
                if err.status == 403:
                    return (
                        f"Secret {name!r} ({field}) not checked: this identity may not read "
                        f"Secrets in {ns}; the pod will not start if it is missing ({create})"
                    )
                raise
        missing = [k for k in keys if k not in (secret.data or {})]
        if missing:
            raise UserError(
                f"Secret {name!r} ({field}) in namespace {ns} has no key {', '.join(missing)}",
                hint=f"recreate it: {create}",
            )
        return None

    def _create(self, ns: str, config_map: Obj, job: Obj, extras: list[Obj]) -> bool:
        """The workload first, then the ConfigMap (and the headless Service) owned by it
        (create-only RBAC; the kubelet waits for the ConfigMap). False when the workload
        already existed (a concurrent submit)."""
        name, kind = job["metadata"]["name"], job["kind"]
        with api_errors(f"creating {kind} {name}"):
            try:
                created = self.workloads.create(ns, job)
            except ApiException as err:
                if err.status == 409:
                    return False
                raise
        uid = created["metadata"]["uid"]
        owner = {"apiVersion": job["apiVersion"], "kind": kind, "name": name, "uid": uid}
        try:
            for obj in (config_map, *extras):
                meta = {**obj["metadata"], "ownerReferences": [owner]}
                self._create_owned(ns, {**obj, "metadata": meta})
        except ClusterError:
            self._delete_job(ns, job)  # no workload without its config
            raise
        return True

    def _create_owned(self, ns: str, obj: Obj) -> None:
        """Create the ConfigMap or the Service, replacing a stale leftover of that name."""
        core = self.core
        create, delete = {
            "ConfigMap": (core.create_namespaced_config_map, core.delete_namespaced_config_map),
            "Service": (core.create_namespaced_service, core.delete_namespaced_service),
        }[obj["kind"]]
        name = obj["metadata"]["name"]
        with api_errors(f"creating {obj['kind']} {name}"):
            try:
                create(ns, obj)
            except ApiException as err:
                if err.status != 409:
                    raise
                delete(name, ns)  # a stale leftover
                create(ns, obj)


def _replace_field(result: SubmitResult, **changes: Any) -> SubmitResult:
    from dataclasses import replace

    return replace(result, **changes)
