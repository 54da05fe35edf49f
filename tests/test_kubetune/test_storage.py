"""kubetune.storage against a local directory and a real SeaweedFS server (same suite)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from faultproxy import FaultProxy
from s3server import S3Server

from kubetune.errors import StorageError, StorageUserError
from kubetune.storage import LocalStore, ObjectInfo, open_store
from kubetune.storage.cloud import CloudStore


def _storage_cfg(**overrides: object) -> SimpleNamespace:
    """Duck-typed StorageConfig (the pydantic model lives in kubetune.config)."""
    fields = dict(endpoint_url=None, bucket=None, prefix="", region=None,
                  addressing_style="path", verify_tls=True, credentials_secret=None)  # fmt: skip
    fields.update(overrides)
    return SimpleNamespace(**fields)


def _proxied_store(proxy: FaultProxy, uri: str, **options: object) -> CloudStore:
    cfg = _storage_cfg(endpoint_url=proxy.endpoint)
    store = open_store(uri, cfg, **options)
    assert isinstance(store, CloudStore)
    return store


# --- both backends ---------------------------------------------------------------------------


def test_bytes_and_files_round_trip(store_uri: str, tmp_path: Path) -> None:
    store = open_store(store_uri)
    store.put_bytes("a/b.txt", b"hello")
    assert store.get_bytes("a/b.txt") == b"hello"
    store.put_bytes("a/b.txt", b"replaced")
    assert store.get_bytes("a/b.txt") == b"replaced"
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(300_000))
    store.put_file("files/src.bin", src)
    dst = tmp_path / "out" / "dst.bin"
    store.get_file("files/src.bin", dst)
    assert dst.read_bytes() == src.read_bytes()
    assert store.exists("files/src.bin") and not store.exists("files")
    assert store.url("a/b.txt").endswith("a/b.txt")
    assert store.url("a/b.txt").startswith(store.uri.rstrip("/"))


def test_empty_object(store_uri: str) -> None:
    store = open_store(store_uri)
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""
    assert list(store.list()) == [ObjectInfo("empty", 0)]


def test_missing_keys(store_uri: str, tmp_path: Path) -> None:
    store = open_store(store_uri)
    with pytest.raises(FileNotFoundError):
        store.get_bytes("nope/x")
    with pytest.raises(FileNotFoundError):
        store.get_file("nope/x", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert not store.exists("nope/x")
    assert list(store.list("nope/")) == []
    store.delete(["nope/x", "nope/y"])  # deleting what is not there is not an error


def test_list_is_sorted_by_key_and_filters_prefix(store_uri: str) -> None:
    store = open_store(store_uri)
    keys = ["a/b", "a-b", "a.c", "a/a/z", "b", "ab/c", "checkpoints/step-000002/x",
            "checkpoints/step-000010/manifest.json", "checkpoints/step-000001/w"]  # fmt: skip
    for i, key in enumerate(keys):
        store.put_bytes(key, b"x" * i)
    listed = list(store.list())
    # Lexicographic (AWS S3, LocalStore); SeaweedFS lists in path-segment order instead.
    assert [o.key for o in listed] in (sorted(keys), sorted(keys, key=lambda k: k.split("/")))
    if store_uri.startswith("/"):
        assert [o.key for o in listed] == sorted(keys)
    assert {o.key: o.size for o in listed} == {k: i for i, k in enumerate(keys)}
    assert [o.key for o in store.list("a/")] == ["a/a/z", "a/b"]
    assert {o.key for o in store.list("a")} == {k for k in keys if k.startswith("a")}
    assert [o.key for o in store.list("checkpoints/step-00000")] == [
        "checkpoints/step-000001/w", "checkpoints/step-000002/x"]  # fmt: skip


def test_delete_batch(store_uri: str) -> None:
    store = open_store(store_uri)
    keys = [f"d/{i:03d}" for i in range(25)] + ["keep/me"]
    for key in keys:
        store.put_bytes(key, b"1")
    store.delete(k for k in keys if k.startswith("d/"))
    assert [o.key for o in store.list()] == ["keep/me"]


@pytest.mark.parametrize("key", ["..", "../x", "a/../../b", "/abs", "", "a//b", "a/./b", "a/"])
def test_keys_escaping_the_root_are_rejected(store_uri: str, key: str, tmp_path: Path) -> None:
    store = open_store(store_uri)
    with pytest.raises(StorageUserError):
        store.put_bytes(key, b"x")
    with pytest.raises(StorageUserError):
        store.get_bytes(key)
    with pytest.raises(StorageUserError):
        store.delete([key])
    with pytest.raises(StorageUserError):
        store.get_file(key, tmp_path / "x")


def test_list_prefix_escaping_the_root_is_rejected(store_uri: str) -> None:
    store = open_store(store_uri)
    for prefix in ("../", "/etc", "a/../.."):
        with pytest.raises(StorageUserError):
            list(store.list(prefix))


# --- local directory specifics ---------------------------------------------------------------


def test_local_writes_leave_no_temp_files_and_failed_put_leaves_nothing(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "root"))
    assert isinstance(store, LocalStore)
    store.put_bytes("x/y", b"data")
    with pytest.raises(FileNotFoundError):
        store.put_file("x/z", tmp_path / "does-not-exist")
    assert sorted(p.name for p in (tmp_path / "root" / "x").iterdir()) == ["y"]
    assert [o.key for o in store.list()] == ["x/y"]


def test_local_delete_removes_empty_directories(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path / 'root'}")
    store.put_bytes("a/b/c/d", b"1")
    store.put_bytes("a/keep", b"1")
    store.delete(["a/b/c/d"])
    assert not (tmp_path / "root" / "a" / "b").exists()
    assert (tmp_path / "root" / "a" / "keep").exists()


# --- S3 specifics ----------------------------------------------------------------------------


def test_open_store_reads_endpoint_and_region_from_env(s3_env: S3Server, s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}")
    assert isinstance(store, CloudStore)
    assert store.endpoint == s3_env.endpoint and store.uri == f"s3://{s3_bucket}"
    store.put_bytes("k", b"v")
    assert s3_env.client().get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"v"


def test_prefix_is_honoured_and_config_endpoint_wins(
    s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # wrong on purpose
    store = open_store(f"s3://{s3_bucket}/team/run-1/", _storage_cfg(endpoint_url=s3_env.endpoint))
    store.put_bytes("progress.json", b"{}")
    assert store.url("progress.json") == f"s3://{s3_bucket}/team/run-1/progress.json"
    raw = s3_env.client().list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert [o["Key"] for o in raw] == ["team/run-1/progress.json"]


def test_bad_s3_uris_are_user_errors() -> None:
    for uri in ("s3://", "s3:///prefix", "s3://bucket/../x"):
        with pytest.raises(StorageUserError):
            open_store(uri)


def test_list_is_lazy_and_paginated(
    fault_proxy: FaultProxy, s3_env: S3Server, s3_bucket: str
) -> None:
    """S3 pages hold 1,000 keys: 1,203 keys are two pages, and the second is fetched only
    when the iterator reaches it."""
    keys = [f"k/{i:04d}" for i in range(1203)]
    client = s3_env.client()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=s3_bucket, Key=k, Body=b""), keys))
    store = _proxied_store(fault_proxy, f"s3://{s3_bucket}", page_size=100)
    before = fault_proxy.requests
    it = store.list("k/")
    assert next(it).key == "k/0000"
    assert fault_proxy.requests - before == 1  # one page fetched, not both
    assert [o.key for o in it] == keys[1:]
    assert fault_proxy.requests - before == 2


def test_missing_bucket_is_a_user_error_naming_bucket_and_endpoint(s3_env: S3Server) -> None:
    store = open_store("s3://no-such-bucket-kt/run")
    for call in (lambda: store.put_bytes("x", b"1"), lambda: store.get_bytes("x"),
                 lambda: list(store.list())):  # fmt: skip
        with pytest.raises(StorageUserError) as info:
            call()
        assert "no-such-bucket-kt" in str(info.value) and s3_env.endpoint in str(info.value)


def test_wrong_secret_is_a_user_error_and_never_shows_the_secret(
    s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.wrong_secret_key)
    store = open_store(f"s3://{s3_bucket}")
    with pytest.raises(StorageUserError) as info:
        store.put_bytes("x", b"1")
    message = str(info.value)
    assert s3_bucket in message and s3_env.endpoint in message
    assert s3_env.wrong_secret_key not in message and s3_env.secret_key not in message


def test_unknown_access_key_and_read_only_identity(
    s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(StorageUserError):
        open_store(f"s3://{s3_bucket}").get_bytes("x")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env.readonly_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.readonly_secret_key)
    with pytest.raises(StorageUserError):
        open_store(f"s3://{s3_bucket}").put_bytes("x", b"1")


def test_unreachable_endpoint_fails_fast_with_a_clear_message(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from emulator_process import free_ports

    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    store = open_store("s3://bucket/run")
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        store.put_bytes("x", b"1")
    assert time.monotonic() - start < 10
    assert endpoint in str(info.value) and not isinstance(info.value, StorageUserError)


def test_transient_faults_are_retried_and_data_is_exact(
    fault_proxy: FaultProxy, s3_uri: str, tmp_path: Path
) -> None:
    store = _proxied_store(fault_proxy, s3_uri, multipart_threshold=5 * 2**20,
                           multipart_chunksize=5 * 2**20)  # fmt: skip
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * 2**20))  # three parts
    for fault in ("500", "503", "reset", "cut_request"):
        fault_proxy.inject(fault, 1, method="PUT")
    store.put_file("big.bin", big)
    store.put_bytes("small", b"s" * 1000)
    for fault in ("500", "503", "reset", "cut_response"):
        fault_proxy.inject(fault, 1, method="GET")
    assert store.get_bytes("small") == b"s" * 1000
    for fault in ("cut_response", "reset"):
        fault_proxy.inject(fault, 1, method="GET")
    store.get_file("big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
    assert fault_proxy.pending() == 0
    assert {f for f, _, _ in fault_proxy.injected} == {"500", "503", "reset", "cut_request",
                                                       "cut_response"}  # fmt: skip


def test_exhausted_retries_raise_storage_error(fault_proxy: FaultProxy, s3_uri: str) -> None:
    store = _proxied_store(fault_proxy, s3_uri, max_attempts=2)
    fault_proxy.inject("500", 10, ttl_s=20)
    with pytest.raises(StorageError) as info:
        store.put_bytes("x", b"1")
    assert not isinstance(info.value, StorageUserError)
    assert s3_uri in str(info.value)


def test_a_cut_upload_never_leaves_a_partial_object(fault_proxy: FaultProxy, s3_uri: str) -> None:
    store = _proxied_store(fault_proxy, s3_uri, max_attempts=1)
    fault_proxy.inject("cut_request", 1, method="PUT")
    with pytest.raises(StorageError):
        store.put_bytes("x", b"a" * 200_000)
    assert not store.exists("x")
    store.put_bytes("x", b"old")
    fault_proxy.inject("cut_request", 1, method="PUT")
    with pytest.raises(StorageError):
        store.put_bytes("x", b"b" * 200_000)
    assert store.get_bytes("x") == b"old"


def test_open_store_accepts_the_real_storage_config(
    s3_env: S3Server, s3_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune.config import StorageConfig

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    bucket = s3_uri.removeprefix("s3://").split("/")[0]
    cfg = StorageConfig(bucket=bucket, endpoint_url=s3_env.endpoint, region="us-east-1")
    store = open_store(s3_uri, cfg)
    store.put_bytes("config.yaml", b"type: SD_LORA\n")
    assert store.get_bytes("config.yaml") == b"type: SD_LORA\n"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_local_files_get_the_modes_the_umask_allows(tmp_path: Path, umask: int) -> None:
    """Files a LocalStore writes (put, put_file, create) have mode 0o666 minus the umask, as
    `open()` gives: a report or weights file written under umask 022 is readable by the
    machine's other users (the atomic write's temp file alone would leave them 0o600)."""
    source = tmp_path / "source.bin"
    source.write_bytes(b"weights")
    old = os.umask(umask)
    try:
        store = LocalStore(tmp_path / "store")
        store.put_bytes("report.html", b"<html>")
        store.put_file("final/lora.safetensors", source)
        assert store.create("lease.json", b"{}")
    finally:
        os.umask(old)
    for key in ("report.html", "final/lora.safetensors", "lease.json"):
        mode = (tmp_path / "store" / key).stat().st_mode & 0o777
        assert mode == 0o666 & ~umask, (key, oct(mode))
