"""A real tiny training run (local folder, SeaweedFS S3, fake-gcs-server GCS behind the
translating proxy of tests/gcs_xml_proxy.py, Azurite) seen by people and pipelines:
history, report.html, webhooks to a receiver on 127.0.0.1, `launcher report`, `launcher pull`
(verified against the manifests) and the pulled LoRA loaded into diffusers."""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import re
import threading
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from train_support import make_config, train, write_dataset
from webhook_receiver import WebhookReceiver

from kubetune.config.notify import HMAC_ENV
from kubetune.errors import KubetuneError, Preempted
from kubetune.layout import read_history
from kubetune.storage import is_remote, open_store
from kubetune.storage.lease import Lease, LeaseSettings
from launcher.cli.main import main

PROMPTS = ["kbtn style, a red circle", "a photo of a kbtn"]


def _config(tmp_path: Path, tiny_sd_dir: Path, out: Path, hook: str, **extra: Any) -> Any:
    fields: dict[str, Any] = {
        "validate_every_n_steps": 2,
        "validation_prompts": PROMPTS,
        "num_validation_images_per_prompt": 1,
        "log_every_n_steps": 1,
        "notify": {"webhooks": [{"url": hook}], "hmac_secret": {"name": "hooks", "key": "hmac"}},
    }
    data = write_dataset(tmp_path / "data")
    return make_config("SD_LORA", tiny_sd_dir, data, out, **{**fields, **extra})


