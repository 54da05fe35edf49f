"""The same end-to-end run on each cloud emulator: the base model and the dataset read from the
cloud, checkpoints and the lease written there, a preempted run resumed from its cloud
checkpoint, `launcher pull` verifying the final weights (and a checkpoint) against their
manifest, and `launcher report` presigning the run's page. S3 runs on SeaweedFS, Azure on
Azurite, GCS on fake-gcs-server, its writes through the translating proxy of
tests/gcs_xml_proxy.py while the emulator refuses obstore's XML-API writes
(tests/gcs_emulator.py)."""

from __future__ import annotations

import json
import threading
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from train_support import make_config, train, write_dataset

from kubetune import layout
from kubetune.errors import Preempted
from kubetune.storage import open_store
from launcher.cli.main import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _cloud(request: pytest.FixtureRequest, name: str) -> tuple[str, dict[str, Any]]:
    """(root URI of a fresh prefix, the `storage:` section) on the cloud ``name``."""
    run = f"e2e-{uuid.uuid4().hex[:8]}"
    if name == "s3":
        server = request.getfixturevalue("s3_env")
        bucket = request.getfixturevalue("s3_shared_bucket")
        return f"s3://{bucket}/{run}", {"bucket": bucket, "prefix": run,
                                        "endpoint_url": server.endpoint}  # fmt: skip
    if name == "gs":
        gcs = request.getfixturevalue("gcs_writable")  # the emulator, or the proxy before it
        bucket = gcs.create_bucket()
        return f"gs://{bucket}/{run}", {"provider": "gcs", "bucket": bucket, "prefix": run,
                                        "endpoint_url": gcs.endpoint}  # fmt: skip
    azurite = request.getfixturevalue("az_env")
    container = request.getfixturevalue("az_container")
    storage = {"provider": "azure", "bucket": container, "prefix": run,
               "account_name": "devstoreaccount1", "endpoint_url": azurite.endpoint}  # fmt: skip
    return f"az://{container}/{run}", storage


def _upload(folder: Path, uri: str) -> None:
    """Every file under ``folder`` to ``uri``; those above 5 MiB (the tiny model's weights) in
    multipart uploads of 5 MiB parts."""
    store = open_store(uri, multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        store.put_file(path.relative_to(folder).as_posix(), path)


@pytest.mark.parametrize("cloud", ["s3", "gs", "az"])
def test_a_cloud_run_reads_checkpoints_resumes_and_pulls(
    cloud: str, request: pytest.FixtureRequest, tmp_path: Path, tiny_sd_dir: Path
) -> None:
    root, storage = _cloud(request, cloud)
    _upload(tiny_sd_dir, f"{root}/inputs/model")  # weights of 6 MiB: multipart
    _upload(write_dataset(tmp_path / "data", n=4), f"{root}/inputs/data")
    cfg = make_config(
        "SD_LORA", f"{root}/inputs/model", f"{root}/inputs/data", tmp_path / "unused" / "run",
        storage=storage, max_train_steps=4, save_every_n_steps=2,
    )  # type: ignore[arg-type]  # fmt: skip
    uri = f"{root}/run"
    stop = threading.Event()
    stop.set()  # a SIGTERM already pending: checkpoint after the first step, then exit
    with pytest.raises(Preempted):
        train(cfg, stop=stop)
    store = open_store(uri, cfg.storage)
    assert store.exists(layout.checkpoint_key(1, "manifest.json"))
    assert not store.exists(layout.LEASE_KEY)  # released on the way out

    result = train(cfg)
    assert result.step == 4 and result.output_uri == uri
    record = layout.ProgressRecord.from_bytes(store.get_bytes(layout.PROGRESS_KEY))
    assert record.state == "completed" and record.resumed_from == 1

    dest = tmp_path / "pulled"
    pulled = CliRunner().invoke(main, ["pull", uri, "-o", str(dest), "--format", "json"])
    assert pulled.exit_code == 0, pulled.output
    doc = json.loads(pulled.stdout)
    assert (doc["what"], doc["step"], doc["files"]) == ("final", 4, ["lora.safetensors"])
    assert (dest / "lora.safetensors").read_bytes() == store.get_bytes("final/lora.safetensors")
    step = CliRunner().invoke(main, ["pull", uri, "--step", "2", "-o", str(tmp_path / "s2")])
    assert step.exit_code == 0, step.output
    assert sorted(p.name for p in (tmp_path / "s2").iterdir()) == ["lora.safetensors"]

    shown = CliRunner().invoke(main, ["report", uri, "-o", str(tmp_path / "view.html"),
                                      "--format", "json"])  # fmt: skip
    assert shown.exit_code == 0, shown.output
    with urllib.request.urlopen(json.loads(shown.stdout)["url"], timeout=10) as reply:  # noqa: S310
        assert reply.read() == store.get_bytes(layout.REPORT_KEY)
