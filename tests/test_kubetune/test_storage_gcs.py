"""gs:// through obstore against a real GCS emulator (fake-gcs-server on 127.0.0.1, reached with
a real service-account key as a pod would be). Reads, listings, presigned URLs and the reading
half of resume, report, pull and the lease run on the emulator directly, with objects put in
place by its JSON API. obstore's writes, which the emulator refuses (XML API PUT: 400,
tests/gcs_emulator.py), reach it through the translating proxy of tests/gcs_xml_proxy.py (a
fake layer; the storage and the generation preconditions stay the emulator's): checked here
for multipart uploads and preconditions against writers outside obstore, and by every test
that takes ``store_uri``."""

from __future__ import annotations

import html
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from gcs_emulator import FakeGCS, GCSFront

from kubetune.checkpoint.publish import CheckpointManager
from kubetune.errors import StorageUserError
from kubetune.storage import Capability, ObjectInfo, open_store, supports
from launcher.cli.main import main

pytestmark = pytest.mark.timeout(120)

KEYS = {"run/a/b.txt": b"hello", "run/a-b": b"xy", "run/ab/c": b"", "run/odd/café ü.jpg": b"j",
        "run/z": b"0123456789", "other/x": b"o"}  # fmt: skip


@pytest.fixture
def gcs_bucket(gcs_env: FakeGCS) -> str:
    bucket = gcs_env.create_bucket()
    for key, data in KEYS.items():
        gcs_env.upload(bucket, key, data)
    return bucket


def test_reads_listing_ranges_and_deletes(gcs_bucket: str, tmp_path: Path) -> None:
    store = open_store(f"gs://{gcs_bucket}/run")
    assert store.uri == f"gs://{gcs_bucket}/run" and store.url("z") == f"{store.uri}/z"
    assert supports(store, Capability.CONDITIONAL_WRITE) and supports(store, Capability.PRESIGN)
    assert not supports(store, Capability.RANGE_LISTING)  # not declared (kubetune.storage.gcs)
    listed = sorted(store.list(), key=lambda o: o.key)
    assert listed == [ObjectInfo(k[4:], len(v)) for k, v in sorted(KEYS.items()) if k[:4] == "run/"]
    assert all(o.etag for o in listed)
    assert sorted(o.key for o in store.list("a")) == ["a-b", "a/b.txt", "ab/c"]
    assert [o.key for o in store.list("a/")] == ["a/b.txt"]
    assert store.get_bytes("a/b.txt") == b"hello" and store.get_bytes("ab/c") == b""
    assert store.get_range("z", 2, 3) == b"234" and store.get_range("z", 8, 100) == b"89"
    assert store.get_range("z", 50, 4) == b""
    store.get_file("odd/café ü.jpg", tmp_path / "out" / "j.jpg")
    assert (tmp_path / "out" / "j.jpg").read_bytes() == b"j"
    assert store.exists("z") and not store.exists("a") and not store.exists("nope")
    with pytest.raises(FileNotFoundError):
        store.get_bytes("nope")
    with pytest.raises(FileNotFoundError):
        store.get_range("nope", 0, 4)
    store.delete(["z", "a-b", "never-there"])
    assert not store.exists("z") and sorted(o.key for o in store.list("a")) == ["a/b.txt", "ab/c"]


def test_the_emulators_refusal_of_uploads_is_one_clear_line(
    gcs_env: FakeGCS, gcs_bucket: str
) -> None:
    """What a GCS-compatible server that refuses a write looks like to a run: a one-line
    error naming the bucket and endpoint (4xx: the user's to fix), no traceback text."""
    if gcs_env.xml_writes_refused() is None:
        pytest.skip("this emulator accepts obstore's writes: the gs:// write tests run instead")
    store = open_store(f"gs://{gcs_bucket}/run")
    with pytest.raises(StorageUserError) as info:
        store.put_bytes("new", b"1")
    message = str(info.value)
    assert "\n" not in message and gcs_bucket in message and "127.0.0.1" in message
    assert "400" in message and "invalid uploadType" in message


