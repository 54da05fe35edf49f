"""The dataset index beside the runs: a later run (another run name) on the same data reuses
it without reading a header, a changed object is rescanned alone, captions always come from
the current dataset — counted through the real S3 server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_fixtures import (
    image_bytes,
    lora_config,
    upload_tree,
    write_hf_dataset,
    write_jsonl,
)
from s3server import S3Server
from test_data_index import Reads, reads  # noqa: F401  (the counting fixture)

from kubetune.config.loader import output_uri
from kubetune.dataset.index import load_index, save_index, shared_index_key, shared_index_store
from kubetune.storage import open_store
from runner.data import preflight

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def s3_jsonl(s3_env: S3Server, s3_bucket: str, tmp_path: Path) -> str:
    write_jsonl(tmp_path / "ds", [(40, 24), (24, 40), (32, 32), (48, 16)])
    upload_tree(s3_env.client(), s3_bucket, "ds", tmp_path / "ds")
    return f"s3://{s3_bucket}/ds/data.jsonl"


def _run_cfg(jsonl: str, bucket: str, name: str) -> object:
    cfg = lora_config({"type": "IMAGE_CAPTION_JSONL_DATASET", "jsonl_path": jsonl})
    storage = {"bucket": bucket, "prefix": "team"}
    return type(cfg).model_validate(
        {**cfg.model_dump(), "base_output_dir": f"/out/{name}", "storage": storage}
    )


def _start(cfg: object) -> object:
    """What a run does at start and once loaded: preflight, then store both indexes."""
    run_store = open_store(output_uri(cfg), cfg.storage)  # type: ignore[attr-defined]
    shared = shared_index_store(cfg)
    report = preflight(cfg, run_store=run_store, shared_store=shared)
    save_index(run_store, report)
    assert shared is not None
    save_index(shared, report, shared_index_key(report.source))
    return report


def test_a_later_run_on_the_same_data_reads_no_header(
    s3_env: S3Server,
    s3_bucket: str,
    s3_jsonl: str,
    reads: Reads,  # noqa: F811
) -> None:
    first = _start(_run_cfg(s3_jsonl, s3_bucket, "run-a"))
    assert (first.reused, first.scanned) == (0, 4)
    shared = shared_index_store(_run_cfg(s3_jsonl, s3_bucket, "run-a"))
    assert shared is not None and shared.uri == f"s3://{s3_bucket}/team"
    reads.keys.clear()

    second = _start(_run_cfg(s3_jsonl, s3_bucket, "run-b"))  # a new run name, no run index
    assert (second.reused, second.scanned) == (4, 0)
    assert not [k for k in reads.keys if k.endswith(".jpg")]
    assert second.sizes_hw == first.sizes_hw

    new = image_bytes(20, 36, ".jpg", seed=7)  # one object changes: it alone is re-read
    s3_env.client().put_object(Bucket=s3_bucket, Key="ds/images/pic-001.jpg", Body=new)
    reads.keys.clear()
    third = _start(_run_cfg(s3_jsonl, s3_bucket, "run-c"))
    assert (third.reused, third.scanned) == (3, 1)
    assert [k for k in reads.keys if k.endswith(".jpg")] == ["images/pic-001.jpg"]
    assert third.sizes_hw[1] == (36, 20)


def test_captions_come_from_the_current_jsonl_not_the_index(
    s3_env: S3Server, s3_bucket: str, s3_jsonl: str, tmp_path: Path
) -> None:
    """A reused entry keeps its image's size; the caption of a JSONL line is the line's."""
    _start(_run_cfg(s3_jsonl, s3_bucket, "run-a"))
    rows = (tmp_path / "ds" / "data.jsonl").read_text().splitlines()
    edited = [json.dumps({**json.loads(r), "text": f"edited {i}"}) for i, r in enumerate(rows)]
    body = "\n".join(edited).encode()
    s3_env.client().put_object(Bucket=s3_bucket, Key="ds/data.jsonl", Body=body)
    again = _start(_run_cfg(s3_jsonl, s3_bucket, "run-b"))
    assert again.reused == 4
    assert [r.caption for r in again.source.records] == [f"edited {i}" for i in range(4)]


def test_hf_dataset_index_is_reused_until_the_dataset_changes(tmp_path: Path) -> None:
    """HF rows have no listing: the Arrow dataset's fingerprint versions every row."""
    write_hf_dataset(tmp_path / "hf", [(40, 24), (24, 40)])
    dataset = {"type": "HF_HUB_IMAGE_CAPTION_DATASET", "dataset_name": str(tmp_path / "hf")}
    cfg = lora_config(dataset)
    cfg = type(cfg).model_validate({**cfg.model_dump(), "base_output_dir": str(tmp_path / "r")})
    run_store = open_store(str(tmp_path / "r"))
    save_index(run_store, preflight(cfg, run_store=run_store))
    again = preflight(cfg, run_store=run_store)
    assert (again.reused, again.scanned) == (2, 0)
    assert load_index(run_store) is not None
    write_hf_dataset(tmp_path / "hf2", [(40, 24), (16, 16)])  # other content, other fingerprint
    dataset["dataset_name"] = str(tmp_path / "hf2")
    other = type(cfg).model_validate({**cfg.model_dump(), "data_loader": {
        **cfg.data_loader.model_dump(), "dataset": dataset}})  # fmt: skip
    changed = preflight(other, run_store=run_store)
    assert changed.scanned == 2 and changed.sizes_hw[1] == (16, 16)


