"""End to end on a real cluster (`pytest -m cluster`, see tests/cluster_env.py): the image
built from our Dockerfile trains on a real kubelet, driven by the real `launcher` CLI, with
outputs on a SeaweedFS started by the test on 127.0.0.1 (the pod reaches it through
`job.pod_patch: {hostNetwork: true}`, so test traffic stays on loopback) and credentials from
a real Secret.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_env import Cluster, wait_until
from s3server import S3Server
from train_support import sample_latents

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).parents[2]
EVERY = 5
# The test preempts the pod once `status` shows it training: the run must still be going
# then, however idle the machine. At 64 px and 20 steps an idle node finished the whole run
# between two `status` polls (ciA, 2026-12-02); 256 px and 40 steps leave more margin and
# still finish in minutes on a loaded node.
STEPS = 40
RESOLUTION = 256


def _upload_dataset(s3: S3Server, bucket: str) -> None:
    for path in sorted((ROOT / "examples" / "sample_data").iterdir()):
        s3.client().upload_file(str(path), bucket, f"data/{path.name}")


def _config(s3: S3Server, bucket: str, name: str, steps: int, namespace: str, image: str) -> dict:
    return {
        "type": "SD_LORA",
        "seed": 7,
        "base_output_dir": f"runs/{name}",
        "model": "builtin:tiny-sd",
        "hf_variant": None,
        "weight_dtype": "float32",
        "mixed_precision": "no",
        "data_loader": {
            "type": "IMAGE_CAPTION_SD_DATA_LOADER",
            "dataset": {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": f"s3://{bucket}/data"},
            "resolution": RESOLUTION,
        },
        "lora_rank_dim": 4,
        "lora_checkpoint_format": "kohya",
        "train_batch_size": 2,
        "max_train_steps": steps,
        "save_every_n_steps": EVERY,
        "max_checkpoints": 2,
        "log_every_n_steps": 1,
        "storage": {
            "endpoint_url": s3.endpoint,
            "bucket": bucket,
            "region": s3.region,
            "credentials_secret": {"name": "s3-credentials"},
        },
        "job": {
            "name": name,
            "namespace": namespace,
            "image": image,
            "image_pull_policy": "Never",
            "gpus": 0,
            "cpu": "1500m",  # CPU shares: the node's 2 cores are shared with the test
            "memory": "4Gi",
            "termination_grace_period_seconds": 60,
            "pod_patch": {"hostNetwork": True},
        },
    }


@pytest.fixture
def run_env(cluster: Cluster, namespace: str, s3_env: S3Server, tmp_path: Path) -> dict[str, Any]:
    """A bucket with the sample dataset and the credentials Secret in the namespace; the
    launcher (like a user's) reads progress with AWS_* credentials of its own."""
    s3_server = s3_env
    bucket = s3_server.create_bucket("e2e")
    _upload_dataset(s3_server, bucket)
    data = {
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
    }
    cluster.core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "s3-credentials"},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        },
    )
    return {"bucket": bucket, "s3": s3_server, "namespace": namespace, "tmp": tmp_path}