def test_settings_for_another_cloud_never_reach_gcs(gcs_bucket: str) -> None:
    """A run whose storage: is S3 reads a gs:// dataset with the GOOGLE_* environment only."""
    from types import SimpleNamespace

    s3 = SimpleNamespace(provider="s3", endpoint_url="http://127.0.0.1:9", region=None,
                         addressing_style="path", verify_tls=True)  # fmt: skip
    assert open_store(f"gs://{gcs_bucket}/run", s3).get_bytes("z") == b"0123456789"


def _fetch(url: str) -> bytes:
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310 - 127.0.0.1
        return reply.read()


def test_presigned_urls_serve_the_object_without_credentials(gcs_bucket: str) -> None:
    """V4 URLs signed locally with the service-account key (no call to Google)."""
    store = open_store(f"gs://{gcs_bucket}/run")
    url = store.presign("odd/café ü.jpg", expires_s=60)
    assert "X-Goog-Algorithm=GOOG4-RSA-SHA256" in url and "X-Goog-Signature=" in url
    assert "X-Goog-Expires=60" in url and _fetch(url) == b"j"


def test_version_tags_carry_the_generation_and_conditional_deletes_check_it(
    gcs_env: FakeGCS, gcs_bucket: str
) -> None:
    """The lease's reading half on GCS: the tag a holder keeps names the object generation
    (what ``x-goog-if-generation-match`` conditions on), so a lease rewritten by someone else
    is not deleted by its former holder on release."""
    store = open_store(f"gs://{gcs_bucket}/run")
    data, tag = store.read_tagged("z")
    e_tag, generation = json.loads(tag)
    assert data == b"0123456789" and e_tag and generation and generation.isdigit()
    gcs_env.upload(gcs_bucket, "run/z", b"taken over")  # a new generation, as a takeover makes
    newer = store.read_tagged("z")[1]
    assert json.loads(newer)[1] != generation
    assert not store.delete_if("z", tag) and store.get_bytes("z") == b"taken over"
    assert store.delete_if("z", newer) and not store.exists("z")
    assert not store.delete_if("z", newer)  # already gone


def test_resume_reads_the_newest_complete_valid_checkpoint(
    gcs_env: FakeGCS, tmp_path: Path
) -> None:
    """Resume's reading half on GCS: a step without its manifest (an upload cut before the
    manifest, which goes last) is not a checkpoint, and a checkpoint whose bytes do not match
    its manifest is passed over for the previous one."""
    local = CheckpointManager(open_store(str(tmp_path / "run")), None)
    for step in (1, 2):
        (tmp_path / f"w{step}").mkdir()
        (tmp_path / f"w{step}" / "lora.safetensors").write_bytes(bytes([step]) * 1000)
        local.save(step, tmp_path / f"w{step}")
    bucket = gcs_env.create_bucket()
    gcs_env.upload_tree(bucket, "run/checkpoints", tmp_path / "run" / "checkpoints")
    gcs_env.upload(bucket, "run/checkpoints/step-000003/lora.safetensors", b"half")
    manager = CheckpointManager(open_store(f"gs://{bucket}/run"), None)
    assert manager.list_complete() == [1, 2] and manager.latest() == 2
    restored = manager.restore_newest_valid(tmp_path / "restore", heal=False)
    assert restored is not None and restored.step == 2
    assert (restored.folder / "lora.safetensors").read_bytes() == b"\x02" * 1000

    gcs_env.upload(bucket, "run/checkpoints/step-000002/lora.safetensors", b"\x00" * 1000)
    restored = manager.restore_newest_valid(tmp_path / "again", heal=False)
    assert restored is not None and restored.step == 1 and not restored.set_aside


def test_launcher_report_presigns_the_page_and_its_grids(gcs_env: FakeGCS, tmp_path: Path) -> None:
    """`launcher report gs://...`: a local copy of the stored page whose links to the grids are
    presigned URLs the emulator serves, and (json) a presigned URL of the page itself."""
    bucket = gcs_env.create_bucket()
    page = '<h1>completed</h1><a href="validation/step-000002/grid.png">step 2</a>'
    gcs_env.upload(bucket, "run/report.html", page.encode())
    gcs_env.upload(bucket, "run/validation/step-000002/grid.png", b"\x89PNG grid")
    view = tmp_path / "view.html"
    shown = CliRunner().invoke(
        main, ["report", f"gs://{bucket}/run", "-o", str(view), "--format", "json"]
    )
    assert shown.exit_code == 0, shown.output
    doc = json.loads(shown.stdout)
    assert doc["report"] == str(view) and _fetch(doc["url"]).decode() == page
    links = [html.unescape(h) for h in re.findall(r'href="([^"]+)"', view.read_text())]
    assert len(links) == 1 and "X-Goog-Signature=" in links[0]
    assert _fetch(links[0]) == b"\x89PNG grid"


