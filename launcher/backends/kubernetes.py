"""The Kubernetes backend: the run's ConfigMap + workload (a Job, an Indexed Job + headless
Service, a JobSet or a TrainJob: `job.backend`) through the real `kubernetes` client.

Every ApiException / connection error becomes a one-line ClusterError (or UserError when the
user must fix something) at this boundary (`k8s_client.api_errors`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from kubetune.config import PipelineConfig, config_hash, output_uri, parse_config, run_name
from kubetune.config.cluster import sanitize_name
from kubetune.errors import ClusterError, ConfigError, UserError
from kubetune.humanize import count
from launcher.backends import k8s_features, k8s_saved_logs, k8s_status
from launcher.backends.base import Backend, RunStatus, SubmitResult, read_progress
from launcher.backends.k8s_client import api_errors, load_api_client
from launcher.backends.k8s_resubmit import DELETION_WAIT, Resubmits
from launcher.backends.k8s_workloads import (
    BY_KIND,
    JOB,
    KINDS,
    WorkloadKind,
    Workloads,
    is_child,
    kind_of,
)
from launcher.manifests import (
    ANNOTATION_OUTPUT,
    LABEL_HASH,
    LABEL_NAME,
    LABEL_RUN,
    build_manifests,
    job_name,
)
from launcher.pod_security import pod_patch_warnings

Obj = dict[str, Any]


class KubernetesBackend(Resubmits, Backend):
    """Runs as Jobs, JobSets or TrainJobs (`job.backend`) in one namespace."""

    name = "kubernetes"

    def __init__(
        self,
        *,
        kubeconfig: str | None = None,
        context: str | None = None,
        namespace: str | None = None,
    ) -> None:
        self.api, context_ns = load_api_client(kubeconfig, context)
        self.explicit_namespace = namespace
        self.namespace = namespace or context_ns or "default"
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.workloads = Workloads(self.api)

    def _dict(self, obj: Any) -> Obj:
        return self.api.sanitize_for_serialization(obj)

    # --- submit -------------------------------------------------------------------------

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
        deleting = [_ref(j) for j in jobs if j["metadata"].get("deletionTimestamp")]
        if _ref(job) in deleting:  # a cancel still in progress: wait, then create it anew
            self._wait_gone([_ref(job)], DELETION_WAIT, ns)
        existing = [j for j in jobs if not j["metadata"].get("deletionTimestamp")]
        same = next((j for j in existing if _ref(j) == _ref(job)), None)
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

    # --- reading ------------------------------------------------------------------------

    def _jobs(self, ns: str, run: str | None = None) -> list[Obj]:
        selector = (
            f"{LABEL_NAME}=kubetune,{LABEL_RUN}={run}"
            if run
            else f"{LABEL_NAME}=kubetune,{LABEL_RUN}"
        )
        jobs: list[Obj] = []
        for kind in KINDS:  # a kind the cluster lacks, or the caller may not list, has none
            with api_errors(f"listing {kind.kind}s"):
                try:
                    jobs += self.workloads.list(kind, ns, selector)
                except ApiException as err:
                    if kind is JOB or err.status not in (403, 404):
                        raise
        return sorted(
            (j for j in jobs if not is_child(j)),  # a JobSet's Jobs are not runs of their own
            key=lambda j: (j["metadata"].get("creationTimestamp") or "", j["metadata"]["name"]),
        )

    def _find_job(self, run: str) -> Obj:
        jobs = self._jobs(self.namespace, sanitize_name(run))
        if not jobs:
            with api_errors(f"reading Job {run}"):
                try:
                    return self.workloads.read(JOB, self.namespace, run)
                except ApiException as err:
                    if err.status != 404:
                        raise
            raise UserError(
                f"no kubetune run {run!r} in namespace {self.namespace}",
                hint="`launcher list` shows the runs; pass --namespace if it is elsewhere",
            )
        return jobs[-1]

    def _pods(self, job: Obj) -> tuple[list[Obj], str]:
        labels = job["metadata"].get("labels", {})
        selector = f"{LABEL_RUN}={labels.get(LABEL_RUN)},{LABEL_HASH}={labels.get(LABEL_HASH)}"
        with api_errors("listing pods"):
            pod_list = self.core.list_namespaced_pod(self.namespace, label_selector=selector)
        pods = _by_age([self._dict(p) for p in pod_list.items])
        return pods, pod_list.metadata.resource_version

    def _events(self, name: str | None = None) -> list[Obj]:
        """The events about object `name` (None: every event in the namespace)."""
        selector = f"involvedObject.name={name}" if name else None
        with api_errors("listing events"):
            items = self.core.list_namespaced_event(self.namespace, field_selector=selector).items
        return [self._dict(e) for e in items]

    def status(self, run: str) -> RunStatus:
        return self._status(self._find_job(run), with_progress=True)

    def _status(
        self, job: Obj, *, with_progress: bool, known: tuple[list[Obj], list[Obj]] | None = None
    ) -> RunStatus:
        """`known`: the job's pods and events, already listed (`list`)."""
        meta = job["metadata"]
        if known is not None:
            pods, events = known
        else:
            pods = self._pods(job)[0]
            events = [] if pods else self._events(meta["name"])
        phase, reason, message = k8s_status.workload_phase(job, pods, events)
        status = RunStatus(
            backend=self.name,
            run=meta.get("labels", {}).get(LABEL_RUN, meta["name"]),
            job_name=meta["name"],
            phase=phase,
            reason=reason,
            message=message,
            retries=k8s_status.retries(pods),
            pods=[p["metadata"]["name"] for p in pods],
            labels=dict(meta.get("labels") or {}),
            output_uri=meta.get("annotations", {}).get(ANNOTATION_OUTPUT),
            config_hash=meta.get("labels", {}).get(LABEL_HASH),
            namespace=self.namespace,
            nodes=k8s_status.workload_nodes(job),
        )
        if with_progress and phase not in ("Pending", "Suspended"):
            status.progress, status.progress_error = self._progress(meta["name"])
        return status

    def _progress(self, name: str) -> tuple[Any, str | None]:
        """Progress from the run's storage, located through the config in its ConfigMap."""
        try:
            cfg = self._config(name)
        except (ClusterError, ConfigError) as err:
            return None, str(err).splitlines()[0]
        return read_progress(output_uri(cfg), cfg.storage)

    def _config(self, name: str) -> PipelineConfig:
        """The resolved config in the Job's ConfigMap."""
        with api_errors(f"reading ConfigMap {name}"):
            cm = self.core.read_namespaced_config_map(name, self.namespace)
        return parse_config((cm.data or {}).get("config.yaml", ""), name=f"configmap/{name}")

    def run_config(self, run: str) -> PipelineConfig:
        return self._config(self._find_job(run)["metadata"]["name"])

    def list(self) -> list[RunStatus]:
        """Every run, from one listing of the jobs, one of their pods and (if a run has no
        pod) one of the namespace's events: not two API calls per run."""
        jobs = self._jobs(self.namespace)
        if not jobs:
            return []
        with api_errors("listing pods"):
            items = self.core.list_namespaced_pod(self.namespace, label_selector=LABEL_RUN).items
        pods: dict[tuple[str | None, str | None], list[Obj]] = {}
        for pod in _by_age([self._dict(p) for p in items]):
            labels = pod["metadata"].get("labels") or {}
            pods.setdefault((labels.get(LABEL_RUN), labels.get(LABEL_HASH)), []).append(pod)
        events: list[Obj] | None = None
        statuses = []
        for job in jobs:
            labels = job["metadata"].get("labels") or {}
            mine = pods.get((labels.get(LABEL_RUN), labels.get(LABEL_HASH)), [])
            if not mine and events is None:
                events = self._events()
            about = [
                e
                for e in events or []
                if e.get("involvedObject", {}).get("name") == job["metadata"]["name"]
            ]
            statuses.append(
                self._status(job, with_progress=False, known=(mine, [] if mine else about))
            )
        return statuses

    # --- logs ---------------------------------------------------------------------------

    def logs(
        self, run: str, *, follow: bool = False, latest: bool = False, rank: int | None = None
    ) -> Iterator[str]:
        """Every pod's log of one node, oldest first: node `rank` (default 0, the node that
        logs progress) of a multi-node run; first (unless `latest`) the log tails saved when
        submit replaced an earlier workload of the run (`k8s_saved_logs`)."""
        job = self._find_job_or_saved(run)
        if job is None:  # no workload, but logs saved here when one was replaced
            local = self._log_stores(None, sanitize_name(run))
            yield from k8s_saved_logs.saved_lines(local, rank or 0)
            return
        nodes = k8s_status.workload_nodes(job)
        if rank is not None and not 0 <= rank < nodes:
            raise UserError(
                f"run {run} has {count(nodes, 'node')}: --rank takes 0..{nodes - 1}",
                hint="--rank is the node rank (the pod's completion index)",
            )
        saved = [] if latest else list(self._saved_lines(job, rank or 0))
        yield from saved
        want = None if nodes == 1 else (rank or 0)
        seen, container = set[str](), kind_of(job).container
        while True:
            finished = follow and self._finished(job)
            pods, version = self._pods(job)
            pods = [p for p in pods if want is None or k8s_status.node_rank(p) == want]
            for pod in pods:
                pod_name = pod["metadata"]["name"]
                if pod_name in seen or pod["status"].get("phase") == "Pending":
                    continue
                if seen:  # a retry: mark where the next attempt's log starts
                    yield f"==> pod {pod_name} (attempt {pods.index(pod) + 1}) <=="
                elif saved:
                    yield f"==> pod {pod_name} (the current {job['kind']}) <=="
                seen.add(pod_name)
                yield from self._pod_log(pod_name, follow and not finished, container)
            if not follow or finished:
                return
            self._wait_for_pods(job, version)

    def _finished(self, workload: Obj) -> bool:
        name, kind = workload["metadata"]["name"], kind_of(workload)
        with api_errors(f"reading {kind.kind} {name}"):
            try:
                job = self.workloads.read(kind, self.namespace, name)
            except ApiException as err:
                if err.status == 404:
                    return True
                raise
        return k8s_status.finished(job)

    def _pod_log(self, pod: str, follow: bool, container: str) -> Iterator[str]:
        with api_errors(f"reading logs of pod {pod}"):
            if follow:  # kubernetes' Watch streams `follow=true` logs line by line
                yield from watch.Watch().stream(
                    self.core.read_namespaced_pod_log,
                    name=pod,
                    namespace=self.namespace,
                    container=container,
                )
                return
            resp = self.core.read_namespaced_pod_log(
                pod, self.namespace, container=container, _preload_content=False
            )
            yield from resp.data.decode("utf-8", errors="replace").splitlines()

    def _wait_for_pods(self, job: Obj, version: str, timeout: int = 5) -> None:
        """Block until one of the Job's pods changes (or `timeout` seconds pass)."""
        labels = job["metadata"].get("labels", {})
        selector = f"{LABEL_RUN}={labels.get(LABEL_RUN)},{LABEL_HASH}={labels.get(LABEL_HASH)}"
        stream = watch.Watch()
        with api_errors("watching pods"):
            for _ in stream.stream(
                self.core.list_namespaced_pod,
                self.namespace,
                label_selector=selector,
                resource_version=version,
                timeout_seconds=timeout,
            ):
                stream.stop()
                return

    # --- cancel -------------------------------------------------------------------------

    def cancel(self, run: str, *, wait: bool = False, timeout: float = 300.0) -> RunStatus:
        """Delete the run's workloads (foreground: pods, the owned ConfigMap and Service go
        too). The run is Cancelling while the API server still shows a workload, Cancelled
        once all are gone."""
        job = self._find_job(run)
        status = self._status(job, with_progress=False)
        jobs = self._jobs(self.namespace, job["metadata"].get("labels", {}).get(LABEL_RUN))
        refs = [_ref(j) for j in jobs or [job]]
        for kind, name in refs:
            self._delete(self.namespace, BY_KIND[kind], name)
        gone = self._wait_gone(refs, timeout if wait else 0.0, self.namespace)
        status.phase = "Cancelled" if gone else "Cancelling"
        status.reason = "Deleted" if gone else "Terminating"
        status.message = f"{job['kind']} deleted; outputs stay in {status.output_uri}"
        return status

    def _wait_gone(self, refs: list[tuple[str, str]], timeout: float, ns: str) -> bool:
        """Whether the workloads and their ConfigMaps are gone, polling up to `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            if not any(self._exists(read, name, ns) for read, name in self._readers(refs)):
                return True
            if time.monotonic() >= deadline:
                if timeout:
                    kind, name = refs[-1]
                    raise ClusterError(
                        f"{kind} {name} is still being deleted after {timeout:.0f}s",
                        hint="`launcher status` shows it; the garbage collector may be slow",
                    )
                return False
            time.sleep(0.5)

    def _readers(self, refs: list[tuple[str, str]]) -> list[tuple[Any, str]]:
        """(read function, name) of each workload and its ConfigMap."""
        out: list[tuple[Any, str]] = []
        for kind, name in refs:
            read = functools.partial(self._read_workload, BY_KIND[kind])
            out += [(read, name), (self.core.read_namespaced_config_map, name)]
        return out

    def _read_workload(self, kind: WorkloadKind, name: str, ns: str) -> Obj:
        return self.workloads.read(kind, ns, name)

    def _exists(self, read: Any, name: str, ns: str) -> bool:
        with api_errors(f"reading {name}"):
            try:
                read(name, ns)
            except ApiException as err:
                if err.status == 404:
                    return False
                raise
        return True

    def _delete_job(self, ns: str, workload: Obj) -> None:
        self._delete(ns, kind_of(workload), workload["metadata"]["name"])

    def _delete(self, ns: str, kind: WorkloadKind, name: str) -> None:
        with api_errors(f"deleting {kind.kind} {name}"):
            try:
                self.workloads.delete(kind, ns, name)
            except ApiException as err:
                if err.status != 404:
                    raise


def _ref(workload: Obj) -> tuple[str, str]:
    """(kind, name): a workload's identity in its namespace."""
    return workload["kind"], workload["metadata"]["name"]


def _replace_field(result: SubmitResult, **changes: Any) -> SubmitResult:
    from dataclasses import replace

    return replace(result, **changes)


def _by_age(pods: list[Obj]) -> list[Obj]:
    """Pods oldest first (creation time, then resource version)."""
    return sorted(
        pods,
        key=lambda p: (
            p["metadata"].get("creationTimestamp") or "",
            int(p["metadata"].get("resourceVersion") or 0),
        ),
    )
