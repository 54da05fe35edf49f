"""Header checks beside training: a large dataset whose config needs no image size before
step 1 (no aspect-ratio buckets, nothing kept in memory) is handed to the run once listed;
its header checks end later with the same report, or the same one-line DataError naming the
bad file, as the preflight before step 1 gives. Real local datasets; the threshold
(`DEFERRED_CHECKS_MIN_EXAMPLES`) is lowered so that five images count as large."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from data_fixtures import lora_config, write_jsonl

import kubetune.dataset.preflight as checks
from kubetune.dataset.preflight import preflight, start_preflight
from kubetune.errors import DataError

SIZES = [(40, 24), (24, 40), (32, 32), (48, 16), (40, 24)]
BUCKETS = {"target_resolution": 32, "start_dim": 16, "end_dim": 64, "divisible_by": 16}


@pytest.fixture
def large(monkeypatch: pytest.MonkeyPatch) -> None:
    """Five examples are a large dataset (a forked preflight inherits the setting)."""
    monkeypatch.setattr(checks, "DEFERRED_CHECKS_MIN_EXAMPLES", 3)


def _cfg(tmp_path: Path, *, bad: bool = False, **loader: Any) -> Any:
    write_jsonl(tmp_path / "ds", SIZES)
    if bad:
        (tmp_path / "ds" / "images" / "pic-003.jpg").write_bytes(b"not an image at all")
    dataset = {"type": "IMAGE_CAPTION_JSONL_DATASET", "jsonl_path": str(tmp_path / "ds/data.jsonl")}
    cfg = lora_config(dataset, **loader)
    return cfg.model_copy(update={"base_output_dir": str(tmp_path / "run")})


@pytest.mark.usefixtures("large")
@pytest.mark.parametrize("process", [False, True], ids=["thread", "forked"])
def test_a_bad_header_fails_beside_training_with_the_preflights_error(
    tmp_path: Path, process: bool
) -> None:
    cfg = _cfg(tmp_path, bad=True)
    with pytest.raises(DataError) as eager:
        preflight(cfg)
    listed = start_preflight(cfg, process=process).result(timeout=60)
    assert listed.num_examples == len(SIZES) and listed.sizes_hw == []
    assert listed.source is not None and len(listed.source) == len(SIZES)
    assert listed.pending is not None
    with pytest.raises(DataError) as later:
        listed.pending.result(timeout=60)
    assert str(later.value) == str(eager.value)
    assert "pic-003.jpg" in str(later.value)


@pytest.mark.usefixtures("large")
@pytest.mark.parametrize("process", [False, True], ids=["thread", "forked"])
def test_a_good_dataset_checked_beside_training_gives_the_full_report(
    tmp_path: Path, process: bool
) -> None:
    cfg = _cfg(tmp_path)
    listed = start_preflight(cfg, process=process).result(timeout=60)
    assert listed.pending is not None and listed.index is None
    checked = listed.pending.result(timeout=60)
    assert checked.sizes_hw == [(h, w) for w, h in SIZES]
    assert checked.index is not None and len(checked.index) == len(SIZES)
    assert checked.source is not None and checked.source.name == listed.source.name


@pytest.mark.usefixtures("large")
@pytest.mark.parametrize(
    "loader",
    [{"aspect_ratio_buckets": BUCKETS}, {"dataset_keep_in_memory": True}],
    ids=["buckets", "keep_in_memory"],
)
def test_configs_needing_sizes_are_checked_before_step_1(
    tmp_path: Path, loader: dict[str, Any]
) -> None:
    keep = loader.pop("dataset_keep_in_memory", False)
    cfg = _cfg(tmp_path, bad=True, **loader)
    if keep:
        dataset = cfg.data_loader.dataset.model_copy(update={"keep_in_memory": True})
        cfg = cfg.model_copy(
            update={"data_loader": cfg.data_loader.model_copy(update={"dataset": dataset})}
        )
    with pytest.raises(DataError, match="pic-003.jpg"):
        start_preflight(cfg, process=False).result(timeout=60)


def test_a_small_dataset_is_checked_before_step_1(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="pic-003.jpg"):
        start_preflight(_cfg(tmp_path, bad=True), process=False).result(timeout=60)


@pytest.mark.usefixtures("large")
def test_the_loader_raises_the_checks_error_or_hands_on_the_report(tmp_path: Path) -> None:
    from runner.data import build_train_dataloader

    for bad in (True, False):
        cfg = _cfg(tmp_path / str(bad), bad=bad)
        listed = start_preflight(cfg, process=False).result(timeout=60)
        assert listed.pending is not None
        listed.pending.exception(timeout=60)  # the checks are over
        loader = build_train_dataloader(
            cfg, seed=0, batch_size=2, device_is_cuda=False, data=listed
        )
        got: list[Any] = []
        loader.on_checked = got.append
        if bad:
            with pytest.raises(DataError, match="pic-003.jpg"):
                next(iter(loader))
        else:
            next(iter(loader))
            assert len(got) == 1 and got[0].sizes_hw == [(h, w) for w, h in SIZES]


@pytest.mark.usefixtures("large")
def test_with_several_ranks_the_loader_leaves_the_verdict_to_settle(tmp_path: Path) -> None:
    """Several processes (`together` set): ended checks, or a bad example met, only mark the
    verdict due (no rank raises alone); `settle` raises the checks' error. Here `together`
    is a one-process `Ranks` (the 2-process runs are
    tests/test_runner/test_data_deferred_ranks.py)."""
    from types import SimpleNamespace

    from runner.data import build_train_dataloader
    from runner.training.distributed import Ranks

    cfg = _cfg(tmp_path, bad=True)
    listed = start_preflight(cfg, process=False).result(timeout=60)
    assert listed.pending is not None
    listed.pending.exception(timeout=60)  # the checks are over
    loader = build_train_dataloader(cfg, seed=0, batch_size=2, device_is_cuda=False, data=listed)
    loader.together = Ranks(SimpleNamespace(process_index=0, num_processes=1,  # type: ignore[arg-type]
                                             is_main_process=True, device="cpu"))  # fmt: skip
    for _ in zip(range(3), iter(loader), strict=False):  # every image drawn: none raises
        pass
    assert loader.verdict_due and loader.bad
    with pytest.raises(DataError, match="pic-003.jpg"):
        loader.settle()
    assert loader.checks is None and not loader.verdict_due


@pytest.mark.usefixtures("large")
def test_forked_checks_beside_training_run_at_a_lower_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once training has the listed report, the forked checks yield the CPU to it: the
    header checks run niced (the niceness is read where they run, in the fork)."""
    import os
    from dataclasses import replace

    real = checks._header_checks

    def niceness_noted(*args: Any) -> Any:
        report, errors = real(*args)
        return replace(report, reused=os.nice(0)), errors

    monkeypatch.setattr(checks, "_header_checks", niceness_noted)
    mine = os.nice(0)
    listed = start_preflight(_cfg(tmp_path), process=True).result(timeout=60)
    assert listed.pending is not None
    assert listed.pending.result(timeout=60).reused >= min(19, mine + checks.CHECKS_NICENESS)
    assert os.nice(0) == mine


def test_forked_checks_die_with_the_run(tmp_path: Path) -> None:
    """A run killed (SIGKILL) while its header checks go on beside training: the forked
    preflight dies with it instead of reading headers for nobody."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg = _cfg(tmp_path)
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    script = f"""
import sys, time, multiprocessing
import kubetune.dataset.preflight as checks
from kubetune.config import SdLoraConfig
checks.DEFERRED_CHECKS_MIN_EXAMPLES = 3
real = checks._header_checks
checks._header_checks = lambda *a: (time.sleep(120), real(*a))[1]  # checks that go on
cfg = SdLoraConfig.model_validate_json(open({str(tmp_path / "cfg.json")!r}).read())
listed = checks.start_preflight(cfg, process=True).result(timeout=60)
print(multiprocessing.active_children()[0].pid, flush=True)
time.sleep(120)
"""
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert run.stdout is not None
        child = int(run.stdout.readline())
        os.kill(child, 0)  # running
    finally:
        run.kill()
        run.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the forked preflight outlived the run")
