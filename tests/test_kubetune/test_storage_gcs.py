"""gs:// through obstore against a real GCS emulator (fake-gcs-server on 127.0.0.1): the read
half of the store contract. The emulator refuses obstore's uploads (XML API PUT: 400), so
objects are put in place with its JSON API and the write half is covered on S3 and Azure
(tests/gcs_emulator.py says exactly what works)."""

from __future__ import annotations

from pathlib import Path

import pytest
from gcs_emulator import FakeGCS

from kubetune.errors import StorageError, StorageUserError
from kubetune.storage import Capability, ObjectInfo, open_store, supports

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
    assert not supports(store, Capability.RANGE_LISTING)  # obstore filters a full listing
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


def test_the_emulators_refusal_of_uploads_is_one_clear_line(gcs_bucket: str) -> None:
    """What a GCS-compatible server that refuses a write looks like to a run: a one-line
    error naming the bucket and endpoint (4xx: the user's to fix), no traceback text."""
    store = open_store(f"gs://{gcs_bucket}/run")
    with pytest.raises((StorageUserError, StorageError)) as info:
        store.put_bytes("new", b"1")
    message = str(info.value)
    assert "\n" not in message and gcs_bucket in message and "127.0.0.1" in message


def test_settings_for_another_cloud_never_reach_gcs(gcs_bucket: str) -> None:
    """A run whose storage: is S3 reads a gs:// dataset with the GOOGLE_* environment only."""
    from types import SimpleNamespace

    s3 = SimpleNamespace(provider="s3", endpoint_url="http://127.0.0.1:9", region=None,
                         addressing_style="path", verify_tls=True)  # fmt: skip
    assert open_store(f"gs://{gcs_bucket}/run", s3).get_bytes("z") == b"0123456789"
