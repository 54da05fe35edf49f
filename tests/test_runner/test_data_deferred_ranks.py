"""Header checks beside training with several processes (``torchrun --nproc_per_node 2``, gloo,
CPU, ``builtin:tiny-sd``): a bad image header ends every rank with the preflight's one-line
DataError (exit 2), not a lost peer, a hang or a traceback, with nothing half-written and
the lease released, whether the checks end while the ranks train or a rank's loader meets the
image first; a good dataset trains to the end and its index is stored once, by global rank
0, the one process that runs the preflight.

The threshold (`DEFERRED_CHECKS_MIN_EXAMPLES`) is lowered in every process of the run by a
``sitecustomize`` on the workers' ``PYTHONPATH`` (no environment variable of the product is
read for it). The same file holds the test's one fake, which only observes and delays: it
records which ranks run the header checks and every write to the run's store (``LocalStore``
works as ever), and holds the header checks back until the run has started (``config.yaml``
written) and ``CHECKS_DELAY`` seconds more, so that they end while the ranks train."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from dp_support import (
    THRESHOLD_SITE,
    TORCHRUN,
    RankRun,
    deferred_min,
    env,
    finish,
    free_port,
    same_error_everywhere,
    site_folder,
    store_recorder,
)
from train_support import caption_loader, config_file, make_config, streaming_loader, write_dataset

from kubetune.layout import CONFIG_KEY, DATA_INDEX_KEY, LEASE_KEY, PROGRESS_KEY, REPORT_KEY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
BOUND_S = 240
"""A run that has not ended by then hangs."""
SITE = """
import time
_checks = checks._header_checks

def _delayed(*args, **kwargs):
    with open(os.environ["OBSERVED_LOG"], "a") as log:
        log.write(f"{os.environ.get('RANK', 'single')} checks -\\n")
    deadline = time.monotonic() + 120
    while os.environ["STARTED"] and not os.path.exists(os.environ["STARTED"]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)  # the run has started (config.yaml written): training is next
    time.sleep(float(os.environ.get("CHECKS_DELAY", "0")))
    return _checks(*args, **kwargs)

checks._header_checks = _delayed
"""
"""What follows ``THRESHOLD_SITE`` in the workers' ``sitecustomize``; ``store_recorder``
follows it."""


def _launch(
    tmp_path: Path,
    cache: Path,
    *,
    n: int,
    bad: str | None,
    delay: float,
    steps: int,
    deferred: bool = True,
    streaming: bool = False,
    truncated: str | None = None,
    save_every: int = 2,
) -> dict:
    """Run 2 ranks on ``n`` images (``bad`` with a bad header, ``truncated`` cut short): what
    each rank printed, the exit codes torchrun reports, what the fake observed, the outputs."""
    data = write_dataset(tmp_path / "data", n=n)
    if bad:
        (data / bad).write_bytes(b"not an image at all")
    if truncated:  # its header reads well; decoding it fails
        (data / truncated).write_bytes((data / truncated).read_bytes()[:120])
    out = tmp_path / "out"
    loader = (streaming_loader if streaming else caption_loader)(data)
    cfg = make_config("SD_LORA", Path("builtin:tiny-sd"), data, out, data_loader=loader,
                      train_batch_size=1, max_train_steps=steps,
                      save_every_n_steps=save_every)  # fmt: skip
    config = config_file(cfg, tmp_path / "run.yaml")
    logs, observed = tmp_path / "logs", tmp_path / "observed.log"
    site = site_folder(tmp_path / "site", THRESHOLD_SITE, SITE, store_recorder("OBSERVED_LOG"))
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--log-dir", str(logs), "--redirects", "2", "-m", "runner", str(config)]  # fmt: skip
    extra = {"OBSERVED_LOG": str(observed), "CHECKS_DELAY": str(delay),
             "STARTED": str(out / CONFIG_KEY) if deferred else "",
             **deferred_min(deferred)}  # fmt: skip
    agent = subprocess.Popen(cmd, env=env(site, KUBETUNE_MODEL_CACHE=str(cache), **extra),
                             stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    stderr = finish(agent, BOUND_S, "the 2-process run")
    ranks = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    lines = [line.split(" ", 2) for line in observed.read_text().splitlines()]
    return {"rc": agent.returncode, "agent": stderr, "ranks": ranks, "observed": lines,
            "out": out}  # fmt: skip


def test_a_bad_header_checked_before_training_ends_every_rank_with_the_data_error(
    tmp_path: Path, tiny_sd_cache: Path
) -> None:
    """4 images, checks not deferred: rank 0's preflight fails before any write and its
    DataError reaches the other rank (which runs no preflight): both print it, exit 2."""
    run = _launch(tmp_path, tiny_sd_cache, n=4, bad="img-2.png", delay=0.0, steps=4,
                  deferred=False)  # fmt: skip
    _assert_data_error_everywhere(run)
    assert not run["out"].exists() or not any(run["out"].iterdir()), run["observed"]


def test_an_undecodable_image_ends_every_rank_with_the_same_error(
    tmp_path: Path, tiny_sd_cache: Path
) -> None:
    """An image whose header passes the preflight but does not decode, past
    ``max_bad_image_share`` (0: the first one): the rank whose loader meets it (rank 1, with
    seed 7) does not stop alone; every rank counts every rank's skipped examples at the same
    step and prints the same one-line error (exit 2). A checkpoint is due after every step:
    4 images over 2 ranks in batches of 1 are each drawn once in steps 1-2, so the step that
    trained the image's stand-in (rank 1's note of it not yet voted on) is 1 or 2. The ranks
    settle their notes before each checkpoint, so that step's checkpoint and every later one
    are never published: only step 1's can exist, when the image is in step 2. (Before, the
    note was settled one or two steps late, after that step's checkpoint was published.)"""
    run = _launch(tmp_path, tiny_sd_cache, n=4, bad=None, delay=0.0, steps=400, deferred=False,
                  truncated="img-2.png", save_every=1)  # fmt: skip
    _assert_data_error_everywhere(run, "max_bad_image_share: 1 of 4 examples")
    assert not (run["out"] / LEASE_KEY).exists()
    _assert_no_checkpoint_after_the_stand_in(run["out"])