def _write(env: dict[str, Any], cluster: Cluster, name: str, steps: int) -> str:
    path = env["tmp"] / f"{name}.yaml"
    cfg = _config(env["s3"], env["bucket"], name, steps, env["namespace"], cluster.image)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _status(cluster: Cluster, ns: str, run: str) -> dict[str, Any]:
    result = cluster.launcher("status", run, "-n", ns, "--format", "json", timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _job_exists(cluster: Cluster, ns: str, run: str) -> bool:
    return bool(
        cluster.batch.list_namespaced_job(ns, label_selector=f"kubetune.io/run={run}").items
    )


def _running_pod(cluster: Cluster, ns: str, run: str) -> Any:
    pods = cluster.core.list_namespaced_pod(ns, label_selector=f"kubetune.io/run={run}").items
    running = [p for p in pods if p.status.phase == "Running"]
    return running[-1] if running else None


def _keys(env: dict[str, Any], prefix: str) -> list[str]:
    client = env["s3"].client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=env["bucket"], Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_submit_wait_trains_survives_preemption_and_the_lora_loads(
    cluster: Cluster, run_env: dict[str, Any], tiny_sd_dir: Path, tmp_path: Path
) -> None:
    ns, run = run_env["namespace"], "e2e-lora"
    config = _write(run_env, cluster, run, steps=STEPS)
    submit = cluster.launcher_bg(
        "submit", "--wait", "--format", "json", config, out=tmp_path / "s.out"
    )
    follow = None
    try:
        # `status` shows step and loss while it runs, from progress.json in storage.
        # Preempt at the first logged step: SIGTERM itself writes the checkpoint the next
        # pod resumes from, so the test need not catch a periodic one (an idle node ran all
        # the steps between two polls when it waited for one).
        def training() -> dict[str, Any] | None:
            status = _status(cluster, ns, run) if _job_exists(cluster, ns, run) else {}
            progress = status.get("progress") or {}
            ok = status.get("phase") == "Running" and (progress.get("step") or 0) >= 1
            return status if ok and progress.get("loss") is not None else None

        status = wait_until(training, 600, "a Running pod that reports step and loss")
        assert status["progress"]["step"] < STEPS, "the run ended before it was preempted"
        follow = cluster.launcher_bg("logs", "-f", run, "-n", ns, out=tmp_path / "logs.out")
        pod = _running_pod(cluster, ns, run)
        _check_pod_security(cluster, pod)
        # Preemption: the pod is deleted; SIGTERM -> checkpoint -> exit 143 -> the Job's next
        # pod resumes from the newest checkpoint.
        cluster.core.delete_namespaced_pod(pod.metadata.name, ns)
        assert submit.wait(timeout=900) == 0, (tmp_path / "s.out.err").read_text()[-3000:]
        assert follow.wait(timeout=120) == 0, (tmp_path / "logs.out.err").read_text()[-3000:]
    finally:
        for proc in (submit, follow):
            if proc is not None and proc.poll() is None:
                proc.kill()
    final = json.loads((tmp_path / "s.out").read_text())["status"]
    assert final["phase"] == "Succeeded" and final["progress"]["step"] == STEPS
    # another pod finished the run (the deleted one may still be listed, Terminating: on an
    # idle node the new pod finished before the API server dropped the old one)
    assert set(final["pods"]) - {pod.metadata.name}, final["pods"]
    logs = (tmp_path / "logs.out").read_text()
    assert "==> pod" in logs and "resumed from checkpoint step-" in logs, logs[-3000:]
    resumed = int(logs.split("resumed from checkpoint step-")[1][:6])
    # the SIGTERM checkpoint, at or after the newest one published before the preemption
    assert status["progress"]["step"] <= resumed < STEPS
    prefix = f"kubetune/{run}/"
    keys = _keys(run_env, prefix)
    manifests = [
        k for k in keys if k.startswith(f"{prefix}checkpoints/") and k.endswith("manifest.json")
    ]
    assert manifests == [
        f"{prefix}checkpoints/step-{STEPS - EVERY:06d}/manifest.json",
        f"{prefix}checkpoints/step-{STEPS:06d}/manifest.json",
    ]
    assert f"{prefix}final/lora.safetensors" in keys
    _check_lora_loads(run_env, f"{prefix}final/lora.safetensors", tiny_sd_dir, tmp_path)
    listed = cluster.launcher("list", "-n", ns)
    assert run in listed.stdout and "Succeeded" in listed.stdout


def _check_pod_security(cluster: Cluster, pod: Any) -> None:
    """The pod runs as UID 1000 with a read-only root filesystem, as rendered."""
    container = pod.spec.containers[0]
    assert pod.spec.security_context.run_as_user == 1000
    assert container.security_context.read_only_root_filesystem is True
    assert pod.spec.host_network is True
    docker_host = os.environ.get("KUBETUNE_DOCKER_HOST")
    if docker_host:  # what the container runtime was really told
        cid = pod.status.container_statuses[0].container_id.split("://")[-1]
        out = subprocess.run(
            ["docker", "-H", docker_host, "inspect", cid],
            capture_output=True,
            text=True,
            check=True,
        )
        (info,) = json.loads(out.stdout)
        assert info["Config"]["User"].split(":")[0] == "1000"
        assert info["HostConfig"]["ReadonlyRootfs"] is True
        assert info["HostConfig"]["CapDrop"] and "ALL" in info["HostConfig"]["CapDrop"]


def _check_lora_loads(env: dict[str, Any], key: str, model: Path, tmp_path: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    local = tmp_path / "final"
    local.mkdir()
    env["s3"].client().download_file(env["bucket"], key, str(local / "lora.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    before = sample_latents(pipe, "kbtn")
    pipe.load_lora_weights(local, weight_name="lora.safetensors")
    assert not torch.allclose(before, sample_latents(pipe, "kbtn")), (
        "the LoRA did not change the output"
    )


def test_cancel_removes_job_and_config_map_and_keeps_outputs(
    cluster: Cluster, run_env: dict[str, Any]
) -> None:
    ns, run = run_env["namespace"], "e2e-cancel"
    config = _write(run_env, cluster, run, steps=100000)
    submitted = cluster.launcher("submit", config)
    assert submitted.returncode == 0, submitted.stderr
    assert "ignores Job spec.podFailurePolicy" in submitted.stderr or cluster.version >= (1, 26)

    def checkpointed() -> bool:
        progress = _status(cluster, ns, run).get("progress") or {}
        return (progress.get("last_checkpoint_step") or 0) >= EVERY

    wait_until(checkpointed, 300, "the first checkpoint")
    listed = cluster.launcher("list", "-n", ns)
    assert run in listed.stdout and "Running" in listed.stdout
    cancelled = cluster.launcher("cancel", run, "-n", ns, "--wait", "--timeout", "180")
    assert cancelled.returncode == 0, cancelled.stderr
    assert "Cancelled" in cancelled.stdout
    selector = f"kubetune.io/run={run}"
    assert not cluster.batch.list_namespaced_job(ns, label_selector=selector).items
    assert not cluster.core.list_namespaced_config_map(ns, label_selector=selector).items
    keys = _keys(run_env, f"kubetune/{run}/")
    assert f"kubetune/{run}/progress.json" in keys
    assert any(k.endswith("manifest.json") for k in keys)
    gone = cluster.launcher("status", run, "-n", ns)
    assert gone.returncode == 2 and "no kubetune run" in gone.stderr


def test_a_failed_job_submitted_again_resumes_from_its_newest_checkpoint(
    cluster: Cluster, run_env: dict[str, Any], tmp_path: Path
) -> None:
    """A Job that ended Failed, then `launcher submit` of the same config: the failed Job is
    replaced by a new one whose pod resumes from the newest checkpoint and finishes the run.
    The Job is failed by lowering its activeDeadlineSeconds once it trains (the
    Job controller fails it with DeadlineExceeded on every version and stops its pod, which
    writes a SIGTERM checkpoint first); the new Job gets the config's own deadline."""
    ns, run = run_env["namespace"], "e2e-resubmit"
    path = tmp_path / f"{run}.yaml"
    cfg = _config(run_env["s3"], run_env["bucket"], run, STEPS, ns, cluster.image)
    path.write_text(yaml.safe_dump(cfg))
    assert cluster.launcher("submit", str(path)).returncode == 0

    def training() -> dict[str, Any] | None:
        # Fail it at the first step `status` shows (as the preemption test preempts): the
        # deadline stops the pod with SIGTERM, which checkpoints. Waiting for a scheduled
        # checkpoint in progress.json (uploaded every 30 s) let an idle node finish all
        # 40 steps first (fresh-clone CI, 2026-12-03 16:22).
        status = _status(cluster, ns, run)
        progress = status.get("progress") or {}
        running = status.get("phase") == "Running" and (progress.get("step") or 0) >= 1
        return status if running else None

    before = wait_until(training, 600, "a Running pod that reports a step")["progress"]
    assert before["step"] < STEPS, "the run ended before it could fail"
    (job,) = cluster.batch.list_namespaced_job(ns, label_selector=f"kubetune.io/run={run}").items
    cluster.batch.patch_namespaced_job(
        job.metadata.name, ns, {"spec": {"activeDeadlineSeconds": 1}}
    )
    failed = wait_until(
        lambda: (s := _status(cluster, ns, run))["phase"] == "Failed" and s, 120, "Failed"
    )
    assert failed["reason"] == "DeadlineExceeded"

    again = cluster.launcher("submit", "--wait", "--format", "json", str(path), timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    doc = json.loads(again.stdout)
    assert doc["submit"]["created"] and doc["submit"]["resumed_after"] == "Failed"
    assert doc["submit"]["note"].startswith("resuming (a new Job; the last one ended Failed")
    assert doc["status"]["phase"] == "Succeeded" and doc["status"]["progress"]["step"] == STEPS
    (new,) = cluster.batch.list_namespaced_job(ns, label_selector=f"kubetune.io/run={run}").items
    assert new.metadata.name == job.metadata.name and new.metadata.uid != job.metadata.uid
    logs = cluster.launcher("logs", run, "-n", ns).stdout
    assert "resumed from checkpoint step-" in logs, logs[-3000:]
    resumed = int(logs.split("resumed from checkpoint step-")[1][:6])
    assert (before.get("last_checkpoint_step") or 0) <= resumed < STEPS
    keys = _keys(run_env, f"kubetune/{run}/")
    assert f"kubetune/{run}/final/lora.safetensors" in keys


def test_replace_starts_a_succeeded_job_over_and_keeps_its_pod_logs(
    cluster: Cluster, run_env: dict[str, Any], tmp_path: Path
) -> None:
    """`submit --replace` of a Job that Succeeded, as `--local` means it: the Job is replaced
    by one whose pod starts over from step 0 (it discards the checkpoints the first one left,
    and records the start-over in storage); the first Job's pod log tail is saved to the run's
    storage before the Job is deleted, and `launcher logs` prints it before the new pod's.
    Each step waits for its end with `submit --wait` (bounded by the call's timeout): nothing
    races the run."""
    ns, run, bucket = run_env["namespace"], "e2e-replace", run_env["bucket"]
    cfg = _config(run_env["s3"], bucket, run, 2, ns, cluster.image)
    cfg["save_every_n_steps"] = 1  # checkpoints that the start-over must discard
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {"KUBETUNE_HOME": str(tmp_path / "home")}
    first = cluster.launcher("submit", "--wait", "--format", "json", str(path), timeout=900,
                             env=env)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    (old_pod,) = json.loads(first.stdout)["status"]["pods"]
    kept = cluster.launcher("submit", str(path), env=env)
    assert kept.returncode == 0 and "already finished (same config)" in kept.stdout, kept.stdout

    again = cluster.launcher("submit", "--replace", "--wait", "--format", "json", str(path),
                             timeout=900, env=env)  # fmt: skip

    assert again.returncode == 0, again.stderr[-3000:]
    doc = json.loads(again.stdout)
    note = doc["submit"]["note"]
    assert doc["submit"]["created"] and note.startswith("starting over from step 0"), note
    assert doc["submit"]["saved_logs"].startswith(f"s3://{bucket}/kubetune/{run}/pod-logs/")
    assert doc["status"]["phase"] == "Succeeded" and doc["status"]["progress"]["step"] == 2
    logs = cluster.launcher("logs", run, "-n", ns, env=env)
    assert logs.returncode == 0, logs.stderr[-3000:]
    saved, _, current = logs.stdout.partition("(the current Job) <==")
    assert f"==> pod {old_pod} [trainer] (Succeeded, exit 0 Completed; saved " in saved
    assert "training finished at step 2" in saved, saved[-3000:]
    assert "starting over: discarding the run's existing checkpoints (launcher submit" in current
    assert "resumed from checkpoint" not in current and "training finished at step 2" in current
    keys = _keys(run_env, f"kubetune/{run}/")
    assert f"kubetune/{run}/start-over.json" in keys
    assert any(k.startswith(f"kubetune/{run}/pod-logs/") for k in keys)


def test_a_failed_jobs_pod_log_is_saved_before_a_resubmit_deletes_it(
    cluster: Cluster, run_env: dict[str, Any], tmp_path: Path
) -> None:
    """A Job that failed on a data error (backoffLimit 0), submitted again: before its
    Job (and with it the pod and its log) is deleted, the pod's log tail goes to the run's
    storage, and `launcher logs` prints it, error line included, ahead of the new Job's pod.
    The assertions read only the saved part: the new pod may be anywhere in its life then."""
    ns, run, bucket = run_env["namespace"], "e2e-failed-logs", run_env["bucket"]
    cfg = _config(run_env["s3"], bucket, run, 2, ns, cluster.image)
    cfg["data_loader"]["dataset"]["dataset_dir"] = f"s3://{bucket}/no-such-data"
    cfg["job"]["backoff_limit"] = 0
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {"KUBETUNE_HOME": str(tmp_path / "home")}
    failed = cluster.launcher("submit", "--wait", "--format", "json", str(path), timeout=600,
                              env=env)  # fmt: skip
    assert failed.returncode in (1, 2), failed.stderr[-3000:]
    status = json.loads(failed.stdout)["status"]
    assert status["phase"] == "Failed", status
    (old_pod,) = status["pods"]

    again = cluster.launcher("submit", "--format", "json", str(path), env=env)

    assert again.returncode == 0, again.stderr[-3000:]
    doc = json.loads(again.stdout)["submit"]
    assert doc["resumed_after"] == "Failed", doc
    assert doc["saved_logs"].startswith(f"s3://{bucket}/kubetune/{run}/pod-logs/"), doc
    logs = cluster.launcher("logs", run, "-n", ns, env=env)
    assert logs.returncode == 0, logs.stderr[-3000:]
    saved = logs.stdout.partition("(the current Job) <==")[0]
    assert f"==> pod {old_pod} [trainer] (Failed, exit " in saved, saved[-3000:]
    assert "no-such-data" in saved, saved[-3000:]  # the runner's error names the dataset
