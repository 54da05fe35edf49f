"""The streaming bucket order across a preemption with a change of processes (``torchrun``,
gloo, CPU, ``builtin:tiny-sd``, 11 images of mixed sizes, global batch 2, 12 steps: two
epochs and a half): a run on 2 processes stopped by SIGTERM mid-epoch and resumed on 1 (and
the reverse) takes, step for step, the global batches of an uninterrupted run; so does one
whose header checks run beside training (`DEFERRED_CHECKS_MIN_EXAMPLES` lowered in every
process by a ``sitecustomize``), where the batches are formed as the sizes stream in, also
with two loader workers per process.

The ``sitecustomize`` holds the test's one fake, which only observes: every batch a rank's
loader hands to training is appended (rank, example indices) to a log."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from data_fixtures import write_image_dir
from dp_support import THRESHOLD_SITE, deferred_min, env, finish, site_folder, torchrun_cmd
from train_support import caption_loader, config_file, make_config, streaming_loader

from kubetune.errors import EXIT_PREEMPTED

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
BOUND_S = 240
STEPS = 12
SIZES = [(64, 64), (96, 48), (48, 96), (64, 64), (128, 64), (96, 48), (64, 64), (48, 96),
         (64, 128), (64, 64), (96, 48)]  # fmt: skip
SITE = """
import json, time
_checks = checks._header_checks

def _delayed(*args, **kwargs):
    time.sleep(float(os.environ.get("CHECKS_DELAY", "0")))  # still running at the SIGTERM
    return _checks(*args, **kwargs)

checks._header_checks = _delayed

import runner.data.loader as loader

_iter = loader.ResumableLoader.__iter__

def _observed(self):
    for batch in _iter(self):
        with open(os.environ["OBSERVED_LOG"], "a") as log:
            log.write(json.dumps([os.environ.get("RANK", "0"), batch["index"]]) + "\\n")
        yield batch

loader.ResumableLoader.__iter__ = _observed
"""
"""What follows ``THRESHOLD_SITE`` in the workers' ``sitecustomize``."""


def _config(
    tmp_path: Path,
    name: str,
    per_process: int,
    workers: int = 0,
    streaming: bool = True,
    **fields: Any,
) -> Path:
    data = tmp_path / "data"
    if not data.exists():
        write_image_dir(data, SIZES)
    loader = streaming_loader if streaming else caption_loader
    cfg = make_config("SD_LORA", Path("builtin:tiny-sd"), data, tmp_path / name,
                      data_loader=loader(data, dataloader_num_workers=workers),
                      train_batch_size=per_process, max_train_steps=STEPS,
                      save_every_n_steps=100, **fields)  # fmt: skip
    return config_file(cfg, tmp_path / f"{name}-{per_process}.yaml")


def _start(
    config: Path, procs: int, site: Path, log: Path, cache: Path, deferred: bool, delay: float = 0
) -> Any:
    cmd = [sys.executable, "-m", "runner", str(config)]
    if procs > 1:
        cmd = torchrun_cmd(config, nproc=procs)
    extra = {"OBSERVED_LOG": str(log), **deferred_min(deferred),
             "KUBETUNE_MODEL_CACHE": str(cache), "CHECKS_DELAY": str(delay)}  # fmt: skip
    return subprocess.Popen(
        cmd, env=env(site, **extra), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        text=True, start_new_session=True,
    )  # fmt: skip


def _wait(proc: Any) -> tuple[int, str]:
    err = finish(proc, BOUND_S, "the run")
    return proc.returncode, err


def _global_batches(log: Path, procs: int) -> list[list[int]]:
    """The k-th batch of every rank together: the run's k-th global batch (as far as every
    rank got: a preempted rank may have taken one batch more than another)."""
    per_rank: dict[str, list[list[int]]] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        rank, indices = json.loads(line)
        per_rank.setdefault(rank, []).append(indices)
    if len(per_rank) < procs:  # a rank has not taken its first batch yet
        return []
    steps = zip(*per_rank.values(), strict=False)
    return [sorted({i for part in step for i in part}) for step in steps]


