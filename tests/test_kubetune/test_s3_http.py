"""The lean S3 path (kubetune.storage.s3_http) behind S3Store.list and S3Store.get_range: the same
keys, sizes and ETags as botocore's own listing, and the same retries and errors, against the real
SeaweedFS server (and the fault proxy in front of it)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from faultproxy import FaultProxy
from s3server import S3Server

from kubetune.errors import StorageError, StorageUserError
from kubetune.storage import open_store
from kubetune.storage.s3 import S3Store

pytestmark = pytest.mark.timeout(120)

ODD_KEYS = ["odd/a b.jpg", "odd/café ünï.png", "odd/plus+sign.jpg", "odd/100%.jpg",
            "odd/q?x=1&y#z.jpg", "odd/tilde~-_.jpg", "odd/日本語/写真.jpg"]  # fmt: skip


def _botocore_listing(server: S3Server, bucket: str, prefix: str) -> list[tuple[str, int, str]]:
    """What boto3's own paginator returns (keys relative to the bucket)."""
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [
        (o["Key"], o["Size"], o["ETag"].strip('"')) for p in pages for o in p.get("Contents", [])
    ]


def _fill(server: S3Server, bucket: str, keys: list[str]) -> None:
    client = server.client()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=k.encode()), keys))


def test_listing_matches_botocore_over_pages_odd_keys_and_a_prefix(
    s3_env: S3Server, s3_bucket: str
) -> None:
    keys = [f"many/img-{i:05d}.jpg" for i in range(1203)] + ODD_KEYS + ["other/x.jpg"]
    _fill(s3_env, s3_bucket, keys)
    store = open_store(f"s3://{s3_bucket}")
    assert isinstance(store, S3Store)
    mine = [(o.key, o.size, o.etag) for o in store.list()]
    assert mine == _botocore_listing(s3_env, s3_bucket, "")
    assert len(mine) == len(keys)  # > 1000: two pages of the default size
    assert [o.key for o in store.list("odd/")] == sorted(ODD_KEYS)
    small_pages = open_store(f"s3://{s3_bucket}/many", page_size=100)
    listed = [o.key for o in small_pages.list("img-011")]
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


def test_unsigned_requests_when_no_credentials(
    s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without credentials the request goes out anonymous; this server refuses anonymous
    reads, which must surface as a one-line user error, not a crash."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = open_store(f"s3://{s3_bucket}")
    for call in (lambda: list(store.list()), lambda: store.get_range("x", 0, 4)):
        with pytest.raises((StorageUserError, FileNotFoundError)):
            call()


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


def _proxied(proxy: FaultProxy, uri: str, **options: object) -> S3Store:
    cfg = SimpleNamespace(endpoint_url=proxy.endpoint, region=None, addressing_style="path",
                          verify_tls=True)  # fmt: skip
    store = open_store(uri, cfg, **options)
    assert isinstance(store, S3Store)
    return store


def test_transient_faults_are_retried_for_listing_and_ranged_reads(
    fault_proxy: FaultProxy, s3_uri: str
) -> None:
    store = _proxied(fault_proxy, s3_uri, page_size=2)
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


def test_sigv4_signer_matches_botocores_for_the_same_moment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lean signer and botocore's S3 SigV4 signer give the same Authorization header for
    the same request, credentials and second (botocore is the reference), with and without
    a session token."""
    import datetime

    import botocore.auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from kubetune.storage.s3_http import SigV4

    moment = datetime.datetime(2026, 12, 2, 5, 9, 14)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *a, **k: moment)
    path, query = "/bkt/odd/caf%C3%A9%20%C3%BCn%C3%AF.png", "?a=1&list-type=2&prefix=x%2Fy"
    for token in (None, "session-token"):
        creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
        request = AWSRequest(method="GET", url=f"http://127.0.0.1:9/{path[1:]}{query}",
                             headers={"Range": "bytes=0-16383"})  # fmt: skip
        botocore.auth.S3SigV4Auth(creds, "s3", "eu-west-3").add_auth(request)
        ours = SigV4(creds, "eu-west-3").sign(
            "GET", path, query, {"host": "127.0.0.1:9", "Range": "bytes=0-16383"},
            now=moment.replace(tzinfo=datetime.timezone.utc).timestamp(),
        )  # fmt: skip
        assert ours["authorization"] == request.headers["Authorization"]
        assert ours["x-amz-date"] == request.headers["X-Amz-Date"]


def test_a_forked_child_and_a_dropped_keepalive_get_their_own_connection(
    s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection made before a fork is never shared with the child (its reads are
    correct and the parent's connection still works after), and a kept-alive connection
    the server closed is re-opened without a visible error."""
    import os
    import socket

    _fill(s3_env, s3_bucket, ["f/a", "f/b"])
    store = open_store(f"s3://{s3_bucket}/f")
    assert store.get_range("a", 0, 3) == b"f/a"  # the parent's connection is open now
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if its own reads are right
        ok = all(store.get_range(k, 0, 3) == f"f/{k}".encode() for k in "abab")
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.get_range("b", 0, 3) == b"f/b"
    conn = store._http._local.conn  # noqa: SLF001 - the kept-alive connection under test
    conn.sock.shutdown(socket.SHUT_RDWR)  # as a server's idle timeout would
    monkeypatch.setattr("kubetune.storage.s3_http._backoff", lambda attempt: pytest.fail("retried"))
    assert store.get_range("a", 1, 2) == b"/a"  # re-opened at once, not a retry