def test_multipart_uploads_store_exactly_the_bytes(gcs_writable: GCSFront, tmp_path: Path) -> None:
    """A file above the multipart threshold (three parts) is stored whole: read back through
    the emulator's JSON API, not obstore's reader; the parts left nowhere."""
    bucket = gcs_writable.create_bucket()
    store = open_store(f"gs://{bucket}/run", multipart_threshold=5 * 2**20,
                       multipart_chunksize=5 * 2**20)  # fmt: skip
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * 2**20 + 7))
    before = dict(gcs_writable.proxy.counts) if gcs_writable.proxy else {}
    store.put_file("ck/big.bin", big)
    assert gcs_writable.emulator.download(bucket, "run/ck/big.bin") == big.read_bytes()
    assert [(o.key, o.size) for o in store.list()] == [("ck/big.bin", big.stat().st_size)]
    if gcs_writable.proxy:  # the proxy's XML multipart path was the one taken
        counts = gcs_writable.proxy.counts
        assert counts["complete"] == before.get("complete", 0) + 1
        assert counts["part"] == before.get("part", 0) + 3
        assert not gcs_writable.proxy.translator.uploads


def test_conditional_writes_see_writers_outside_obstore(gcs_writable: GCSFront) -> None:
    """The lease's conditions are the emulator's generations: an object written by another
    client (the JSON API here) is not created over, and a tag from before that write no
    longer replaces it; the current tag does."""
    bucket = gcs_writable.create_bucket()
    store = open_store(f"gs://{bucket}/run")
    assert store.create("lease", b"mine")
    _, mine = store.read_tagged("lease")
    gcs_writable.emulator.upload(bucket, "run/lease", b"theirs")
    assert not store.create("lease", b"again") and not store.replace_if("lease", b"x", mine)
    assert gcs_writable.emulator.download(bucket, "run/lease") == b"theirs"
    assert not store.replace_if("never", b"x", mine)  # a condition on a missing object
    _, theirs = store.read_tagged("lease")
    assert store.replace_if("lease", b"back", theirs) and store.get_bytes("lease") == b"back"
    assert store.create("new", b"1") and store.get_bytes("new") == b"1"


def _xml_call(url: str, method: str, data: bytes = b"") -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310 - 127.0.0.1
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_proxys_multipart_abort_drops_the_parts_not_the_object(
    gcs_writable: GCSFront,
) -> None:
    """obstore aborts a failed multipart upload with ``DELETE key?uploadId=``; forwarded, the
    emulator would delete the object itself (an earlier checkpoint file, say)."""
    if gcs_writable.proxy is None:
        pytest.skip("the emulator takes obstore's writes itself: no proxy")
    bucket = gcs_writable.create_bucket()
    gcs_writable.emulator.upload(bucket, "run/k", b"old")
    url = f"{gcs_writable.endpoint}/{bucket}/run%2Fk"
    status, body = _xml_call(f"{url}?uploads=", "POST")
    found = re.search(rb"<UploadId>(\w+)</UploadId>", body)
    assert status == 200 and found is not None
    upload_id = found[1].decode()
    assert _xml_call(f"{url}?partNumber=1&uploadId={upload_id}", "PUT", b"new")[0] == 200
    assert _xml_call(f"{url}?uploadId={upload_id}", "DELETE")[0] == 204
    assert gcs_writable.emulator.download(bucket, "run/k") == b"old"
    done = b"<CompleteMultipartUpload><Part><PartNumber>1</PartNumber></Part>"
    status, body = _xml_call(f"{url}?uploadId={upload_id}", "POST",
                             done + b"</CompleteMultipartUpload>")  # fmt: skip
    assert status == 404 and b"NoSuchUpload" in body
