"""The Kubernetes backend and its CLI commands, through the real `kubernetes` client.

Tests taking `kube` run twice: against the in-process fake API server (always) and against a
real cluster (marker `cluster`, only with KUBECONFIG set: `pytest -m cluster`). Tests taking
`fake_kube` need to move pods along by hand, which only the fake allows.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from k8s_fake import FakeKube
from kube_configs import TEST_ACCESS_KEY, TEST_SECRET_KEY, config_dict, make_config
from kubernetes import client, config

from kubetune.config import PipelineConfig, load_config
from kubetune.errors import ClusterError, UserError
from launcher.backends import k8s_features, k8s_status
from launcher.backends.kubernetes import KubernetesBackend
from launcher.manifests import job_name


@dataclass
class Kube:
    kubeconfig: str
    namespace: str
    fake: FakeKube | None
    core: client.CoreV1Api
    batch: client.BatchV1Api

    def backend(self) -> KubernetesBackend:
        return KubernetesBackend(kubeconfig=self.kubeconfig, namespace=self.namespace)

    def create_secret(self, name: str, data: dict[str, str]) -> None:
        body = {
            "metadata": {"name": name},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }
        self.core.create_namespaced_secret(self.namespace, body)

    def jobs(self, run: str) -> list[str]:
        items = self.batch.list_namespaced_job(
            self.namespace, label_selector=f"kubetune.io/run={run}"
        ).items
        return sorted(j.metadata.name for j in items if not j.metadata.deletion_timestamp)

    def config_maps(self, run: str) -> list[Any]:
        return self.core.list_namespaced_config_map(
            self.namespace, label_selector=f"kubetune.io/run={run}"
        ).items

    def cli(self, *args: str) -> Any:
        from launcher.cli.main import main

        return CliRunner().invoke(
            main, [*args, "--kubeconfig", self.kubeconfig, "--namespace", self.namespace]
        )


def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


def _clients(kubeconfig: str) -> tuple[client.CoreV1Api, client.BatchV1Api]:
    api = config.new_client_from_config(config_file=kubeconfig)
    return client.CoreV1Api(api), client.BatchV1Api(api)


@pytest.fixture
def fake_kube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Kube]:
    monkeypatch.setenv("KUBETUNE_HOME", str(tmp_path / "kubetune-home"))  # saved pod logs
    with FakeKube() as fake:
        kubeconfig = str(fake.write_kubeconfig(tmp_path / "kubeconfig"))
        kube = Kube(kubeconfig, "default", fake, *_clients(kubeconfig))
        kube.create_secret(
            "s3-credentials",
            {"AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY},
        )
        yield kube


@pytest.fixture
def real_kube() -> Iterator[Kube]:
    kubeconfig = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    if not kubeconfig:
        pytest.skip("set KUBECONFIG to run the tests against a real cluster")
    core, batch = _clients(kubeconfig)
    namespace = f"kubetune-test-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": namespace}})
    kube = Kube(kubeconfig, namespace, None, core, batch)
    kube.create_secret(
        "s3-credentials",
        {"AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY},
    )
    try:
        yield kube
    finally:
        core.delete_namespace(namespace)


@pytest.fixture(params=["fake", pytest.param("cluster", marks=pytest.mark.cluster)])
def kube(request: pytest.FixtureRequest) -> Kube:
    return request.getfixturevalue("fake_kube" if request.param == "fake" else "real_kube")


def _cfg(name: str = "my-run", **job: Any) -> PipelineConfig:
    return make_config("SD_LORA", name=name, **job)


def _write(tmp_path: Path, name: str = "my-run", **job: Any) -> str:
    path = tmp_path / f"{name}-{uuid.uuid4().hex[:4]}.yaml"
    path.write_text(json.dumps(config_dict("SD_LORA", name=name, **job)))
    return str(path)


# --- against the fake and (opt-in) a real cluster ---------------------------------------------


def test_submit_is_idempotent_and_the_config_map_is_owned(kube: Kube) -> None:
    backend, cfg = kube.backend(), _cfg()
    first = backend.submit(cfg)
    again = backend.submit(_cfg())
    assert first.created and not again.created
    assert first.job_name == again.job_name == job_name(cfg)
    assert kube.jobs("my-run") == [first.job_name]
    (cm,) = kube.config_maps("my-run")
    job = kube.batch.read_namespaced_job(first.job_name, kube.namespace)
    assert [o.uid for o in cm.metadata.owner_references] == [job.metadata.uid]
    assert TEST_SECRET_KEY not in cm.data["config.yaml"]


def test_other_config_same_run_is_an_error_unless_replace(kube: Kube) -> None:
    backend = kube.backend()
    old = backend.submit(_cfg())
    with pytest.raises(UserError, match=r"already exists .*different config.*--replace"):
        backend.submit(_cfg(cpu="8"))
    assert kube.jobs("my-run") == [old.job_name]
    new = backend.submit(_cfg(cpu="8"), replace=True)
    assert new.created and new.job_name != old.job_name
    assert eventually(lambda: kube.jobs("my-run") == [new.job_name], 60)


def test_missing_credentials_secret_says_how_to_create_it(kube: Kube) -> None:
    cfg = _cfg()
    assert cfg.storage is not None and cfg.storage.credentials_secret is not None
    cfg.storage.credentials_secret.name = "no-such-secret"
    with pytest.raises(UserError) as err:
        kube.backend().submit(cfg)
    assert str(err.value).count("\n") == 0
    assert f"kubectl -n {kube.namespace} create secret generic no-such-secret" in str(err.value)
    assert "--from-literal=AWS_SECRET_ACCESS_KEY=" in str(err.value)
    assert kube.jobs("my-run") == []


def test_an_identity_that_may_not_read_secrets_submits_with_a_warning(fake_kube: Kube) -> None:
    """The chart's UI ServiceAccount has no access to Secrets: submit warns, not fails."""
    fake_kube.fake.forbidden.add("secrets")
    result = fake_kube.backend().submit(_cfg())
    assert result.created
    assert any("not checked: this identity may not read Secrets" in w for w in result.warnings)