def _assert_no_checkpoint_after_the_stand_in(out: Path) -> None:
    """Only step 1's checkpoint may exist (the bad example is trained in step 1 or 2), and
    nothing half-written: every step folder has its manifest."""
    folders = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert set(folders) <= {"step-000001"}, folders
    for name in folders:
        assert (out / "checkpoints" / name / "manifest.json").is_file(), name


@pytest.mark.parametrize(
    ("n", "bad", "delay", "met"),
    [(40, "img-2.png", 0.0, False), (4, "img-2.png", 20.0, True)],
    ids=["checks-end-first", "a-loader-meets-it-first"],
)
def test_a_bad_header_ends_every_rank_with_the_data_error(
    tmp_path: Path, tiny_sd_cache: Path, n: int, bad: str, delay: float, met: bool
) -> None:
    """The checks end as training starts, before any rank draws the bad image (40 images:
    with seed 7 it comes late in the epoch), so rank 0 alone knows, or 20 s into training,
    after a rank's loader met the bad image (4 images, all drawn in the first 2 steps: with
    seed 7 rank 1 draws it, so the rank that waits for the verdict is not the one that runs
    the checks; a checkpoint is due every step, and none is published from the step that
    trained its stand-in on). Every rank prints the same one-line data error; torchrun's
    first failure is exit 2. A rank it reports stopped by SIGTERM had printed that error
    already: torchrun stops the other workers as soon as one exits, and a worker still
    shutting down then dies of the signal."""
    run = _launch(tmp_path, tiny_sd_cache, n=n, bad=bad, delay=delay, steps=400, save_every=1)
    skipped = any("skipping a bad example" in text for text in run["ranks"].values())
    assert skipped == met, run["ranks"]  # the scenario ran as meant
    if met:  # settled before the checkpoint of the step that trained its stand-in
        _assert_no_checkpoint_after_the_stand_in(run["out"])
    _assert_data_error_everywhere(run)
    out = run["out"]
    assert (out / CONFIG_KEY).is_file()  # the run had started: the checks ran beside it
    assert not (out / DATA_INDEX_KEY).exists() and not (out / LEASE_KEY).exists()
    assert '">failed<' in (out / REPORT_KEY).read_text()  # the run's page says so
    for step in (out / "checkpoints").glob("step-*"):  # nothing half-written
        assert (step / "manifest.json").is_file(), sorted(p.name for p in step.iterdir())
    writers = {rank for rank, what, _ in run["observed"] if what != "checks"}
    assert writers == {"0"}, run["observed"]


def _assert_data_error_everywhere(run: dict, reason: str = "img-2.png") -> None:
    """Every rank printed the same one-line data error (no lost peer, no traceback), the
    first failure torchrun saw is exit 2, and only global rank 0 ran the header checks."""
    same_error_everywhere(RankRun(run["rc"], run["agent"], run["ranks"]), 2, reason)
    checked = {rank for rank, what, _ in run["observed"] if what == "checks"}
    assert checked == {"0"}, run["observed"]  # one preflight: global rank 0's


@pytest.mark.parametrize("order", ["unbucketed", "streaming"])
def test_a_good_dataset_trains_to_the_end_and_rank_0_stores_its_index_once(
    tmp_path: Path, tiny_sd_cache: Path, order: str
) -> None:
    """Checks delayed 3 s: they end while both ranks train; the index is written once, by
    rank 0, and the run completes on both ranks. ``streaming`` (aspect-ratio buckets in the
    streaming order): rank 0's checks are still the only ones; every rank's sampler takes
    the sizes they read from the run's store (``runner.data.size_relay``)."""
    run = _launch(tmp_path, tiny_sd_cache, n=4, bad=None, delay=3.0, steps=30,
                  streaming=order == "streaming")  # fmt: skip
    assert run["rc"] == 0, run["agent"][-3000:] + "".join(run["ranks"].values())[-3000:]
    out = run["out"]
    assert json.loads((out / PROGRESS_KEY).read_text())["state"] == "completed"
    assert (out / DATA_INDEX_KEY).is_file() and not (out / LEASE_KEY).exists()
    index_writes = [(r, k) for r, what, k in run["observed"] if what != "checks" and "index" in k]
    run_index = [rank for rank, key in index_writes if key == DATA_INDEX_KEY]
    assert run_index == ["0"], index_writes
    assert {rank for rank, _ in index_writes} == {"0"}, index_writes
    checked = {rank for rank, what, _ in run["observed"] if what == "checks"}
    assert checked == {"0"}, run["observed"]  # one preflight, whatever the order
