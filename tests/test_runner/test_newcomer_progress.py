"""What a person watching a run sees (issue #27 items 2 and 5): progress.json refreshed at
every log line of a local run, one epoch numbering (counted from 1) in the log, progress.json
and the history; an ETA and img/s from training time only; a terminal bar only where there
is a terminal; the phase lines of a real run; plain words for the lease; the fp16-variant
warning only for hub models; the report says whether the run resumed and shows the dataset."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from train_support import make_config, train, write_dataset

from kubetune.layout import PROGRESS_KEY, ProgressRecord
from kubetune.storage import open_store
from runner.reporting.history import read_history
from runner.reporting.progress import ProgressReporter, ProgressSettings, write_interval
from runner.reporting.report_html import ReportData, render
from runner.reporting.terminal import wants_bar


def _reporter(tmp_path: Path, **settings: object) -> ProgressReporter:
    store = open_store(str(tmp_path / "run"))
    fields = {"total_steps": 10, "steps_per_epoch": 3, "log_every_n_steps": 2, **settings}
    return ProgressReporter(ProgressSettings(**fields), store)  # type: ignore[arg-type]


def _progress(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run" / PROGRESS_KEY).read_text())


def test_a_local_run_writes_progress_at_every_log_line(tmp_path: Path) -> None:
    assert write_interval(str(tmp_path)) == 0.0 and write_interval("s3://b/run") == 30.0
    reporter = _reporter(tmp_path, write_every_s=write_interval(str(tmp_path)))
    for step in (1, 2, 3, 4):
        reporter.update(step, 0 if step <= 3 else 1, torch.tensor(0.5), 1e-3, 2)
        reporter._wait_upload()  # the background upload of this log line, if any
        if step % 2 == 0:
            assert _progress(tmp_path)["step"] == step
    reporter.finish("completed")


def test_one_epoch_numbering(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "runner.reporting.progress")
    reporter = _reporter(tmp_path, write_every_s=0.0)
    for step in (1, 2):
        reporter.update(step, 0, torch.tensor(0.5), 1e-3, 2)  # the loader's first epoch
    reporter.finish("running")
    assert "step 2/10 epoch 1 " in caplog.text
    assert _progress(tmp_path)["epoch"] == 1
    assert [r["epoch"] for r in read_history(open_store(str(tmp_path / "run")))] == [1]


def test_eta_and_throughput_leave_validation_out(tmp_path: Path) -> None:
    reporter = _reporter(tmp_path, write_every_s=0.0)
    reporter.update(1, 0, torch.tensor(0.5), 1e-3, 2)
    with reporter.paused():  # what the loop wraps validation in
        time.sleep(1.0)
    reporter.update(2, 0, torch.tensor(0.5), 1e-3, 2)
    record = reporter.record
    assert record.eta_seconds is not None and record.eta_seconds < 1.0  # 8 steps left
    assert record.images_per_second is not None and record.images_per_second > 4.0
    reporter.finish("completed")


def test_a_bar_only_at_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not wants_bar()  # pytest's stderr is not a terminal
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert wants_bar()
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert not wants_bar()  # in a pod: plain log lines
    reporter = _reporter(tmp_path, bar=True, write_every_s=0.0)
    for step in range(1, 11):
        reporter.update(step, 0, torch.tensor(0.5), 1e-3, 2)
    reporter.finish("completed")
    err = capsys.readouterr().err
    assert "training" in err and "10/10" in err and "loss 0.5000" in err


def test_the_report_says_resumed_and_shows_the_dataset() -> None:
    progress = ProgressRecord(step=30, total_steps=40, resumed_from=14, dataset_examples=6,
                              dataset_buckets={"64x64": 6}).model_dump()  # fmt: skip
    page = render(ReportData(run="r", pipeline_type="SD_LORA", state="completed",
                             output_uri="/o", progress=progress))  # fmt: skip
    assert "yes: from checkpoint step-000014 (step 14)" in page
    assert "6 examples in 1 bucket (64x64: 6)" in page
    fresh = render(ReportData(run="r", pipeline_type="SD_LORA", state="completed",
                              output_uri="/o", progress={"step": 1}))  # fmt: skip
    assert "no: this attempt started at step 0" in fresh


def test_a_real_run_says_what_it_does(
    tmp_path: Path, tiny_sd_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Phase lines (model loading, device, dataset, validation start and end), the lease in
    plain words, no fp16-variant warning for a local model folder; the dataset summary is in
    progress.json."""
    caplog.set_level(logging.DEBUG)
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "out" / "talk"
    cfg = make_config("SD_LORA", tiny_sd_dir, data, out, hf_variant="fp16",
                      validate_every_n_steps=2, validation_prompts=["a kbtn"],
                      num_validation_images_per_prompt=1)  # fmt: skip
    train(cfg)
    text = caplog.text
    for line in (f"loading the base model {tiny_sd_dir} (float32 weights) on cpu",
                 "base model loaded in", "dataset: 4 examples in 1 bucket (64x64: 4)",
                 "validation at step 2: generating images for 1 prompt",
                 "validation at step 2 done in", "is now the run's only writer"):  # fmt: skip
        assert line in text, line
    assert "holding the run lease" not in text
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [w for w in warnings if "variant" in w], warnings
    record = json.loads((out / PROGRESS_KEY).read_text())
    assert record["dataset_examples"] == 4 and record["dataset_buckets"] == {"64x64": 4}


def test_the_log_line_and_launcher_status_write_the_eta_alike(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One duration format (`kubetune.humanize.duration`): the runner's log line, progress
    summary (`launcher status`, the UI) and report.html all write the same ETA."""
    import re

    from kubetune.humanize import duration

    caplog.set_level(logging.INFO, "runner.reporting.progress")
    reporter = _reporter(tmp_path, write_every_s=0.0)
    for step in (1, 2):
        reporter.update(step, 0, torch.tensor(0.5), 1e-3, 2)
    reporter.finish("running")
    record = reporter.record
    assert record.eta_seconds is not None
    logged = re.search(r" ETA (\S+)$", caplog.records[-1].getMessage())
    assert logged is not None and logged.group(1) == duration(record.eta_seconds)
    assert record.summary().endswith(f"ETA {duration(record.eta_seconds)}")
    data = ReportData("r", "SD_LORA", "running", str(tmp_path), progress=record.model_dump())
    page = render(data)
    assert f"<th>ETA</th><td>{duration(record.eta_seconds)}</td>" in page


def test_ctrl_c_in_the_foreground_says_how_to_go_on(tmp_path: Path) -> None:
    """`python -m runner CONFIG` stopped with Ctrl-C said only `kubetune: interrupted`: not
    that nothing was checkpointed then, nor that running it again resumes."""
    import os
    import signal
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parents[2]
    data = yaml.safe_load((root / "examples" / "quickstart.yaml").read_text())
    data["base_output_dir"] = str(tmp_path / "out")
    data["data_loader"]["dataset"]["dataset_dir"] = str(root / "examples" / "sample_data")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {**os.environ, "KUBETUNE_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "runner", str(config)], env=env,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:  # the first log line: training is still far off
        if "checking the dataset" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, rest
    assert "kubetune: interrupted (Ctrl-C)" in rest and "resumes from its newest checkpoint" in rest