@pytest.fixture
def where(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Outputs in a local folder, in a SeaweedFS bucket, a fake-gcs-server bucket or an Azurite
    container (storage:)."""
    if request.param == "local":
        return {"out": tmp_path / "out" / "e2e", "extra": {}}
    if request.param == "gs":
        gcs = request.getfixturevalue("gcs_writable")  # the emulator, or the proxy before it
        storage = {"provider": "gcs", "bucket": gcs.create_bucket(), "prefix": "runs",
                   "endpoint_url": gcs.endpoint}  # fmt: skip
        return {"out": tmp_path / "unused" / "e2e", "extra": {"storage": storage}}
    if request.param == "az":
        azurite = request.getfixturevalue("az_env")
        storage = {"provider": "azure", "bucket": request.getfixturevalue("az_container"),
                   "prefix": f"runs-{uuid.uuid4().hex[:8]}", "account_name": "devstoreaccount1",
                   "endpoint_url": azurite.endpoint}  # fmt: skip
        return {"out": tmp_path / "unused" / "e2e", "extra": {"storage": storage}}
    server = request.getfixturevalue("s3_env")
    bucket = request.getfixturevalue("s3_bucket")
    storage = {"bucket": bucket, "prefix": "runs", "endpoint_url": server.endpoint}
    return {"out": tmp_path / "unused" / "e2e", "extra": {"storage": storage}}


@pytest.mark.parametrize("where", ["local", "s3", "gs", "az"], indirect=True)
@pytest.mark.slow
def test_a_run_reports_notifies_and_pulls(
    where: dict[str, Any], tmp_path: Path, tiny_sd_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(HMAC_ENV, "hook-secret")
    with WebhookReceiver() as hook:
        cfg = _config(tmp_path, tiny_sd_dir, where["out"], hook.url, **where["extra"])
        result = train(cfg)
    uri = result.output_uri
    store = open_store(uri, cfg.storage)

    assert [r["step"] for r in read_history(store)] == [1, 2, 3, 4]
    events = hook.events()
    assert events[0] == "started" and events[-1] == "succeeded"
    assert sorted(events[1:-1]) == ["checkpoint", "checkpoint", "validation", "validation"]
    for request in hook.requests:
        signed = hmac.new(b"hook-secret", request.body, hashlib.sha256).hexdigest()
        assert request.headers["X-Kubetune-Signature"] == f"sha256={signed}"
    done = hook.requests[-1].json
    assert (done["run"], done["step"], done["state"]) == ("e2e", 4, "completed")
    assert done["final_uri"] == f"{uri}/final/" and isinstance(done["loss"], float)
    checkpoint = next(r.json for r in hook.requests if r.json["event"] == "checkpoint")
    assert store.exists(checkpoint["checkpoint_uri"][len(uri) + 1 :] + "manifest.json")

    page = store.get_bytes("report.html").decode()
    assert "completed" in page and "step 2</a>" in page and "step 4</a>" in page
    assert page.count("data:image/jpeg;base64,") == 4 and "<polyline" in page

    cli = CliRunner()
    view = tmp_path / "view.html"
    shown = cli.invoke(main, ["report", uri, "-o", str(view)])
    assert shown.exit_code == 0, shown.output
    link = shown.output.strip()
    if is_remote(uri):  # a page whose links to the full-size grids are presigned
        assert link == str(view)
        links = [html.unescape(h) for h in re.findall(r'href="([^"]+)"', view.read_text())]
        assert len(links) == 2
        for step, url in zip((2, 4), links, strict=True):
            assert url.startswith("http://127.0.0.1:") and ("Signature=" in url or "sig=" in url)
            with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - 127.0.0.1
                grid = store.get_bytes(f"validation/step-00000{step}/grid.png")
                assert response.read() == grid
        doc = json.loads(
            cli.invoke(main, ["report", uri, "--format", "json", "-o", str(view)]).output
        )
        assert doc["report"] == str(view)
        with urllib.request.urlopen(doc["url"], timeout=10) as response:  # noqa: S310
            assert response.headers["Content-Type"].startswith("text/html")
            assert response.read().decode() == page  # the stored page, to share
    else:  # -o writes a copy whose links point into the run folder (file:// URIs)
        assert link == str(view)
        assert 'href="validation/step-000002/grid.png"' in page  # relative: works as a file
        grid = Path(uri) / "validation/step-000002/grid.png"
        assert f'href="{grid.as_uri()}"' in view.read_text()

    dest = tmp_path / "pulled"
    pulled = cli.invoke(main, ["pull", uri, "-o", str(dest), "--format", "json"])
    assert pulled.exit_code == 0, pulled.output
    doc = json.loads(pulled.stdout)
    assert (doc["what"], doc["step"], doc["files"]) == ("final", 4, ["lora.safetensors"])
    assert (dest / "lora.safetensors").read_bytes() == store.get_bytes("final/lora.safetensors")

    step2 = cli.invoke(main, ["pull", uri, "--step", "2", "-o", str(tmp_path / "s2")])
    assert step2.exit_code == 0, step2.output
    assert sorted(p.name for p in (tmp_path / "s2").iterdir()) == ["lora.safetensors"]

    missing = cli.invoke(main, ["pull", uri, "--step", "3", "-o", str(tmp_path / "s3")])
    assert missing.exit_code == 2 and "complete checkpoints: 2, 4" in missing.output

    store.put_bytes("final/lora.safetensors", b"tampered")
    bad = cli.invoke(main, ["pull", uri, "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "does not match its manifest" in bad.output
    assert not (tmp_path / "bad" / "lora.safetensors").exists()


@pytest.mark.slow
def test_preempted_run_notifies_and_resumes_its_history(
    tmp_path: Path, tiny_sd_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(HMAC_ENV, "x")
    out = tmp_path / "out" / "pre"
    with WebhookReceiver() as hook:
        cfg = _config(tmp_path, tiny_sd_dir, out, hook.url, validation_prompts=PROMPTS[:1],
                      validate_every_n_steps=4)  # fmt: skip
        stop = threading.Event()
        stop.set()  # SIGTERM already pending: checkpoint after the first step, exit
        with pytest.raises(Preempted):
            train(cfg, stop=stop)
        assert hook.events()[-1] == "preempted"
        assert "preempted" in (out / "report.html").read_text()
        train(cfg)
    assert [r["step"] for r in read_history(open_store(str(out)))] == [1, 2, 3, 4]
    assert hook.events().count("started") == 2 and hook.events()[-1] == "succeeded"
    assert hook.requests[-1].json["step"] == 4


@pytest.mark.parametrize("cause", ["data", "model", "lease"])
def test_a_run_that_fails_before_training_notifies_failed_and_writes_nothing(
    cause: str, tmp_path: Path, tiny_sd_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad image (preflight), a missing base model, or the run's lease held by another
    runner: the run stops before its first step with one "failed" webhook, in the shape of
    the other events, and leaves the run folder as it found it."""
    monkeypatch.setenv(HMAC_ENV, "x")
    out = tmp_path / "out" / "early"
    model = tmp_path / "no-such-model" if cause == "model" else tiny_sd_dir
    other = None
    if cause == "lease":
        settings = LeaseSettings(timeout_s=600, wait_s=0.0)
        other = Lease(open_store(str(out)), settings, holder="pod-other").acquire(heartbeat=False)
    with WebhookReceiver() as hook:
        cfg = _config(tmp_path, model, out, hook.url, lease_wait_seconds=0.0)
        if cause == "data":
            (tmp_path / "data" / "img-1.png").write_bytes(b"not a png")
        with pytest.raises(KubetuneError) as info:
            train(cfg)
    assert hook.events() == ["failed"]
    body = hook.requests[0].json
    assert (body["run"], body["type"], body["state"]) == ("early", "SD_LORA", "failed")
    assert body["error"] == str(info.value).splitlines()[0]
    assert {"data": "img-1", "model": "no-such-model", "lease": "pod-other"}[cause] in body["error"]
    assert body["step"] is None and body["report_uri"] is None  # no report was written
    assert body["output_uri"] == str(out) and body["config_hash"]
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left == (["lease.json"] if cause == "lease" else [])
    if other is not None:
        other.release()


@pytest.mark.slow
def test_pulled_lora_loads_into_diffusers(
    tmp_path: Path, tiny_sd_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the README's "after training" section shows."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out" / "load"
    cfg = make_config("SD_LORA", tiny_sd_dir, write_dataset(tmp_path / "data"), out)
    train(cfg)
    result = CliRunner().invoke(main, ["pull", str(out), "-o", str(tmp_path / "lora")])
    assert result.exit_code == 0, result.output
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name="lora.safetensors")
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())
