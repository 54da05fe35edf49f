"""Listings and ranged reads of a cloud store (the dataset path) against the real SeaweedFS
server: the same keys, sizes and ETags as an independent client (boto3) lists, odd keys,
reads past the end, anonymous requests, retries through the fault proxy, and a store used in
a forked child (DataLoader workers fork)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from faultproxy import FaultProxy
from s3server import S3Server

from kubetune.errors import StorageError, StorageUserError
from kubetune.storage import open_store
from kubetune.storage.cloud import CloudStore

pytestmark = pytest.mark.timeout(120)

ODD_KEYS = ["odd/a b.jpg", "odd/café ünï.png", "odd/plus+sign.jpg", "odd/100%.jpg",
            "odd/q?x=1&y#z.jpg", "odd/tilde~-_.jpg", "odd/日本語/写真.jpg"]  # fmt: skip


def _reference_listing(server: S3Server, bucket: str, prefix: str) -> list[tuple[str, int, str]]:
    """What boto3's own paginator returns (keys relative to the bucket)."""
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [(o["Key"], o["Size"], o["ETag"]) for p in pages for o in p.get("Contents", [])]


def _fill(server: S3Server, bucket: str, keys: list[str]) -> None:
    client = server.client()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=k.encode()), keys))


@pytest.mark.slow
def test_listing_matches_an_independent_client_over_pages_and_odd_keys(
    s3_env: S3Server, s3_bucket: str
) -> None:
    keys = [f"many/img-{i:05d}.jpg" for i in range(1203)] + ODD_KEYS + ["other/x.jpg"]
    _fill(s3_env, s3_bucket, keys)
    store = open_store(f"s3://{s3_bucket}")
    mine = [(o.key, o.size, o.etag) for o in store.list()]
    assert mine == _reference_listing(s3_env, s3_bucket, "")
    assert len(mine) == len(keys)  # > 1000: two pages
    assert [o.key for o in store.list("odd/")] == sorted(ODD_KEYS)
    small_steps = open_store(f"s3://{s3_bucket}/many", page_size=100)
    listed = [o.key for o in small_steps.list("img-011")]
    assert listed == [f"img-{i:05d}.jpg" for i in range(1100, 1200)]


def test_ranged_reads_of_odd_keys_and_past_the_end(s3_env: S3Server, s3_bucket: str) -> None:
    _fill(s3_env, s3_bucket, ODD_KEYS)
    store = open_store(f"s3://{s3_bucket}/odd")
    for key in ODD_KEYS:
        rel = key[len("odd/") :]
        assert store.get_range(rel, 0, 4) == key.encode()[:4]
        assert store.get_range(rel, 2, 1000) == key.encode()[2:]
        assert store.get_range(rel, 10_000, 8) == b""
    with pytest.raises(FileNotFoundError):
        store.get_range("missing.jpg", 0, 8)


def test_awaited_ranged_reads_equal_the_blocking_ones(s3_env: S3Server, s3_bucket: str) -> None:
    """`get_range_async` (Capability.ASYNC_READS, many reads in flight from one thread):
    the same bytes, b"" past the end and FileNotFoundError for a missing key."""
    import asyncio

    from kubetune.storage import Capability, supports

    _fill(s3_env, s3_bucket, ODD_KEYS)
    store = open_store(f"s3://{s3_bucket}/odd")
    assert supports(store, Capability.ASYNC_READS)
    assert not supports(open_store("/tmp"), Capability.ASYNC_READS)
    rels = [key[len("odd/") :] for key in ODD_KEYS]

    async def reads() -> list[bytes]:
        calls = [store.get_range_async(rel, 2, 1000) for rel in rels]
        return await asyncio.gather(*calls, store.get_range_async(rels[0], 10_000, 8))

    assert asyncio.run(reads()) == [store.get_range(rel, 2, 1000) for rel in rels] + [b""]
    with pytest.raises(FileNotFoundError):
        asyncio.run(store.get_range_async("missing.jpg", 0, 8))


def test_unsigned_requests_when_no_credentials(
    s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without credentials the request goes out anonymous (never to a metadata service);
    this server refuses anonymous reads, which must surface as a one-line user error."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = open_store(f"s3://{s3_bucket}")
    for call in (lambda: list(store.list()), lambda: store.get_range("x", 0, 4)):
        with pytest.raises((StorageUserError, FileNotFoundError)) as info:
            call()
        assert "\n" not in str(info.value)


def test_wrong_secret_and_missing_bucket_are_user_errors(
    s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(StorageUserError) as info:
        list(open_store("s3://no-such-bucket-kt2/x").list())
    assert "no-such-bucket-kt2" in str(info.value) and s3_env.endpoint in str(info.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.wrong_secret_key)
    with pytest.raises(StorageUserError) as info:
        list(open_store(f"s3://{s3_bucket}").list())
    assert s3_env.wrong_secret_key not in str(info.value)


def _proxied(proxy: FaultProxy, uri: str, **options: object) -> CloudStore:
    cfg = SimpleNamespace(endpoint_url=proxy.endpoint, region=None, addressing_style="path",
                          verify_tls=True)  # fmt: skip
    store = open_store(uri, cfg, **options)
    assert isinstance(store, CloudStore)
    return store


def test_transient_faults_are_retried_for_listing_and_ranged_reads(
    fault_proxy: FaultProxy, s3_uri: str
) -> None:
    store = _proxied(fault_proxy, s3_uri)
    keys = [f"r/{i}" for i in range(5)]
    for key in keys:
        store.put_bytes(key, key.encode() * 10)
    for fault in ("500", "503", "reset", "cut_response"):
        fault_proxy.inject(fault, 1, method="GET")
        assert [o.key for o in store.list("r/")] == keys
        fault_proxy.inject(fault, 1, method="GET")
        assert store.get_range("r/3", 1, 5) == (b"r/3" * 10)[1:6]
    assert fault_proxy.pending() == 0


def test_exhausted_retries_are_a_storage_error_naming_the_store(
    fault_proxy: FaultProxy, s3_uri: str
) -> None:
    store = _proxied(fault_proxy, s3_uri, max_attempts=2)
    fault_proxy.inject("503", 10, ttl_s=20)
    with pytest.raises(StorageError) as info:
        list(store.list("r/"))
    assert not isinstance(info.value, StorageUserError) and s3_uri in str(info.value)
    assert "\n" not in str(info.value)


def test_opening_a_cloud_store_ends_fork_safety(s3_env: S3Server, s3_bucket: str) -> None:
    """obstore's runtime threads do not survive a fork (a forked child hangs on its first
    request): once a cloud store is open, ``fork_safe()`` says so, and the DataLoader
    workers and the preflight start their children another way. Checked in a fresh
    interpreter, since this test process has opened cloud stores already."""
    import subprocess
    import sys

    code = (
        "from kubetune.storage import fork_safe, open_store\n"
        "before = fork_safe()\n"
        f"open_store('s3://{s3_bucket}').exists('x')\n"
        "print(before, fork_safe())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)  # fmt: skip
    assert out.stdout.split() == ["True", "False"]