@pytest.mark.parametrize(
    ("first", "then", "deferred", "workers"),
    [(2, 1, True, 0), (1, 2, True, 0), (2, 1, False, 0), (2, 1, True, 2)],
    ids=["2-then-1-streamed", "1-then-2-streamed", "2-then-1-checked-first", "2-workers"],
)
def test_a_preempted_streaming_run_resumes_with_the_batches_of_an_uninterrupted_one(
    tmp_path: Path, tiny_sd_cache: Path, first: int, then: int, deferred: bool, workers: int
) -> None:
    site = site_folder(tmp_path / "site", THRESHOLD_SITE, SITE)
    ref_log, cut_log, rest_log = (tmp_path / f"{n}.log" for n in ("ref", "cut", "rest"))
    ref = _start(_config(tmp_path, "ref", 2), 1, site, ref_log, tiny_sd_cache, deferred)
    rc, err = _wait(ref)
    assert rc == 0, err[-3000:]
    expected = _global_batches(ref_log, 1)
    assert len(expected) == STEPS

    cut = _start(_config(tmp_path, "run", 2 // first, workers), first, site, cut_log,
                 tiny_sd_cache, deferred)  # fmt: skip
    deadline = time.monotonic() + BOUND_S
    while len(_global_batches(cut_log, first)) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    cut.send_signal(signal.SIGTERM)  # torchrun's agent passes it on to its workers
    rc, cut_err = _wait(cut)
    before = _global_batches(cut_log, first)
    assert rc != 0 and len(before) < STEPS, cut_err[-3000:]  # preempted mid-run
    assert first > 1 or rc == EXIT_PREEMPTED, cut_err[-3000:]

    rest = _start(_config(tmp_path, "run", 2 // then, workers), then, site, rest_log,
                  tiny_sd_cache, deferred)  # fmt: skip
    rc, err = _wait(rest)
    assert rc == 0, err[-3000:]
    assert "resumed from checkpoint step-" in err, (cut_err[-3000:], err[-3000:])
    done = int(err.split("resumed from checkpoint step-")[1][:6])
    assert 0 < done <= len(before) < STEPS, err[-3000:]
    after = _global_batches(rest_log, then)
    assert before[:done] + after == expected, (done, before, after, expected)


def test_a_run_preempted_while_its_header_checks_run_stops_as_preempted(
    tmp_path: Path, tiny_sd_cache: Path
) -> None:
    """2 processes, checks beside training held back 30 s (no buckets: training starts
    without them), 2 batches a step: torchrun passes the SIGTERM to each rank's whole
    process group (rank 0's forked preflight included); the run still stops as preempted
    with its stop checkpoint (not 'the data preflight process gave no result') and
    resumes from it."""
    site = site_folder(tmp_path / "site", THRESHOLD_SITE, SITE)
    cut_log, rest_log = tmp_path / "cut.log", tmp_path / "rest.log"
    config = _config(tmp_path, "run", 1, streaming=False, gradient_accumulation_steps=2)
    cut = _start(config, 2, site, cut_log, tiny_sd_cache, True, delay=30)
    deadline = time.monotonic() + BOUND_S
    while len(_global_batches(cut_log, 2)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    cut.send_signal(signal.SIGTERM)
    rc, cut_err = _wait(cut)
    assert "gave no result" not in cut_err and "stopped by SIGTERM" in cut_err, cut_err[-3000:]
    resumed = _config(tmp_path, "run", 2, streaming=False, gradient_accumulation_steps=2)
    rest = _start(resumed, 1, site, rest_log, tiny_sd_cache, True)
    rc, err = _wait(rest)
    assert rc == 0 and "resumed from checkpoint step-" in err, err[-3000:]