@pytest.mark.parametrize("process", [True, False])
def test_start_preflight_runs_beside_the_caller_and_stores_nothing(
    tmp_path: Path, process: bool
) -> None:
    """`python -m runner` starts preflight before importing torch (a forked process, or a
    thread): the same report, a bad dataset's DataError re-raised by `.result()`, nothing
    written."""
    from kubetune.dataset.preflight import start_preflight
    from kubetune.errors import DataError

    write_jsonl(tmp_path / "ds", [(40, 24), (24, 40)])
    cfg = lora_config(
        {"type": "IMAGE_CAPTION_JSONL_DATASET", "jsonl_path": str(tmp_path / "ds/data.jsonl")}
    )
    cfg = type(cfg).model_validate({**cfg.model_dump(), "base_output_dir": str(tmp_path / "r")})
    report = start_preflight(cfg, process=process).result(timeout=60)
    direct = preflight(cfg)
    assert report.sizes_hw == direct.sizes_hw == [(24, 40), (40, 24)]
    assert report.source is not None and direct.source is not None
    assert report.source.records == direct.source.records
    assert not (tmp_path / "r").exists()
    (tmp_path / "ds/images/pic-001.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="pic-001"):
        start_preflight(cfg, process=process).result(timeout=60)


def test_a_refused_location_beside_the_runs_costs_only_the_reuse(
    s3_env: S3Server, s3_bucket: str, s3_jsonl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials that may write only under the run's own prefix: reading and writing the
    index beside the runs is refused (access denied), the run goes on and rescans."""
    from kubetune.dataset.index import save_shared_index

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env.readonly_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.readonly_secret_key)
    cfg = _run_cfg(s3_jsonl, s3_bucket, "run-a")
    shared = shared_index_store(cfg)
    report = preflight(cfg, shared_store=shared)
    save_shared_index(shared, report)  # refused: a warning, not a failure
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    refused = shared_index_store(cfg)  # a store whose reads are refused too
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env.readonly_access_key)
    assert preflight(cfg, shared_store=refused).scanned == 4


def _jsonl_cfg(tmp_path: Path) -> object:
    write_jsonl(tmp_path / "ds", [(40, 24), (24, 40), (32, 32)])
    cfg = lora_config(
        {"type": "IMAGE_CAPTION_JSONL_DATASET", "jsonl_path": str(tmp_path / "ds/data.jsonl")}
    )
    return type(cfg).model_validate({**cfg.model_dump(), "base_output_dir": str(tmp_path / "r")})


def test_forked_preflight_hands_back_every_bad_example(tmp_path: Path) -> None:
    """The forked process's error arrives whole: its type (exit 2), one-line message and the
    list of every bad example."""
    from kubetune.dataset.preflight import start_preflight
    from kubetune.errors import BadExamples

    cfg = _jsonl_cfg(tmp_path)
    for i in (0, 2):
        (tmp_path / f"ds/images/pic-{i:03d}.jpg").write_bytes(b"not an image")
    with pytest.raises(BadExamples) as err:
        start_preflight(cfg, process=True).result(timeout=60)
    assert err.value.exit_code == 2 and "(and 1 more bad examples)" in str(err.value)
    assert [("pic-000" in p, "pic-002" in p) for p in err.value.problems] == [
        (True, False),
        (False, True),
    ]


def test_a_preflight_process_that_dies_is_an_error_not_a_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed without a reply (e.g. out of memory): `.result()` raises an environment error
    (exit 1) with the exit code instead of waiting forever."""
    import os

    import kubetune.dataset.preflight as checks
    import kubetune.dataset.preflight_fork as fork
    from kubetune.errors import KubetuneError

    monkeypatch.setattr(fork, "run_preflight", lambda *_: os._exit(3))  # in the fork
    with pytest.raises(KubetuneError, match="exit code 3") as err:
        checks.start_preflight(_jsonl_cfg(tmp_path), process=True).result(timeout=60)
    assert err.value.exit_code == 1
