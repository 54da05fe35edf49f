"""Reusing a stored dataset index whole: a restart (or a later run) whose listing is unchanged
takes every size from one index file, in record order, without per-example lookups or a
second index read; any change in the listing falls back to per-example reuse. Local stores
(the same code path as S3 once listed; the S3 listing itself is covered in
test_data_index.py)."""

from __future__ import annotations

import gzip
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from data_fixtures import image_bytes, lora_config, write_image_dir, write_jsonl

from kubetune.dataset.buckets import assign_buckets, build_buckets, closest_bucket
from kubetune.dataset.index import (
    INDEX_KEY,
    DataIndex,
    listing_digest,
    save_index,
    shared_index_key,
)
from kubetune.dataset.preflight import preflight
from kubetune.storage import open_store

SIZES = [(40, 24), (24, 40), (32, 32), (48, 16), (40, 24)]


class CountingStore:
    """A real store whose whole-object reads are counted (keys only; the reads still happen)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.reads = inner, Counter[str]()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def get_bytes(self, key: str) -> bytes:
        self.reads[key] += 1
        return self.inner.get_bytes(key)


def _jsonl_cfg(root: Path, tmp_path: Path, name: str = "run") -> Any:
    write_jsonl(root, SIZES)
    cfg = lora_config(
        {"type": "IMAGE_CAPTION_JSONL_DATASET", "jsonl_path": str(root / "data.jsonl")}
    )
    return cfg.model_copy(update={"base_output_dir": str(tmp_path / name)})


def _stores(tmp_path: Path) -> tuple[CountingStore, CountingStore]:
    return (
        CountingStore(open_store(str(tmp_path / "run"))),
        CountingStore(open_store(str(tmp_path / "shared"))),
    )


def _first_run(cfg: Any, run: CountingStore, shared: CountingStore) -> Any:
    report = preflight(cfg, run_store=run, shared_store=shared)
    save_index(run, report)
    save_index(shared, report, shared_index_key(report.source))
    run.reads.clear()
    shared.reads.clear()
    return report


def test_a_restart_with_an_unchanged_listing_reads_one_index(tmp_path: Path) -> None:
    cfg = _jsonl_cfg(tmp_path / "ds", tmp_path)
    run, shared = _stores(tmp_path)
    first = _first_run(cfg, run, shared)
    again = preflight(cfg, run_store=run, shared_store=shared)
    assert (again.reused, again.scanned) == (len(SIZES), 0)
    assert again.sizes_hw == first.sizes_hw == [(h, w) for w, h in SIZES]
    assert run.reads[INDEX_KEY] == 1
    assert not shared.reads  # the run's own index matched: the one beside the runs is not read


def test_a_later_run_takes_the_shared_index_whole(tmp_path: Path) -> None:
    cfg = _jsonl_cfg(tmp_path / "ds", tmp_path)
    run, shared = _stores(tmp_path)
    first = _first_run(cfg, run, shared)
    later = CountingStore(open_store(str(tmp_path / "later")))
    report = preflight(cfg, run_store=later, shared_store=shared)
    assert (report.reused, report.scanned) == (len(SIZES), 0)
    assert report.sizes_hw == first.sizes_hw
    assert report.index is not None and report.index.digest == listing_digest(report.source)


def test_a_changed_listing_falls_back_to_per_example_reuse(tmp_path: Path) -> None:
    cfg = _jsonl_cfg(tmp_path / "ds", tmp_path)
    run, shared = _stores(tmp_path)
    _first_run(cfg, run, shared)
    (tmp_path / "ds" / "images" / "pic-002.jpg").write_bytes(image_bytes(20, 36, ".jpg", seed=9))
    changed = preflight(cfg, run_store=run, shared_store=shared)
    assert (changed.reused, changed.scanned) == (len(SIZES) - 1, 1)
    assert changed.sizes_hw[2] == (36, 20)
    assert changed.index is not None and changed.index.digest == listing_digest(changed.source)


def test_inline_captions_come_from_the_current_jsonl_on_whole_reuse(tmp_path: Path) -> None:
    cfg = _jsonl_cfg(tmp_path / "ds", tmp_path)
    run, shared = _stores(tmp_path)
    _first_run(cfg, run, shared)
    path = tmp_path / "ds" / "data.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["text"] = "a caption edited after the first run"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = preflight(cfg, run_store=run, shared_store=shared)
    assert again.reused == len(SIZES)
    assert again.source is not None
    assert again.source.records[1].caption == "a caption edited after the first run"


def test_caption_files_text_comes_from_the_index_on_whole_reuse(tmp_path: Path) -> None:
    captions = write_image_dir(tmp_path / "d", [(40, 20), (20, 30)])
    cfg = lora_config({"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": str(tmp_path / "d")})
    run, shared = _stores(tmp_path)
    _first_run(cfg, run, shared)
    again = preflight(cfg, run_store=run, shared_store=shared)
    assert again.reused == 2 and again.source is not None
    assert [r.caption for r in again.source.records] == list(captions.values())
    assert all(r.caption_key is None for r in again.source.records)


def test_an_index_stored_in_the_first_format_is_still_reused(tmp_path: Path) -> None:
    """Runs indexed before the whole-index format: their file (version 1, rows of entries)
    is read and reused entry by entry."""
    cfg = _jsonl_cfg(tmp_path / "ds", tmp_path)
    run, shared = _stores(tmp_path)
    first = _first_run(cfg, run, shared)
    assert first.index is not None
    rows = [[s, k, e.size, e.etag, e.height, e.width, e.caption, e.caption_etag]
            for (s, k), e in first.index.entries.items()]  # fmt: skip
    old = gzip.compress(json.dumps({"version": 1, "entries": rows}).encode())
    run.inner.put_bytes(INDEX_KEY, old)
    assert DataIndex.from_bytes(old).entries == first.index.entries
    again = preflight(cfg, run_store=run)
    assert (again.reused, again.scanned) == (len(SIZES), 0)
    assert again.sizes_hw == first.sizes_hw


def test_bucket_assignment_equals_closest_bucket_per_image() -> None:
    from kubetune.config.data import AspectRatioBucketConfig

    buckets = build_buckets(
        AspectRatioBucketConfig(target_resolution=512, start_dim=256, end_dim=1024, divisible_by=64)
    )
    rng = random.Random(3)
    sizes = [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(2000)]
    sizes += sizes[:500] + [(512, 512), (256, 1024), (1024, 256)]
    assert assign_buckets(sizes, buckets) == [closest_bucket(s, buckets) for s in sizes]


def test_a_source_crosses_a_process_boundary_whole(tmp_path: Path) -> None:
    """The preflight process hands its source over pickled (records as tuples): the same
    records, stores and name come out, and the listing digest with them."""
    import pickle

    cfg = _jsonl_cfg(tmp_path / "ds", tmp_path)
    source = preflight(cfg).source
    assert source is not None
    copy = pickle.loads(pickle.dumps(source))
    assert copy.records == source.records and copy.name == source.name
    assert [ref.uri for ref in copy.stores] == [ref.uri for ref in source.stores]
    assert copy.digest() == source.digest()


def test_the_stored_form_is_made_once_for_both_copies(tmp_path: Path) -> None:
    """A run stores its index twice (with the run, beside the runs): one serialisation."""
    cfg = _jsonl_cfg(tmp_path / "ds", tmp_path)
    index = preflight(cfg).index
    assert index is not None
    data = index.to_bytes()
    assert index.to_bytes() is data
    assert DataIndex.from_bytes(data).entries == index.entries
