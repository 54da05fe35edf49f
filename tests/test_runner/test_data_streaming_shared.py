"""One header reader per run in the streaming bucket order (``torchrun --nproc_per_node 2``,
gloo, CPU, ``builtin:tiny-sd``, 11 images of mixed sizes, header checks beside training):
global rank 0 alone reads the image headers, every rank forms the global batches of the
single-process run from the sizes it shares, and a failure of its checks (a bad header,
or the storage failing part way) ends every rank with the same one-line error, not a lost
peer.

The threshold (`DEFERRED_CHECKS_MIN_EXAMPLES`) is lowered in every process by a
``sitecustomize`` on the workers' ``PYTHONPATH`` (``dp_support.THRESHOLD_SITE``). The same
file holds the test's fakes: it observes (every ranged read of the dataset's store, i.e.
every header read, and every batch a rank's loader hands to training, each logged with the
rank), slows each header read down (``READ_DELAY``, so that sizes still stream in while the
ranks train) and, for one test, makes the local store fail the read of one image
(``FAIL_KEY``) with the `StorageError` an object store gives after its retries: a local
folder cannot be made to fail that way."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from data_fixtures import write_image_dir
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
)
from train_support import config_file, make_config, streaming_loader

from kubetune.layout import LEASE_KEY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
BOUND_S = 240
"""A run that has not ended by then hangs."""
STEPS = 8
SIZES = [(64, 64), (96, 48), (48, 96), (64, 64), (128, 64), (96, 48), (64, 64), (48, 96),
         (64, 128), (64, 64), (96, 48)]  # fmt: skip
SITE = """
import json, time
from kubetune.errors import StorageError
from kubetune.storage import LocalStore

def _log(entry):
    with open(os.environ["OBSERVED_LOG"], "a") as log:
        log.write(json.dumps([os.environ.get("RANK", "0"), *entry]) + "\\n")

_get_range = LocalStore.get_range

def _observed_range(self, key, start, length):
    _log(["read", key])
    time.sleep(float(os.environ.get("READ_DELAY", "0")))
    if key == os.environ.get("FAIL_KEY"):
        raise StorageError(f"{key}: the store failed (connection reset after 10 retries)")
    return _get_range(self, key, start, length)

LocalStore.get_range = _observed_range

import runner.data.loader as loader

_iter = loader.ResumableLoader.__iter__

def _observed_batches(self):
    for batch in _iter(self):
        _log(["batch", batch["index"]])
        yield batch

loader.ResumableLoader.__iter__ = _observed_batches
"""
"""What follows ``THRESHOLD_SITE`` in the workers' ``sitecustomize``."""


def _run(
    tmp_path: Path, cache: Path, name: str, procs: int, *, bad: str | None = None, **extra: str
) -> dict[str, Any]:
    """A run of ``procs`` processes (global batch 2) to its end: what each rank printed, the
    exit codes torchrun reports, and what the fake observed."""
    data = tmp_path / "data"
    if not data.exists():
        write_image_dir(data, SIZES)
        if bad:
            (data / bad).write_bytes(b"not an image at all")
    out = tmp_path / name / "out"  # its own parent: no index stored beside another run's
    cfg = make_config("SD_LORA", Path("builtin:tiny-sd"), data, out,
                      data_loader=streaming_loader(data), train_batch_size=2 // procs,
                      max_train_steps=STEPS, save_every_n_steps=100)  # fmt: skip
    config = config_file(cfg, tmp_path / f"{name}.yaml")
    logs, observed = tmp_path / f"{name}-logs", tmp_path / f"{name}.log"
    site = site_folder(tmp_path / f"{name}-site", THRESHOLD_SITE, SITE)
    cmd = [sys.executable, "-m", "runner", str(config)]
    if procs > 1:
        cmd = [*TORCHRUN, "--standalone", f"--nproc_per_node={procs}",
               f"--master_port={free_port()}", "--log-dir", str(logs), "--redirects", "2",
               "-m", "runner", str(config)]  # fmt: skip
    run_env = env(site, KUBETUNE_MODEL_CACHE=str(cache), OBSERVED_LOG=str(observed),
                  **deferred_min(True), **extra)  # fmt: skip
    proc = subprocess.Popen(cmd, env=run_env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, start_new_session=True)  # fmt: skip
    stderr = finish(proc, BOUND_S, f"the {procs}-process run")
    ranks = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    entries = [json.loads(line) for line in observed.read_text().splitlines()]
    return {"rc": proc.returncode, "agent": stderr, "ranks": ranks or {0: stderr},
            "entries": entries, "out": out}  # fmt: skip


