"""`launcher submit` of a config whose Job already exists, as the local backend treats a run
of the same config: a Job that ended Failed is replaced by a new one whose pod resumes from
the newest checkpoint (outputs kept); a running or finished one is left alone.

Against the in-process fake API server (tests/k8s_fake.py: real HTTP/JSON to the real
`kubernetes` client), since pods must fail on cue; the outputs live on a real SeaweedFS.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from kube_configs import config_dict
from test_kubernetes_backend import Kube, _cfg, _write, eventually, fake_kube  # noqa: F401 - the fixture

from kubetune.config import PipelineConfig, load_config, parse_config
from kubetune.storage import open_store
from launcher.manifests import job_name


def _failed(kube: Kube, cfg: PipelineConfig) -> str:
    """Submit `cfg` (backoffLimit 0) and fail its one pod: OOMKilled past the backoff limit.
    The Job's uid."""
    assert kube.fake is not None
    job = kube.backend().submit(cfg).job_name
    pod = kube.fake.latest_pod(job)
    kube.fake.start_pod(pod)
    kube.fake.finish_pod(pod, 137, reason="OOMKilled")
    failed = kube.batch.read_namespaced_job(job, kube.namespace)
    assert [c.type for c in failed.status.conditions] == ["Failed"]
    return failed.metadata.uid


def _on_s3(s3_env: Any, bucket: str) -> PipelineConfig:
    data = config_dict("SD_LORA", name="my-run", backoff_limit=0)
    data["storage"].update(endpoint_url=s3_env.endpoint, bucket=bucket)
    return parse_config(json.dumps(data))


def test_a_failed_job_is_replaced_and_resumes_with_its_outputs(
    fake_kube: Kube,  # noqa: F811
    s3_env: Any,
    s3_bucket: str,
) -> None:
    """The failed Job is deleted with foreground propagation (its pods and ConfigMap go with
    it) and created again under the same name; the run's outputs stay where the new pod
    resumes from them, and the note says where the last Job stopped."""
    fake, backend, cfg = fake_kube.fake, fake_kube.backend(), _on_s3(s3_env, s3_bucket)
    assert fake is not None
    store = open_store(f"s3://{s3_bucket}/kubetune/my-run", cfg.storage)
    old_uid = _failed(fake_kube, cfg)
    progress = {"state": "failed", "step": 40, "total_steps": 100, "loss": 0.125}
    store.put_bytes("progress.json", json.dumps(progress).encode())
    store.put_bytes("checkpoints/step-000040/manifest.json", b"{}")
    name = job_name(cfg)
    old_pods = [p["metadata"]["name"] for p in fake.pods(name)]

    again = backend.submit(_on_s3(s3_env, s3_bucket))

    assert again.created and again.resumed_after == "Failed" and again.job_name == name
    assert again.note is not None and again.note.startswith("resuming (a new Job")
    assert "BackoffLimitExceeded" in again.note and "at step 40/100, loss 0.125" in again.note
    assert again.note.endswith("training continues from the newest checkpoint")
    assert ("jobs", name, "Foreground") in fake.deletions
    job = fake_kube.batch.read_namespaced_job(name, fake_kube.namespace)
    assert job.metadata.uid != old_uid and not job.status.conditions
    (cm,) = fake_kube.config_maps("my-run")
    assert [o.uid for o in cm.metadata.owner_references] == [job.metadata.uid]
    status = backend.status("my-run")
    assert status.phase == "Pending" and status.retries == 0
    assert not set(status.pods) & set(old_pods) and len(status.pods) == 1
    assert store.get_bytes("checkpoints/step-000040/manifest.json") == b"{}"  # outputs kept


def test_a_running_job_is_returned_and_a_finished_one_says_so(fake_kube: Kube) -> None:  # noqa: F811
    fake, backend = fake_kube.fake, fake_kube.backend()
    assert fake is not None
    name = backend.submit(_cfg()).job_name
    uid = fake_kube.batch.read_namespaced_job(name, fake_kube.namespace).metadata.uid
    pod = fake.latest_pod(name)
    fake.start_pod(pod)
    running = backend.submit(_cfg())
    assert not running.created and running.note is None and running.resumed_after is None
    fake.finish_pod(pod, 0)
    finished = backend.submit(_cfg())
    assert not finished.created and finished.resumed_after is None
    assert finished.note is not None and finished.note.startswith("already finished")
    assert fake.deletions == []
    job = fake_kube.batch.read_namespaced_job(name, fake_kube.namespace)
    assert job.metadata.uid == uid and [p["metadata"]["name"] for p in fake.pods(name)] == [pod]


def test_a_failed_job_of_another_config_still_needs_replace(fake_kube: Kube) -> None:  # noqa: F811
    """Resuming is for the same config; another one under the run's name is the same
    error as before, whatever the old Job's phase."""
    from kubetune.errors import UserError

    _failed(fake_kube, _cfg(backoff_limit=0))
    with pytest.raises(UserError, match=r"different config.*--replace"):
        fake_kube.backend().submit(_cfg(backoff_limit=0, cpu="8"))


def test_cli_submit_again_resumes_a_failed_run_and_waits_for_it(
    fake_kube: Kube,  # noqa: F811
    tmp_path: Path,
) -> None:
    """`launcher submit --wait` of the same config after the Job failed: one line saying it
    resumes, then it follows the new Job to its end (exit 0)."""
    fake = fake_kube.fake
    assert fake is not None
    config_file = _write(tmp_path, backoff_limit=0)
    name = job_name(load_config(config_file))
    assert fake_kube.cli("submit", config_file).exit_code == 0
    first = fake.latest_pod(name)
    fake.finish_pod(first, 137, reason="OOMKilled")

    def finish_the_new_pod() -> None:
        assert eventually(lambda: fake.pods(name) and fake.latest_pod(name) != first, 10)
        pod = fake.latest_pod(name)
        fake.start_pod(pod)
        fake.log(pod, "resumed from checkpoint step-000040")
        fake.finish_pod(pod, 0)

    driver = threading.Thread(target=finish_the_new_pod, daemon=True)
    driver.start()
    result = fake_kube.cli("submit", config_file, "--wait", "--poll-interval", "0.05")
    driver.join(10)
    assert result.exit_code == 0, result.output
    # (a warning may come first: this launcher cannot reach the config's storage endpoint,
    # so the failed pod's logs were saved in a local folder instead)
    first_line = next(x for x in result.output.splitlines() if not x.startswith("warning:"))
    assert first_line.startswith("my-run: resuming (a new Job; the last one ended Failed")
    assert first_line.endswith(f"(kubernetes job {name} in namespace default)")
    assert "my-run: Succeeded" in result.output
