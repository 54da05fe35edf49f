"""`dataloader_num_workers` really overlaps fetch + decode with the step: worker processes
(not the main one) read the examples of later batches while the main process is inside the
step of an earlier one. Proved with an ordering log, not with timings."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
from data_fixtures import lora_config, write_image_dir

from kubetune.dataset.sources import RawExample, Source
from runner.data import build_train_dataloader, preflight

pytestmark = pytest.mark.timeout(120)


class LoggedSource(Source):
    """A real Source that appends "<pid> <index>" to a log file on every fetch (the worker
    that fetches an example also decodes it). Instrumentation only: bytes come from disk."""

    log_path: str = ""

    def fetch(self, index: int) -> RawExample:
        raw = super().fetch(index)
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"{os.getpid()} {index}\n")
        return raw


def _fetched(log_path: Path) -> list[tuple[int, int]]:
    if not log_path.exists():
        return []
    lines = log_path.read_text(encoding="utf-8").splitlines()
    return [(int(a), int(b)) for a, b in (line.split() for line in lines if line.count(" ") == 1)]


def _later(log_path: Path, handed: set[int]) -> set[int]:
    """Examples fetched that belong to no batch handed out yet."""
    return {i for _, i in _fetched(log_path)} - handed


def _wait_for(condition: object, deadline_s: float = 60.0) -> bool:
    """Poll `condition` (bounded); True once it holds."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_workers_fetch_and_decode_later_batches_during_the_step(tmp_path: Path) -> None:
    write_image_dir(tmp_path / "d", [(40, 40)] * 16)
    cfg = lora_config(
        {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": str(tmp_path / "d")},
        dataloader_num_workers=2,
    )
    report = preflight(cfg)
    assert report.source is not None
    logged = LoggedSource(report.source.name, report.source.records, report.source.stores)
    logged.log_path = str(tmp_path / "fetch.log")
    loader = build_train_dataloader(
        cfg, seed=0, batch_size=2, device_is_cuda=False, data=replace(report, source=logged)
    )
    ids = [r.id for r in logged.records]
    handed: set[int] = set()
    overlapped = 0
    for step, batch in enumerate(loader):
        handed |= {ids.index(i) for i in batch["id"]}
        # "inside step N": the main process holds batch N and does not ask for more; a worker
        # must meanwhile fetch an example of a batch not yet handed out
        seen = set(handed)
        overlapped += _wait_for(lambda: bool(_later(tmp_path / "fetch.log", seen)))  # noqa: B023
        if step == 3:
            break
    pids = {pid for pid, _ in _fetched(tmp_path / "fetch.log")}
    assert os.getpid() not in pids and len(pids) == 2  # two worker processes, never the main
    assert overlapped == 4  # at every step of the four, a later batch was being read
