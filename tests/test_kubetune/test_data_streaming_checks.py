"""Header checks that stream sizes to the run (`aspect_ratio_buckets.order: streaming`, a
large dataset): the run gets the listed report with a `SizeFeed`, asks for an epoch's order,
and the feed fills as the headers are read, ending with the preflight's own sizes (or its
one-line DataError); reads follow the order asked for, also when it changes mid-way. Real
local and SeaweedFS datasets; the threshold is lowered so that five images count as large."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from data_fixtures import lora_config, upload_tree, write_jsonl
from s3server import S3Server

import kubetune.dataset.preflight as checks
from kubetune.dataset.headers import header_sizes_async
from kubetune.dataset.preflight import list_dataset, preflight, start_preflight
from kubetune.dataset.size_feed import ReadQueue
from kubetune.errors import DataError

pytestmark = pytest.mark.timeout(120)
SIZES = [(40, 24), (24, 40), (32, 32), (48, 16), (40, 24), (16, 48)]
STREAMING = {
    "target_resolution": 32,
    "start_dim": 16,
    "end_dim": 64,
    "divisible_by": 16,
    "order": "streaming",
}


@pytest.fixture
def large(monkeypatch: pytest.MonkeyPatch) -> None:
    """Six examples are a large dataset (a forked preflight inherits the setting)."""
    monkeypatch.setattr(checks, "DEFERRED_CHECKS_MIN_EXAMPLES", 3)


def _cfg(root: str, tmp_path: Path) -> Any:
    dataset = {"type": "IMAGE_CAPTION_JSONL_DATASET", "jsonl_path": f"{root}/data.jsonl"}
    cfg = lora_config(dataset, aspect_ratio_buckets=STREAMING)
    return cfg.model_copy(update={"base_output_dir": str(tmp_path / "run")})


@pytest.mark.usefixtures("large")
@pytest.mark.parametrize("process", [False, True], ids=["thread", "forked"])
def test_sizes_stream_into_the_feed_and_end_as_the_preflights(
    tmp_path: Path, process: bool
) -> None:
    write_jsonl(tmp_path / "ds", SIZES)
    cfg = _cfg(str(tmp_path / "ds"), tmp_path)
    listed = start_preflight(cfg, process=process).result(timeout=60)
    assert listed.streamed and listed.feed is not None and listed.sizes_hw == []
    listed.feed.want(7, 0)  # what the sampler asks first; harmless once all are read
    assert listed.pending is not None
    report = listed.pending.result(timeout=60)
    eager = preflight(cfg)
    assert report.sizes_hw == eager.sizes_hw == [(h, w) for w, h in SIZES]
    assert listed.feed.complete
    assert [listed.feed.get(i) for i in range(len(SIZES))] == eager.sizes_hw


@pytest.mark.usefixtures("large")
def test_a_bad_header_fails_the_streamed_checks_with_the_preflights_error(
    tmp_path: Path,
) -> None:
    write_jsonl(tmp_path / "ds", SIZES)
    (tmp_path / "ds" / "images" / "pic-003.jpg").write_bytes(b"not an image at all")
    cfg = _cfg(str(tmp_path / "ds"), tmp_path)
    with pytest.raises(DataError) as eager:
        preflight(cfg)
    listed = start_preflight(cfg, process=True).result(timeout=60)
    assert listed.pending is not None and listed.feed is not None
    with pytest.raises(DataError) as later:
        listed.pending.result(timeout=60)
    assert str(later.value) == str(eager.value) and "pic-003.jpg" in str(later.value)
    assert listed.feed.known(3) == (0, 0)  # streamed as unreadable before the error


def test_header_reads_follow_the_order_asked_even_when_it_changes(
    s3_env: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    write_jsonl(tmp_path / "ds", SIZES)
    upload_tree(s3_env.client(), s3_bucket, "ds", tmp_path / "ds")
    source, _ = list_dataset(_cfg(f"s3://{s3_bucket}/ds", tmp_path))
    n = len(SIZES)
    queue = ReadQueue(range(n))
    queue.reorder([5, 4, 3, 2, 1, 0])
    seen: list[int] = []

    def on_size(i: int, size: object) -> None:
        seen.append(i)
        if len(seen) == 2:
            queue.reorder([0, 1, 2, 3, 4, 5])  # another epoch asked for: the rest in its order

    sizes = header_sizes_async(source, range(n), 10**8, in_flight=1, order=queue, on_size=on_size)
    assert seen == [5, 4, 0, 1, 2, 3]
    assert sizes == [(h, w) for w, h in SIZES]
