"""A step that one rank of a multi-process run does alone, or that fails on one rank alone, ends
every rank with that rank's one-line error and exit code (2 for bad input), not with "lost
contact with the other processes" or a gloo timeout on the others: loading the base model
(each rank loads its own copy: a node's download or cache can fail alone), taking the run
lease, choosing the checkpoint to resume from, and rank 0's writes (the run's config, a
checkpoint, validation images, ``final/``). Real ``torchrun --nproc_per_node 2`` with gloo on
CPU over ``builtin:tiny-sd``.

The failures of the lease and the resume point are real (a lease held by another runner, a
checkpoint of another LoRA rank). The others are injected by a ``sitecustomize`` on the
workers' ``PYTHONPATH`` that acts only in the process whose ``RANK`` is ``FAIL_RANK``:
``FAIL_AT=model`` makes ``builtin_model`` raise the ``ModelError`` a broken model cache
would; any other ``FAIL_AT`` is a key prefix whose writes ``LocalStore`` refuses with the
``StorageUserError`` an access-denied bucket policy gives (the store works as ever for every
other key and in every other process)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dp_support import (
    RankRun,
    children,
    ok,
    rank_of,
    same_error_everywhere,
    single,
    site_folder,
    torchrun_logged,
    wait_for,
)
from train_support import caption_loader, config_file, make_config, write_dataset

from kubetune.layout import CONFIG_KEY, LEASE_KEY, PROGRESS_KEY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
SITE = """
import os

if os.environ.get("RANK") is not None and os.environ.get("RANK") == os.environ.get("FAIL_RANK"):
    _where, _rank = os.environ["FAIL_AT"], os.environ["RANK"]
    if _where == "model":
        import runner.models.loading as _loading

        def _broken(name, cache):
            raise _loading.ModelError(
                f"builtin:{name}: cannot build it in {cache}: injected on rank {_rank} alone"
            )

        _loading.builtin_model = _broken
    else:
        from kubetune.errors import StorageUserError
        from kubetune.storage import LocalStore

        _write = LocalStore._atomic_write

        def _refused(self, key, *args, **kwargs):
            if key.startswith(_where):
                raise StorageUserError(f"{self.url(key)}: access denied (injected on rank {_rank})")
            return _write(self, key, *args, **kwargs)

        LocalStore._atomic_write = _refused
"""


def _config(tmp_path: Path, **fields: Any) -> tuple[Path, Path]:
    data = write_dataset(tmp_path / "data", n=4)
    out = tmp_path / "out"
    fields = {"train_batch_size": 1, "max_train_steps": 4, "save_every_n_steps": 2} | fields
    cfg = make_config("SD_LORA", Path("builtin:tiny-sd"), data, out, **fields)
    return config_file(cfg, tmp_path / "run.yaml"), out


def _run(
    tmp_path: Path, config: Path, cache: Path, *args: str, fail_at: str = "", rank: int = 0,
    meanwhile: Callable[[subprocess.Popen[str]], None] | None = None,
) -> RankRun:  # fmt: skip
    site = site_folder(tmp_path / "site", SITE)
    return torchrun_logged(config, *args, logs=tmp_path / "logs", first=site,
                           meanwhile=meanwhile, KUBETUNE_MODEL_CACHE=str(cache),
                           FAIL_AT=fail_at, FAIL_RANK=str(rank) if fail_at else "")  # fmt: skip


@pytest.mark.parametrize("rank", [0, 1])
def test_a_model_that_fails_to_load_on_one_rank_ends_every_rank_with_its_error(
    tmp_path: Path, tiny_sd_cache: Path, rank: int
) -> None:
    """The base model fails to load on rank ``rank`` alone (its cache is broken, injected): every
    rank prints that rank's ModelError and exits 2; the run wrote nothing (no lease taken)."""
    config, out = _config(tmp_path)
    run = _run(tmp_path, config, tiny_sd_cache, fail_at="model", rank=rank)
    same_error_everywhere(run, 2, f"injected on rank {rank} alone")
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))


def test_a_run_another_runner_holds_ends_every_rank_with_run_locked(
    tmp_path: Path, tiny_sd_cache: Path
) -> None:
    """A live lease of another host (renewed now), ``lease_wait_seconds: 0``: rank 0 alone takes
    the lease and is refused; every rank prints the RunLocked line and exits 2, and the other
    runner's lease stays."""
    config, out = _config(tmp_path, lease_wait_seconds=0)
    out.mkdir()
    holder = {"holder": "pod-elsewhere/7", "host": f"not-{socket.gethostname()}", "pid": 7,
              "renewed_unix": time.time() + 3600}  # fmt: skip
    (out / LEASE_KEY).write_text(json.dumps(holder))
    run = _run(tmp_path, config, tiny_sd_cache)
    same_error_everywhere(run, 2, "another runner holds this run: pod-elsewhere/7")
    assert json.loads((out / LEASE_KEY).read_text())["holder"] == "pod-elsewhere/7"


