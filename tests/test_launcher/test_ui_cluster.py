"""The page's cluster side over real HTTP, against the in-process fake Kubernetes API server
(tests/k8s_fake.py: real HTTP/JSON to the real `kubernetes` client): Start Training on the
cluster is `launcher submit` (idempotent), the runs list shows the Job, Cancel deletes it."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from k8s_fake import FakeKube
from kube_configs import TEST_ACCESS_KEY, TEST_SECRET_KEY, config_dict
from kubernetes import client, config
from test_ui_server import csrf_of, request

from kubetune.config import parse_config
from launcher.backends.local import LocalBackend
from launcher.ui.security import UiSettings
from launcher.ui.server import create_app, serve_in_thread


def _secret(kubeconfig: Path) -> None:
    """The s3-credentials Secret the runs name, in the default namespace."""
    core = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
    secret = {"AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY}
    core.create_namespaced_secret("default", {
        "metadata": {"name": "s3-credentials"},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in secret.items()},
    })  # fmt: skip


@pytest.mark.slow
def test_the_page_submits_lists_and_cancels_cluster_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeKube() as fake:
        kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.setenv("KUBETUNE_HOME", str(tmp_path / "home"))
        _secret(kubeconfig)
        with serve_in_thread(create_app(UiSettings(port=0, roots=[tmp_path]))) as url:
            _, page, _ = request(url + "/")
            post = {"X-Kubetune-CSRF": csrf_of(page), "Content-Type": "application/json"}
            body = {"values": config_dict("SD_LORA", name="ui-cluster"), "target": "cluster"}
            status, text, _ = request(url + "/api/submit", body, post)
            submitted = json.loads(text)["submitted"][0]
            assert status == 200 and submitted["backend"] == "kubernetes" and submitted["created"]
            _, text, _ = request(url + "/api/submit", body, post)
            assert json.loads(text)["submitted"][0]["created"] is False
            _, text, _ = request(url + "/api/runs")
            rows = json.loads(text)["runs"]
            row = next(r for r in rows if r["run"] == "ui-cluster")
            assert row["backend"] == "kubernetes" and row["phase"] in ("Pending", "Running")
            assert TEST_SECRET_KEY not in text and TEST_ACCESS_KEY not in text
            status, text, _ = request(url + "/api/runs/kubernetes/ui-cluster/cancel", {}, post)
            assert status == 200
            assert json.loads(text)["phase"] in ("Cancelling", "Cancelled")
        assert [j for (kind, _, _), j in fake.objects.items() if kind == "jobs"] == []


def test_resume_replaces_a_failed_cluster_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_env: Any, s3_bucket: str
) -> None:
    """Resume on a failed cluster run's page: its config, read back from the Job's ConfigMap,
    submitted again (as `launcher submit` of it) replaces the failed Job with a new one under
    the same name, which resumes from the newest checkpoint."""
    from launcher.backends.kubernetes import KubernetesBackend
    from launcher.ui.runs import Runs
    from launcher.ui.submit import resume_run

    with FakeKube() as fake:
        kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        _secret(kubeconfig)
        data = config_dict("SD_LORA", name="ui-failed", backoff_limit=0)
        data["storage"].update(endpoint_url=s3_env.endpoint, bucket=s3_bucket)
        name = KubernetesBackend().submit(parse_config(json.dumps(data))).job_name
        fake.finish_pod(fake.latest_pod(name), 137, reason="OOMKilled")
        runs = Runs(local=LocalBackend(tmp_path / "home"))
        record = resume_run(runs, "kubernetes", "ui-failed")
        assert record["created"] and record["job_name"] == name
        assert ("jobs", name, "Foreground") in fake.deletions
        assert runs.backend("kubernetes").status("ui-failed").phase == "Pending"