@pytest.mark.slow
def test_list_reads_pods_and_events_once_not_per_run(fake_kube: Kube) -> None:
    """`list` (the runs page polls it) costs a few API calls, not two per run, and says
    what `status` says of each run."""
    backend = fake_kube.backend()
    for i in range(4):
        backend.submit(_cfg(name=f"run-{i}"))
    assert fake_kube.fake is not None
    fake_kube.fake.requests.clear()
    statuses = backend.list()
    calls = [path for method, path in fake_kube.fake.requests if method == "GET"]
    assert sum("/pods" in c for c in calls) == 1 and sum("/events" in c for c in calls) <= 1
    assert sorted(s.run for s in statuses) == [f"run-{i}" for i in range(4)]
    for listed in statuses:
        alone = backend.status(listed.run)
        assert (listed.phase, listed.reason, listed.pods) == (alone.phase, alone.reason, alone.pods)


def test_secret_without_the_key_is_reported(kube: Kube) -> None:
    kube.create_secret("half", {"AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY})
    cfg = _cfg()
    assert cfg.storage and cfg.storage.credentials_secret
    cfg.storage.credentials_secret.name = "half"
    with pytest.raises(UserError, match="has no key AWS_SECRET_ACCESS_KEY"):
        kube.backend().submit(cfg)


def test_cancel_deletes_the_job_and_its_config_map(kube: Kube) -> None:
    backend = kube.backend()
    backend.submit(_cfg())
    status = backend.cancel("my-run", wait=True, timeout=120)
    assert status.phase == "Cancelled" and "s3://kubetune/kubetune/my-run" in status.message
    assert not kube.jobs("my-run") and not kube.config_maps("my-run")
    assert not kube.batch.list_namespaced_job(kube.namespace).items  # not even terminating
    with pytest.raises(UserError, match="no kubetune run"):
        backend.status("my-run")


def test_a_job_being_deleted_is_cancelling_until_gone(kube: Kube) -> None:
    """Without --wait, cancel returns at once: Cancelling while the API server still shows
    the Job (foreground deletion on a real cluster), Cancelled once it is gone."""
    backend = kube.backend()
    backend.submit(_cfg())
    first = backend.cancel("my-run")
    assert first.phase in ("Cancelling", "Cancelled") and first.done

    def settled() -> bool:
        try:
            return backend.status("my-run").phase == "Cancelling"
        except UserError:
            return True  # gone

    assert eventually(settled, 5)
    if first.phase == "Cancelling":  # cancelling again waits for the same deletion, unless
        try:  # it ended in between: an idle real cluster deletes a Job in well under a second
            again = backend.cancel("my-run", wait=True, timeout=120)
        except UserError as err:
            assert "no kubetune run" in str(err)
        else:
            assert again.phase == "Cancelled"
    with pytest.raises(UserError, match="no kubetune run"):
        backend.status("my-run")


def test_submit_right_after_cancel_waits_for_the_deletion(kube: Kube) -> None:
    """Resubmitting the same config while its cancelled Job is still being deleted creates
    it anew (never "already submitted" for a Job about to vanish)."""
    backend = kube.backend()
    backend.submit(_cfg())
    backend.cancel("my-run")
    again = backend.submit(_cfg())
    assert again.created
    job = kube.batch.read_namespaced_job(again.job_name, kube.namespace)
    assert job.metadata.deletion_timestamp is None


def test_job_phase_of_a_job_with_a_deletion_timestamp() -> None:
    job = {
        "metadata": {"name": "j", "deletionTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {},
        "status": {"conditions": [{"type": "Complete", "status": "True"}]},
    }
    running = {"metadata": {"name": "p"}, "status": {"phase": "Running"}}
    assert k8s_status.job_phase(job, [running], [])[:2] == ("Cancelling", "Terminating")


def test_list_and_status_of_fresh_runs(kube: Kube) -> None:
    backend = kube.backend()
    backend.submit(_cfg("run-a"))
    backend.submit(_cfg("run-b"))
    runs = {r.run: r for r in backend.list()}
    assert set(runs) == {"run-a", "run-b"}
    assert backend.status("run-a").phase in ("Pending", "Running")


def test_a_queued_run_is_suspended(kube: Kube) -> None:
    backend = kube.backend()
    if backend.version() < k8s_features.JOB_FEATURES["suspend"][0]:
        pytest.skip(f"Kubernetes {backend.version()} has no Job spec.suspend (1.21+)")
    result = backend.submit(_cfg("run-b", queue_name="gpu-queue"))
    assert not [w for w in result.warnings if "suspend" in w]
    status = backend.status("run-b")
    assert status.phase == "Suspended" and "gpu-queue" in (status.message or "")


def test_submit_warns_about_job_fields_the_cluster_ignores(kube: Kube) -> None:
    """An old API server prunes fields it does not know: submit says so."""
    if kube.fake is not None:
        kube.fake.version = ("1", "20+")
    backend = kube.backend()
    result = backend.submit(_cfg("run-c", queue_name="gpu-queue"))
    ignored = [w for w in result.warnings if "ignores Job spec." in w]
    major, minor = backend.version()
    assert bool(ignored) == ((major, minor) < (1, 26))
    if (major, minor) < (1, 21):
        assert any("spec.suspend" in w and "starts at once" in w for w in ignored)


def test_multi_node_needs_indexed_jobs(kube: Kube) -> None:
    """A cluster older than 1.24 (the cluster tier's v1.20) cannot run a multi-node Job: submit
    refuses it before creating anything (there, multi-node manifests can only be rendered)."""
    if kube.fake is not None:
        kube.fake.version = ("1", "20")
    backend = kube.backend()
    if backend.version() >= (1, 24):
        pytest.skip("this cluster runs Indexed Jobs")
    with pytest.raises(UserError, match=r"no Job spec.completionMode.*Indexed Jobs"):
        backend.submit(_cfg("run-n", nodes=2, gpus=0, cpu="100m", memory=None))
    assert kube.jobs("run-n") == [] and kube.config_maps("run-n") == []


# --- fake only: pod lifecycle under test control ----------------------------------------------


def test_status_reasons_while_pending(fake_kube: Kube) -> None:
    fake, backend = fake_kube.fake, fake_kube.backend()
    assert fake is not None
    job = backend.submit(_cfg()).job_name
    pod = fake.latest_pod(job)
    fake.unschedulable(pod, "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
    status = backend.status("my-run")
    assert (status.phase, status.reason) == ("Pending", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in (status.message or "")
    fake.pod_waiting(pod, "ImagePullBackOff", 'Back-off pulling image "ghcr.io/x:1"')
    status = backend.status("my-run")
    assert status.reason == "ImagePullBackOff" and "job.image" in (status.message or "")
    fake.start_pod(pod)
    assert backend.status("my-run").phase == "Running"


def test_status_reports_quota_refusals(fake_kube: Kube) -> None:
    assert fake_kube.fake is not None
    fake_kube.fake.refuse_pods = "exceeded quota: gpu-quota, requested: nvidia.com/gpu=1"
    fake_kube.backend().submit(_cfg())
    status = fake_kube.backend().status("my-run")
    assert (status.phase, status.reason) == ("Pending", "QuotaExceeded")
    assert "gpu-quota" in (status.message or "")


def test_failures_oom_retry_then_config_error_fails_fast(fake_kube: Kube) -> None:
    fake, backend = fake_kube.fake, fake_kube.backend()
    assert fake is not None
    job = backend.submit(_cfg()).job_name
    first = fake.latest_pod(job)
    fake.start_pod(first)
    fake.finish_pod(first, 137, reason="OOMKilled")
    status = backend.status("my-run")
    assert (status.phase, status.reason, status.retries) == ("Pending", "Starting", 1)
    second = fake.latest_pod(job)
    assert second != first
    fake.start_pod(second)
    fake.finish_pod(second, 2)
    status = backend.status("my-run")
    assert (status.phase, status.reason) == ("Failed", "PodFailurePolicy")
    assert "exit code 2: config or data error" in (status.message or "")
    assert len(fake.pods(job)) == 2  # FailJob: no third attempt despite backoffLimit 3


def test_oom_until_backoff_limit(fake_kube: Kube) -> None:
    fake, backend = fake_kube.fake, fake_kube.backend()
    assert fake is not None
    job = backend.submit(_cfg(backoff_limit=0)).job_name
    fake.finish_pod(fake.latest_pod(job), 137, reason="OOMKilled")
    status = backend.status("my-run")
    assert (status.phase, status.reason) == ("Failed", "BackoffLimitExceeded")
    assert "OOMKilled" in (status.message or "") and "job.memory" in (status.message or "")


@pytest.mark.slow
def test_preemption_and_sigterm_checkpoint_do_not_count(fake_kube: Kube) -> None:
    fake, backend = fake_kube.fake, fake_kube.backend()
    assert fake is not None
    job = backend.submit(_cfg(backoff_limit=0)).job_name
    fake.finish_pod(fake.latest_pod(job), 143)
    fake.finish_pod(fake.latest_pod(job), 137, disruption=True)
    status = backend.status("my-run")
    assert status.phase == "Pending" and status.retries == 2
    fake.finish_pod(fake.latest_pod(job), 0)
    status = backend.status("my-run")
    assert status.phase == "Succeeded" and status.done and len(status.pods) == 3


def test_logs_follow_across_pod_restarts(fake_kube: Kube) -> None:
    fake, backend = fake_kube.fake, fake_kube.backend()
    assert fake is not None
    job = backend.submit(_cfg()).job_name
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(backend.logs("my-run", follow=True)))
    reader.start()
    first = fake.latest_pod(job)
    fake.start_pod(first)
    fake.log(first, "step 1/100", "step 2/100")
    assert eventually(lambda: "step 2/100" in lines)
    fake.log(first, "SIGTERM: checkpoint written")
    fake.finish_pod(first, 143)
    second = fake.latest_pod(job)
    time.sleep(0.2)  # the reader waits on a Pending pod
    fake.start_pod(second)
    fake.log(second, "resumed at step 2", "done")
    fake.finish_pod(second, 0)
    reader.join(15)
    assert not reader.is_alive()
    body = [line for line in lines if not line.startswith("==>")]
    assert body == [
        "step 1/100",
        "step 2/100",
        "SIGTERM: checkpoint written",
        "resumed at step 2",
        "done",
    ]
    assert list(backend.logs("my-run")) == lines  # without -f: the same, then stop


def test_progress_comes_from_storage(fake_kube: Kube, s3_env: Any, s3_bucket: str) -> None:
    fake, backend = fake_kube.fake, fake_kube.backend()
    assert fake is not None
    data = config_dict("SD_LORA", name="my-run")
    data["storage"].update(endpoint_url=s3_env.endpoint, bucket=s3_bucket)
    from kubetune.config import parse_config
    from kubetune.storage import open_store

    cfg = parse_config(json.dumps(data))
    job = backend.submit(cfg).job_name
    fake.start_pod(fake.latest_pod(job))
    store = open_store(f"s3://{s3_bucket}/kubetune/my-run", cfg.storage)
    store.put_bytes(
        "progress.json",
        json.dumps(
            {
                "state": "running",
                "step": 40,
                "total_steps": 100,
                "loss": 0.125,
                "images_per_second": 3.5,
                "eta_seconds": 95,
            }
        ).encode(),
    )
    status = backend.status("my-run")
    assert status.progress is not None and status.progress_error is None
    assert status.progress.summary() == "step 40/100, loss 0.125, 3.5 img/s, ETA 1m35s"


def test_a_failed_job_whose_record_says_running_is_not_running(
    fake_kube: Kube, s3_env: Any, s3_bucket: str
) -> None:
    """A pod killed outright (OOMKilled: SIGKILL) leaves progress.json saying running; once
    the Job is Failed, `status` says the run is not running and where its record stops,
    instead of a running run's figures. A runner that wrote its end says how it ended."""
    from kubetune.config import parse_config
    from kubetune.layout import ProgressRecord
    from kubetune.storage import open_store

    fake, backend = fake_kube.fake, fake_kube.backend()
    assert fake is not None
    data = config_dict("SD_LORA", name="my-run", backoff_limit=0)
    data["storage"].update(endpoint_url=s3_env.endpoint, bucket=s3_bucket)
    cfg = parse_config(json.dumps(data))
    job = backend.submit(cfg).job_name
    store = open_store(f"s3://{s3_bucket}/kubetune/my-run", cfg.storage)
    record = ProgressRecord(
        step=40, total_steps=100, eta_seconds=95, updated_at="2026-12-03T17:00:00+00:00"
    )
    store.put_bytes("progress.json", record.to_bytes())
    fake.start_pod(fake.latest_pod(job))
    assert backend.status("my-run").summary().endswith("ETA 1m35s")  # running: its own word
    fake.finish_pod(fake.latest_pod(job), 137, reason="OOMKilled")
    status = backend.status("my-run")
    assert (status.phase, status.reason) == ("Failed", "BackoffLimitExceeded")
    assert status.summary().endswith(
        "; step 40/100; not running: last record at step 40 (2026-12-03T17:00:00+00:00), "
        "no end recorded"
    )
    ended = record.model_copy(update={"state": "failed", "error": "boom", "exit_code": 1})
    store.put_bytes("progress.json", ended.to_bytes())
    assert backend.status("my-run").summary().endswith("; failed at step 40: boom (exit code 1)")


def test_unreachable_cluster_is_one_line(tmp_path: Path) -> None:
    with FakeKube() as fake:
        kubeconfig = str(fake.write_kubeconfig(tmp_path / "kubeconfig"))
    backend = KubernetesBackend(kubeconfig=kubeconfig)
    backend.api.configuration.retries = 0
    with pytest.raises(ClusterError, match="cannot reach the Kubernetes API") as err:
        backend.list()
    assert "\n" not in str(err.value)


# --- the CLI ------------------------------------------------------------------------------------


def _finish_when_started(fake: FakeKube, job: str, exit_code: int) -> threading.Thread:
    def drive() -> None:
        pod = fake.latest_pod(job, timeout=10)
        fake.start_pod(pod)
        fake.log(pod, "training...")
        time.sleep(0.3)
        fake.finish_pod(pod, exit_code)

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("exit_code", "status"), [(0, 0), (2, 2)])
def test_submit_wait_exit_status(
    fake_kube: Kube, tmp_path: Path, exit_code: int, status: int
) -> None:
    """0 when the run trained, 2 when its pod failed on bad input (exit 2)."""
    assert fake_kube.fake is not None
    config_file = _write(tmp_path)
    driver = _finish_when_started(fake_kube.fake, job_name(load_config(config_file)), exit_code)
    result = fake_kube.cli("submit", config_file, "--wait", "--follow", "--poll-interval", "0.05")
    driver.join(5)
    assert result.exit_code == status, result.output
    assert "training..." in result.output
    assert "outputs: s3://kubetune/kubetune/my-run" in result.output


def test_submit_wait_follows_the_run_into_job_namespace(fake_kube: Kube, tmp_path: Path) -> None:
    """job.namespace (no --namespace flag): --wait reads the run where submit created it."""
    assert fake_kube.fake is not None
    fake_kube.fake.create_namespace("team-a")
    backend = KubernetesBackend(kubeconfig=fake_kube.kubeconfig)
    cfg = _cfg(namespace="team-a")
    fake_kube.core.create_namespaced_secret(
        "team-a",
        {
            "metadata": {"name": "s3-credentials"},
            "stringData": {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"},
        },
    )
    result = backend.submit(cfg)
    assert result.namespace == "team-a"
    assert backend.status("my-run").job_name == result.job_name


@pytest.mark.slow
def test_submit_output_json_for_ci(fake_kube: Kube, tmp_path: Path) -> None:
    assert fake_kube.fake is not None
    config_file = _write(tmp_path)
    driver = _finish_when_started(fake_kube.fake, job_name(load_config(config_file)), 0)
    result = fake_kube.cli(
        "submit", config_file, "--wait", "--format", "json", "--poll-interval", "0.05"
    )
    driver.join(5)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["status"]["phase"] == "Succeeded" and doc["submit"]["run"] == "my-run"
    assert doc["status"]["output_uri"] == "s3://kubetune/kubetune/my-run"


@pytest.mark.slow
def test_cli_status_logs_list_cancel(fake_kube: Kube, tmp_path: Path) -> None:
    fake = fake_kube.fake
    assert fake is not None
    config_file = _write(tmp_path)
    first = fake_kube.cli("submit", config_file, "--set", "max_train_steps=10")
    assert first.exit_code == 0 and "submitted" in first.output
    again = fake_kube.cli("submit", _write(tmp_path), "--set", "max_train_steps=10")
    assert "already submitted" in again.output
    job = job_name(load_config(config_file).model_copy(update={"max_train_steps": 10}))
    pod = fake.latest_pod(job)
    fake.start_pod(pod)
    fake.log(pod, "hello from the pod")
    assert "my-run: Running" in fake_kube.cli("status", "my-run").output
    assert (
        json.loads(fake_kube.cli("status", "my-run", "--format", "json").stdout)["phase"]
        == "Running"
    )
    assert fake_kube.cli("logs", "my-run").output == "hello from the pod\n"
    assert "my-run" in fake_kube.cli("list").output
    assert "Cancelled" in fake_kube.cli("cancel", "my-run", "--wait").output
    missing = fake_kube.cli("status", "my-run")
    assert missing.exit_code == 2 and missing.output.startswith("error: no kubetune run")


def test_cli_missing_secret_is_a_user_error(fake_kube: Kube, tmp_path: Path) -> None:
    result = fake_kube.cli(
        "submit", _write(tmp_path), "--set", "storage.credentials_secret.name=absent"
    )
    assert result.exit_code == 2
    assert result.output.startswith("error: Secret 'absent'")
    assert TEST_SECRET_KEY not in result.output


def test_cli_render_needs_no_cluster(tmp_path: Path) -> None:
    from launcher.cli.main import main

    result = CliRunner().invoke(main, ["render", _write(tmp_path), "--name", "other", "-n", "ml"])
    assert result.exit_code == 0, result.output
    assert "kind: Job" in result.output and "namespace: ml" in result.output
    assert "kubetune.io/run: other" in result.output
