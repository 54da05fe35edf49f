"""`launcher submit --replace` of a cluster run of the same config, as `--local` means it: a
Succeeded workload is replaced by one whose first pod starts the run over from step 0 (a
start-over token in the trainer's env; a retried pod resumes, see
tests/test_runner/test_start_over.py), a live one is left alone with a note naming the fix.
And the pods' logs of a workload that submit deletes are saved first (tails, in the run's
storage, else a local folder), and `launcher logs` prints them after the workload is gone.

Every kind (a Job, an Indexed Job, a JobSet, a TrainJob) against the in-process fake API server
(tests/k8s_fake.py: pods must succeed and fail on cue, and a real cluster here is v1.20,
without Indexed Jobs, JobSet or Trainer); the outputs live on a real SeaweedFS.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from kube_configs import config_dict
from test_kubernetes_backend import Kube, fake_kube  # noqa: F401 - the fixture

from kubetune.config import PipelineConfig, load_config, parse_config
from kubetune.errors import UserError
from kubetune.layout import START_OVER_ENV
from kubetune.storage import open_store
from launcher.backends import k8s_saved_logs
from launcher.manifests import job_name

KINDS = {  # variant: (job.backend, nodes, plural)
    "job": ("job", 1, "jobs"),
    "indexed-job": ("job", 2, "jobs"),
    "jobset": ("jobset", 2, "jobsets"),
    "trainjob": ("trainjob", 2, "trainjobs"),
}


def _cfg(s3: Any, bucket: str, variant: str) -> PipelineConfig:
    backend, nodes, _ = KINDS[variant]
    data = config_dict("SD_LORA", name="my-run", backend=backend, nodes=nodes, backoff_limit=0)
    data["storage"].update(endpoint_url=s3.endpoint, bucket=bucket)
    return parse_config(json.dumps(data))


def _pods(kube: Kube, name: str, count: int, old: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """The workload's `count` newest pods that are not in `old` (bounded wait)."""
    assert kube.fake is not None
    deadline = time.monotonic() + 10
    while (
        len(new := [p for p in kube.fake.owned_pods(name) if p["metadata"]["name"] not in old])
        < count
    ):
        assert time.monotonic() < deadline, f"{name}: {len(new)} new pods, wanted {count}"
        time.sleep(0.02)
    return [p["metadata"]["name"] for p in new]


def _end(kube: Kube, pods: list[str], code: int, lines: int = 0) -> None:
    """Start the pods, give each `lines` log lines (`node K line N`), end them with `code`."""
    assert kube.fake is not None
    for node, pod in enumerate(pods):
        kube.fake.start_pod(pod)
        kube.fake.log(pod, *(f"node {node} line {n}" for n in range(lines)))
    for pod in pods:
        kube.fake.finish_pod(pod, code)


