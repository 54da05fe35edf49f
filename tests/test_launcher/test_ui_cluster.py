"""The page's cluster side over real HTTP, against the in-process fake Kubernetes API server
(tests/k8s_fake.py: real HTTP/JSON to the real `kubernetes` client): Start Training on the
cluster is `launcher submit` (idempotent), the runs list shows the Job, Cancel deletes it."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from k8s_fake import FakeKube
from kube_configs import TEST_ACCESS_KEY, TEST_SECRET_KEY, config_dict
from kubernetes import client, config
from test_ui_server import csrf_of, request

from launcher.ui.security import UiSettings
from launcher.ui.server import create_app, serve_in_thread


@pytest.mark.slow
def test_the_page_submits_lists_and_cancels_cluster_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeKube() as fake:
        kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.setenv("KUBETUNE_HOME", str(tmp_path / "home"))
        core = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
        secret = {"AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY}
        core.create_namespaced_secret("default", {
            "metadata": {"name": "s3-credentials"},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in secret.items()},
        })  # fmt: skip
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
