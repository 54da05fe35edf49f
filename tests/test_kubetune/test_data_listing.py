"""The listing of a JSONL dataset's folder in parallel ranges (kubetune.dataset.listing): equal to
the sequential listing over many small pages, odd keys, keys the JSONL does not name, a
named key that is missing and cut points that SeaweedFS lists out of sorted order — against
the real server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from data_fixtures import lora_config, upload_tree, write_jsonl
from s3server import S3Server
from test_storage_reads import ODD_KEYS, _fill

from kubetune.dataset.listing import cut_points, list_known
from kubetune.storage import ObjectInfo, open_store
from kubetune.storage.cloud import CloudStore
from runner.data import preflight

pytestmark = pytest.mark.timeout(120)
# '-' sorts before '/', but SeaweedFS lists a folder's entries by name ("a" < "a-b.jpg"), so
# "many/a/b.jpg" comes before "many/a-b.jpg" in its listing
NESTED = ["many/a-b.jpg", "many/a/b.jpg", "many/a/c/d.jpg", "many/a.jpg", "many/a0.jpg"]
ODD = [f"many/{k}" for k in ODD_KEYS]


class Ranges:
    """Counts the ranges listed and the whole listings (the calls go to the real store)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str | None, str | None]] = []
        self.whole = 0
        real_range, real_list = CloudStore.list_range, CloudStore.list
        lock = threading.Lock()

        def counted(store: CloudStore, prefix: str, after: str | None,
                    until: str | None) -> Iterator[ObjectInfo]:  # fmt: skip
            with lock:
                self.calls.append((after, until))
            return real_range(store, prefix, after, until)

        def whole(store: CloudStore, prefix: str = "") -> Iterator[ObjectInfo]:
            self.whole += 1
            return real_list(store, prefix)

        monkeypatch.setattr(CloudStore, "list_range", counted)
        monkeypatch.setattr(CloudStore, "list", whole)


def _rows(infos: list[ObjectInfo]) -> list[tuple[str, int, str | None]]:
    return [(i.key, i.size, i.etag) for i in infos]


def test_cut_points_split_the_sorted_keys_evenly() -> None:
    keys = [f"k{i:02d}" for i in range(10)][::-1] + ["k03"]
    assert cut_points(keys, 2) == ["k04"]
    assert cut_points(keys, 3) == ["k03", "k06"]
    assert cut_points(["b", "a"], 8) == ["a"]
    assert cut_points(["a"], 8) == []


@pytest.mark.slow
def test_parallel_ranges_equal_the_sequential_listing(
    s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    named = [f"many/img-{i:05d}.jpg" for i in range(1103)] + ODD + NESTED
    unnamed = ["many/zz-not-in-jsonl.jpg", "many/img-00500b.jpg", "many/0-first.jpg"]
    _fill(s3_env, s3_bucket, named + unnamed + ["other/x.jpg"])
    store = open_store(f"s3://{s3_bucket}", page_size=37)
    sequential = _rows(list(store.list("many/")))
    assert len(sequential) == len(named) + len(unnamed)
    ranges = Ranges(monkeypatch)
    assert _rows(list_known(store, "many/", named)) == sequential
    assert len(ranges.calls) == 8  # bounded: 8 ranges at most, whatever the page count
    assert ranges.whole == 0  # the ranges alone gave the listing
    ranges.calls.clear()
    gone = named + ["many/img-gone.jpg"]  # a named key that is missing: listed again whole
    assert _rows(list_known(store, "many/", gone, workers=4)) == sequential
    assert (len(ranges.calls), ranges.whole) == (4, 1)


def test_cut_points_out_of_the_servers_order_still_give_its_listing(
    s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One key per page: 8 ranges cut at 7 of the 12 keys, among them "a.jpg" then
    "a/b.jpg", which the server lists before "a.jpg" (that range runs to the end)."""
    _fill(s3_env, s3_bucket, ODD + NESTED)
    store = open_store(f"s3://{s3_bucket}/many", page_size=1)
    sequential = _rows(list(store.list()))
    keys = [k[len("many/") :] for k in ODD + NESTED]
    assert cut_points(keys, 8)[:2] == ["a.jpg", "a/b.jpg"]
    ranges = Ranges(monkeypatch)
    assert _rows(list_known(store, "", keys)) == sequential
    assert (len(ranges.calls), ranges.whole) == (8, 0)


def test_a_large_s3_jsonl_is_listed_in_ranges_with_the_same_records(
    s3_env: S3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kubetune.dataset.fetching as fetching

    write_jsonl(tmp_path / "ds", [(16 + i % 5, 16) for i in range(30)])
    upload_tree(s3_env.client(), s3_bucket, "ds", tmp_path / "ds")
    cfg = lora_config(
        {"type": "IMAGE_CAPTION_JSONL_DATASET", "jsonl_path": f"s3://{s3_bucket}/ds/data.jsonl"}
    )
    whole = preflight(cfg)
    assert whole.source is not None
    ranges = Ranges(monkeypatch)
    monkeypatch.setattr(fetching, "open_store", lambda u, s=None: open_store(u, s, page_size=4))
    split = preflight(cfg)
    assert (len(ranges.calls), ranges.whole) == (8, 0) and split.source is not None
    assert split.source.records == whole.source.records
    assert {r.etag for r in split.source.records} != {None}