def _env(kube: Kube, pod: str) -> dict[str, str]:
    assert kube.fake is not None
    container = kube.fake.get("pods", "default", pod)["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


@pytest.mark.parametrize(
    "variant",
    [v if v != "indexed-job" else pytest.param(v, marks=pytest.mark.slow) for v in KINDS],
)
def test_replace_starts_a_succeeded_run_over_once(
    fake_kube: Kube,  # noqa: F811
    s3_env: Any,
    s3_bucket: str,
    variant: str,
) -> None:
    """Without --replace a Succeeded workload stays; with it, it is deleted (foreground) and
    created anew, every pod carrying one start-over token; a resubmit after that run fails
    resumes it (no token: the start-over is not repeated)."""
    fake, backend, (_, nodes, plural) = fake_kube.fake, fake_kube.backend(), KINDS[variant]
    assert fake is not None
    cfg = _cfg(s3_env, s3_bucket, variant)
    name = backend.submit(cfg).job_name
    first = _pods(fake_kube, name, nodes)
    assert all(START_OVER_ENV not in _env(fake_kube, p) for p in first)
    _end(fake_kube, first, 0, lines=3)
    old_uid = fake.get(plural, "default", name)["metadata"]["uid"]
    kept = backend.submit(cfg)
    assert not kept.created and kept.note is not None
    assert kept.note.startswith("already finished") and "--replace starts it over" in kept.note
    assert fake.deletions == []

    over = backend.submit(cfg, replace=True)

    assert over.created and over.resumed_after is None and over.job_name == name
    assert over.note is not None and over.note.startswith("starting over from step 0 (--replace")
    assert (plural, name, "Foreground") in fake.deletions
    assert fake.get(plural, "default", name)["metadata"]["uid"] != old_uid
    second = _pods(fake_kube, name, nodes, old=set(first))
    tokens = {_env(fake_kube, p).get(START_OVER_ENV) for p in second}
    assert len(tokens) == 1 and None not in tokens
    assert over.saved_logs is not None  # the finished pods' logs are kept too
    _end(fake_kube, second, 2)  # a config error fails every kind at once
    again = backend.submit(cfg, replace=True)  # Failed: resumed, whatever --replace says
    assert again.created and again.resumed_after == "Failed"
    third = _pods(fake_kube, name, nodes, old={*first, *second})
    assert all(START_OVER_ENV not in _env(fake_kube, p) for p in third)


def test_replace_starts_over_a_completed_run_whose_job_is_gone(
    fake_kube: Kube,  # noqa: F811
    s3_env: Any,
    s3_bucket: str,
) -> None:
    """ttl_seconds_after_finished deleted the Succeeded Job: --replace still starts the run
    over (its progress.json says completed), a plain submit resumes it (no token)."""
    fake, backend = fake_kube.fake, fake_kube.backend()
    assert fake is not None
    cfg = _cfg(s3_env, s3_bucket, "job")
    store = open_store(f"s3://{s3_bucket}/kubetune/my-run", cfg.storage)
    name = backend.submit(cfg).job_name
    _end(fake_kube, _pods(fake_kube, name, 1), 0)
    done = {"state": "completed", "step": 100, "total_steps": 100}
    store.put_bytes("progress.json", json.dumps(done).encode())
    fake.delete("jobs", "default", name, "Foreground")  # what the TTL controller does
    over = backend.submit(cfg, replace=True)
    assert over.created and over.note is not None
    assert over.note.startswith("starting over from step 0 (--replace: its workload is gone")
    (pod,) = _pods(fake_kube, name, 1)
    assert _env(fake_kube, pod).get(START_OVER_ENV)
    fake.delete("jobs", "default", name, "Foreground")
    plain = backend.submit(cfg)
    assert plain.created and plain.note is None
    assert START_OVER_ENV not in _env(fake_kube, _pods(fake_kube, name, 1)[0])


def test_replace_leaves_a_running_job_alone_and_names_the_fix(
    fake_kube: Kube,  # noqa: F811
    s3_env: Any,
    s3_bucket: str,
) -> None:
    fake, backend = fake_kube.fake, fake_kube.backend()
    assert fake is not None
    cfg = _cfg(s3_env, s3_bucket, "job")
    name = backend.submit(cfg).job_name
    fake.start_pod(_pods(fake_kube, name, 1)[0])
    result = backend.submit(cfg, replace=True)
    assert not result.created and result.note is not None
    assert result.note.startswith("already running (same config)")
    assert "`launcher cancel my-run`" in result.note
    assert fake.deletions == [] and result.saved_logs is None
    backend.cancel("my-run", wait=True, timeout=10)
    with pytest.raises(UserError, match=r"no kubetune run .*stay in its outputs' pod-logs/"):
        list(backend.logs("my-run"))  # nothing saved here: where the saved ones would be


@pytest.mark.parametrize("variant", ["job", "jobset"])
def test_a_failed_workloads_pod_logs_are_saved_and_logs_prints_them(
    fake_kube: Kube,  # noqa: F811
    s3_env: Any,
    s3_bucket: str,
    variant: str,
) -> None:
    """Before the failed workload is deleted, each pod's last TAIL_LINES lines go to
    `pod-logs/<time>/node-<K>.log` in the run's storage; `logs` prints them (its node's only)
    before the new workload's pod, `logs(latest=True)` only the new one's."""
    fake, backend, (_, nodes, _) = fake_kube.fake, fake_kube.backend(), KINDS[variant]
    assert fake is not None
    cfg = _cfg(s3_env, s3_bucket, variant)
    name = backend.submit(cfg).job_name
    first = _pods(fake_kube, name, nodes)
    total = k8s_saved_logs.TAIL_LINES + 50
    _end(fake_kube, first, 2, lines=total)

    again = backend.submit(cfg)

    root = f"s3://{s3_bucket}/kubetune/my-run"
    assert again.saved_logs is not None and again.saved_logs.startswith(f"{root}/pod-logs/")
    store = open_store(root, cfg.storage)
    keys = sorted(i.key for i in store.list("pod-logs/"))
    assert [k.rsplit("/", 1)[1] for k in keys] == [f"node-{k}.log" for k in range(nodes)]
    saved = store.get_bytes(keys[0]).decode().splitlines()
    assert saved[0].startswith(f"==> pod {first[0]} [") and "Failed, exit 2" in saved[0]
    assert saved[1:] == [f"node 0 line {n}" for n in range(50, total)]  # the tail only
    (new,) = _pods(fake_kube, name, nodes, old=set(first))[:1]
    fake.start_pod(new)
    fake.log(new, "resumed from checkpoint step-000040")
    lines = list(backend.logs("my-run"))
    assert lines[: len(saved)] == saved
    kind = {"job": "Job", "jobset": "JobSet"}[variant]
    assert lines[len(saved) :] == [
        f"==> pod {new} (the current {kind}) <==",
        "resumed from checkpoint step-000040",
    ]
    assert list(backend.logs("my-run", latest=True)) == ["resumed from checkpoint step-000040"]
    if nodes > 1:
        node1 = list(backend.logs("my-run", rank=1))
        assert f"node 1 line {total - 1}" in node1 and "node 0 line 60" not in node1


def test_unwritable_storage_keeps_the_logs_locally_for_logs_and_the_cli(
    fake_kube: Kube,  # noqa: F811
    s3_env: Any,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The launcher's storage credentials are refused (a real 403 from SeaweedFS): the logs
    go to $KUBETUNE_HOME/cluster-logs/<namespace>/<run>/ instead, submit says where (and why
    not in storage), and `launcher logs` prints them, also once the run's Job is gone."""
    fake = fake_kube.fake
    assert fake is not None
    monkeypatch.setenv("KUBETUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config_dict("SD_LORA", name="my-run", backoff_limit=0)))
    data = json.loads(path.read_text())
    data["storage"].update(endpoint_url=s3_env.endpoint, bucket=s3_bucket)
    path.write_text(json.dumps(data))
    assert fake_kube.cli("submit", str(path)).exit_code == 0
    (pod,) = _pods(fake_kube, job_name(load_config(str(path))), 1)
    _end(fake_kube, [pod], 137, lines=5)

    result = fake_kube.cli("submit", str(path))

    assert result.exit_code == 0, result.output
    folder = tmp_path / "home" / "cluster-logs" / "default" / "my-run" / "pod-logs"
    (saved,) = folder.glob("*/node-0.log")
    assert f"logs of the replaced pods: {saved.parent}/" in result.output
    assert "warning: the run's storage did not take the replaced Job's pod logs" in result.output
    assert saved.read_text().splitlines()[1:] == [f"node 0 line {n}" for n in range(5)]
    logs = fake_kube.cli("logs", "my-run")
    assert logs.exit_code == 0 and "node 0 line 4" in logs.output
    assert "saved logs of replaced workloads unreadable" in logs.output  # the 403, said once
    assert fake_kube.cli("cancel", "my-run", "--wait", "--timeout", "10").exit_code == 0
    gone = fake_kube.cli("logs", "my-run")
    assert gone.exit_code == 0 and f"==> pod {pod} [trainer]" in gone.output
    assert "node 0 line 4" in gone.output


def test_a_log_tail_keeps_its_end_within_the_byte_bound() -> None:
    long = b"x" * 1000 + b"\n"
    data = long * (k8s_saved_logs.TAIL_BYTES // len(long) + 10) + b"the last line\n"
    text = k8s_saved_logs.tail(data)
    assert text.startswith(k8s_saved_logs.CUT + "\n" + "x" * 1000 + "\n")
    assert text.endswith("the last line\n") and len(text) <= k8s_saved_logs.TAIL_BYTES + 200
    assert k8s_saved_logs.tail(b"short\n") == "short\n"
