"""A real ``python -m runner`` run against SeaweedFS through the fault proxy, with a concurrent
reader, then a scan of everything for the test credentials.

Faults (bounded counts): 500, 503 SlowDown, connection resets, cut request and response
bodies, latency spikes, and the store down for a while (30 s under -m reliability, 3 s in the
fast subset). The run finishes, or fails with one clear error line; the reader (straight to
SeaweedFS) never sees a checkpoint whose manifest exists but whose data does not verify, and
the newest complete checkpoint never disappears. Then: the run's log, every object it wrote,
every rendered manifest and the launcher's outputs hold no test credential.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from faultproxy import FaultProxy
from kube_configs import TEST_ACCESS_KEY, TEST_HF_TOKEN, TEST_SECRET_KEY, VARIANTS
from relsupport import figure
from runs import RunnerProc
from s3server import S3Server
from train_support import make_config, write_dataset

from kubetune.checkpoint.publish import CheckpointManager
from kubetune.config import config_to_yaml
from kubetune.errors import StorageError
from kubetune.storage import open_store

FAULTS = (("500", 3), ("503", 3), ("reset", 2), ("cut_request", 2), ("cut_response", 2),
          ("latency", 6))  # fmt: skip


class Reader(threading.Thread):
    """Polls the run's checkpoints directly on SeaweedFS and verifies every complete one."""

    def __init__(self, uri: str, scratch: Path) -> None:
        super().__init__(daemon=True)
        self.manager = CheckpointManager(open_store(uri), None)
        self.scratch, self.stop = scratch, threading.Event()
        self.partial, self.verified, self.newest_lost, self.polls = 0, 0, 0, 0
        self.newest = -1

    def run(self) -> None:
        deadline = time.monotonic() + 900
        while not self.stop.is_set() and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.05)

    def poll(self) -> None:
        self.polls += 1
        try:
            complete = self.manager.list_complete()
        except StorageError:
            return
        if complete and complete[-1] < self.newest:
            self.newest_lost += 1
        self.newest = max(self.newest, complete[-1] if complete else -1)
        for step in complete[-1:]:
            target = self.scratch / f"{self.polls}-{step}"
            try:
                self.manager.restore(step, target)
                self.verified += 1
            except FileNotFoundError:
                pass  # pruned while we read it: it was complete, then it was gone
            except StorageError as exc:
                if "corrupt" in str(exc) or "missing although" in str(exc):
                    self.partial += 1


Outcome = tuple[int, RunnerProc, str, Reader, FaultProxy]


def _run_with_faults(
    down_s: float, s3_server: S3Server, bucket: str, model: Path, tmp_path: Path
) -> Outcome:
    data = write_dataset(tmp_path / "data", n=4)
    prefix = f"faults-{uuid.uuid4().hex[:8]}"
    with FaultProxy(s3_server.endpoint, timeout_s=20) as proxy:
        storage = {"endpoint_url": proxy.endpoint, "bucket": bucket, "prefix": prefix,
                   "credentials_secret": {"name": "s3-credentials"}}  # fmt: skip
        cfg = make_config("SD_LORA", model, data, tmp_path / "out" / "faulty", storage=storage,
                          max_train_steps=8, save_every_n_steps=2, max_checkpoints=2)  # fmt: skip
        config = tmp_path / "faulty.yaml"
        config.write_text(config_to_yaml(cfg))
        uri = f"s3://{bucket}/{prefix}/faulty"
        reader = Reader(uri, tmp_path / "reader")
        for fault, count in FAULTS:
            proxy.inject(fault, count, delay_s=1.0, ttl_s=600)
        env = {**s3_server.env(), "KUBETUNE_WORK_DIR": str(tmp_path / "work")}
        env["AWS_ENDPOINT_URL"] = proxy.endpoint
        reader.start()
        proc = RunnerProc(config, env).start()
        if proc.wait_for_step(3, timeout=600):
            proxy.down_for(down_s)
        code = proc.wait(timeout=900)
    reader.stop.set()
    reader.join(timeout=60)
    reader.poll()
    return code, proc, uri, reader, proxy


def _faults(down_s: float, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    server: S3Server = request.getfixturevalue("s3_env")  # AWS_* for the reader and scan
    bucket = request.getfixturevalue("s3_shared_bucket")
    model = request.getfixturevalue("tiny_sd_dir")
    code, proc, uri, reader, proxy = _run_with_faults(down_s, server, bucket, model, tmp_path)
    log = proc.log
    assert "Traceback" not in log, log[-4000:]
    errors = [line for line in log.splitlines() if line.startswith("kubetune: error:")]
    assert code == 0 or (code in (1, 2) and len(errors) == 1), (code, log[-4000:])
    if down_s <= 3:  # shorter than one retry window (RunStore: 5 attempts, 7.5 s of backoff)
        assert code == 0, (
            f"a {down_s:.0f}s outage and single faults must not fail the run: {errors}"
        )
    assert reader.partial == 0 and reader.newest_lost == 0
    final = CheckpointManager(open_store(uri), 2)
    if code == 0:
        assert final.list_complete() == [6, 8]
    kinds = sorted({f for f, _, _ in proxy.injected})
    outcome = "finished" if code == 0 else f"failed cleanly ({errors[0][:80]})"
    figure(
        f"storage faults (down {down_s:.0f}s)",
        f"{len(proxy.injected)} faults injected ({', '.join(kinds)}) + store down "
        f"{down_s:.0f}s: run {outcome}; {reader.polls} reader polls, {reader.verified} "
        f"checkpoints verified, {reader.partial} partial seen, newest complete pruned "
        f"{reader.newest_lost} times",
    )
    scan_for_secrets(server, uri, log, tmp_path)


def scan_for_secrets(server: S3Server, uri: str, log: str, tmp_path: Path) -> None:
    """0 hits of any test credential in the run's log, its objects, the rendered manifests
    and the launcher's render / validate / submit --help outputs."""
    secrets = [server.secret_key, TEST_SECRET_KEY, TEST_HF_TOKEN, TEST_ACCESS_KEY]
    corpus: dict[str, bytes] = {"runner log": log.encode()}
    store = open_store(uri)
    for obj in store.list(""):
        corpus[f"object {obj.key}"] = store.get_bytes(obj.key)
    from kubetune.config import parse_config
    from launcher.cli.main import main
    from launcher.manifests import build_manifests, to_yaml

    cli = CliRunner()
    for name, data in VARIANTS.items():
        corpus[f"manifest {name}"] = to_yaml(build_manifests(parse_config(
            yaml.safe_dump(data)))).encode()  # fmt: skip
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        for args in (["render", str(path)], ["validate", str(path)],
                     ["validate", "--format", "json", str(path)]):  # fmt: skip
            result = cli.invoke(main, args, env={"AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
                                                 "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
                                                 "HF_TOKEN": TEST_HF_TOKEN})  # fmt: skip
            corpus[f"launcher {' '.join(args[:-1])} {name}"] = result.output.encode()
    hits = [(where, s) for where, blob in corpus.items() for s in secrets
            if re.search(re.escape(s.encode()), blob)]  # fmt: skip
    assert hits == [], hits
    figure(
        "secrets",
        f"{len(corpus)} logs/objects/manifests/CLI outputs scanned for "
        f"{len(secrets)} test credentials: {len(hits)} hits",
    )


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_storage_faults_fast(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    _faults(3.0, request, tmp_path)


@pytest.mark.reliability
@pytest.mark.timeout(1800)
def test_storage_faults_store_down_30s(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    _faults(30.0, request, tmp_path)