def test_a_checkpoint_of_another_config_ends_every_rank_with_the_mismatch(
    tmp_path: Path, tiny_sd_cache: Path
) -> None:
    """A checkpoint written by one process with LoRA rank 4, resumed by two with rank 8: rank 0
    alone chooses the resume point and refuses it; every rank prints the ResumeMismatchError
    (not "rank 0 failed to start", exit 1) and exits 2."""
    config, out = _config(tmp_path, max_train_steps=2, lora_rank_dim=4)
    ok(single(config, KUBETUNE_MODEL_CACHE=str(tiny_sd_cache)))
    run = _run(tmp_path, config, tiny_sd_cache, "--set", "lora_rank_dim=8")
    same_error_everywhere(run, 2, "written by an incompatible config (lora_rank_dim")


@pytest.mark.parametrize(
    ("refused", "fields"),
    [
        (CONFIG_KEY, {}),
        ("checkpoints/step-000002/", {}),
        ("validation/", {"validation_prompts": ["a cat"], "validate_every_n_steps": 2}),
        ("final/", {}),
    ],
    ids=["config", "checkpoint", "validation", "final"],
)
def test_a_write_refused_on_rank_0_ends_every_rank_with_its_error(
    tmp_path: Path, tiny_sd_cache: Path, refused: str, fields: dict[str, Any]
) -> None:
    """Rank 0, the run's one writer, is refused the writes under ``refused`` (access denied,
    injected): as the run starts (its config), while it trains (step 2's checkpoint, whose upload
    runs beside step 3 and 4, or a validation), or as it ends (``final/``). Every rank prints
    rank 0's StorageUserError and exits 2, and rank 0 released the run lease."""
    config, out = _config(tmp_path, **fields)
    run = _run(tmp_path, config, tiny_sd_cache, fail_at=refused, rank=0)
    same_error_everywhere(run, 2, "access denied (injected on rank 0)")
    assert not (out / LEASE_KEY).exists()


def test_a_stop_rank_0_cannot_record_ends_every_rank_with_its_error(
    tmp_path: Path, tiny_sd_cache: Path
) -> None:
    """SIGTERM to rank 1 once step 2's checkpoint is published, in a run of 400 steps; rank 0 is
    refused every write of progress.json (injected; the ones beside training only log a
    warning), so the stop's record, written after the stop checkpoint, fails on rank 0 alone:
    every rank prints that StorageUserError and exits 2 (not 143 on rank 1 and 2 on rank 0),
    and the stop checkpoint, after step 2, is published."""
    config, out = _config(tmp_path, max_train_steps=400)
    checkpoints = out / "checkpoints"

    def stop_rank_1(agent: subprocess.Popen[str]) -> None:
        wait_for(checkpoints / "step-000002" / "manifest.json", agent)
        workers = {rank_of(pid): pid for pid in children(agent.pid)}
        os.kill(workers[1], signal.SIGTERM)

    run = _run(tmp_path, config, tiny_sd_cache, fail_at=PROGRESS_KEY, meanwhile=stop_rank_1)
    same_error_everywhere(run, 2, f"{PROGRESS_KEY}: access denied (injected on rank 0)")
    assert not (out / "final").exists()  # it stopped: the scenario ran as meant
    stopped = max(p.parent.name for p in checkpoints.glob("step-*/manifest.json"))
    assert stopped > "step-000002", stopped


def test_a_skipped_example_rank_0_cannot_publish_is_a_warning_and_training_goes_on(
    tmp_path: Path, tiny_sd_cache: Path
) -> None:
    """An image whose header reads well but that does not decode, within
    ``max_bad_image_share``: the ranks skip it and train on. Rank 0 is refused every write of
    progress.json (injected), so publishing the skip at once (``Session.note_bad``, mid-step)
    fails on rank 0 alone: it logs one warning and trains on, and ``final/`` is published;
    then the completed record's write fails on rank 0, and every rank prints that one error.
    (Before, rank 0 stopped at the skip alone and rank 1 met a lost peer.)"""
    data = tmp_path / "data"
    loader = caption_loader(data, max_bad_image_share=0.5)
    config, out = _config(tmp_path, data_loader=loader)
    (data / "img-2.png").write_bytes((data / "img-2.png").read_bytes()[:120])  # cut short
    run = _run(tmp_path, config, tiny_sd_cache, fail_at=PROGRESS_KEY, rank=0)
    same_error_everywhere(run, 2, f"{PROGRESS_KEY}: access denied (injected on rank 0)")
    assert (out / "final").is_dir(), run.everything()
    assert run.ranks[0].count("could not publish the skipped examples") == 1, run.everything()