def _reads(run: dict[str, Any]) -> Counter[str]:
    """Header reads per rank."""
    return Counter(rank for rank, what, *_ in run["entries"] if what == "read")


def _global_batches(run: dict[str, Any]) -> list[list[int]]:
    """The k-th batch of every rank together: the run's k-th global batch."""
    per_rank: dict[str, list[list[int]]] = {}
    for rank, what, *rest in run["entries"]:
        if what == "batch":
            per_rank.setdefault(rank, []).append(rest[0])
    steps = zip(*per_rank.values(), strict=True)
    return [sorted({i for part in step for i in part}) for step in steps]


def _everything(run: dict[str, Any]) -> str:
    return run["agent"][-3000:] + "\n".join(t[-3000:] for t in run["ranks"].values())


def test_only_rank_0_reads_headers_and_every_rank_takes_the_single_process_batches(
    tmp_path: Path, tiny_sd_cache: Path
) -> None:
    """Headers read at 0.2 s each (2.2 s for the dataset: sizes still arrive while the ranks
    train): rank 0 reads each image's header once and rank 1 none; the 2-process run's
    global batches are, step for step, those of the 1-process run."""
    ref = _run(tmp_path, tiny_sd_cache, "ref", 1, READ_DELAY="0.2")
    assert ref["rc"] == 0, _everything(ref)
    expected = _global_batches(ref)
    assert len(expected) == STEPS

    run = _run(tmp_path, tiny_sd_cache, "run", 2, READ_DELAY="0.2")
    assert run["rc"] == 0, _everything(run)
    assert _reads(run) == Counter({"0": len(SIZES)}), run["entries"]
    assert _global_batches(run) == expected


def _assert_same_error_everywhere(run: dict[str, Any], reason: str, exit_code: int) -> None:
    """Every rank printed the same one-line error (no lost peer, no traceback), the first
    failure torchrun saw has the error's exit code, and only global rank 0 read headers.
    A rank torchrun reports stopped by SIGTERM had printed that error already: torchrun
    stops the other workers as soon as one exits."""
    same_error_everywhere(RankRun(run["rc"], run["agent"], run["ranks"]), exit_code, reason)
    assert set(_reads(run)) == {"0"}, run["entries"]
    assert not (run["out"] / LEASE_KEY).exists()


def test_a_bad_header_ends_every_rank_with_the_same_data_error(
    tmp_path: Path, tiny_sd_cache: Path
) -> None:
    run = _run(tmp_path, tiny_sd_cache, "run", 2, bad="img-006.png", READ_DELAY="0.1")
    _assert_same_error_everywhere(run, "img-006.png", 2)


def test_a_storage_failure_in_the_checks_ends_every_rank_with_the_same_error(
    tmp_path: Path, tiny_sd_cache: Path
) -> None:
    """The store fails the header read of one image part way through the checks (the
    sizes read before it were shared already): every rank stops with the checks' one-line
    error and its exit code (1: a storage error), where before only the rank whose own
    checks failed said why and the other reported a lost peer."""
    run = _run(tmp_path, tiny_sd_cache, "run", 2, READ_DELAY="0.1", FAIL_KEY="img-007.png")
    _assert_same_error_everywhere(run, "img-007.png: the store failed", 1)
