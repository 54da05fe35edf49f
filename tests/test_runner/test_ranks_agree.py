"""Every rank of a multi-process run agrees (issue #23): on the seed (``seed: null`` drawn once,
on rank 0), on the weights (a checksum compared after setup and at every checkpoint, a
mismatch names the ranks), on when to stop (SIGTERM to one worker stops all after the same
step, rank 0 checkpoints, every worker exits 143), and only rank 0 writes to the run's store.
Real torchrun with gloo on CPU; the store writers are recorded by a ``sitecustomize`` that
wraps ``LocalStore``'s writes (the one fake: it only records, the store works as ever)."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dp_support import (
    children,
    env,
    free_port,
    ok,
    rank_of,
    site_folder,
    store_recorder,
    torchrun,
    torchrun_cmd,
)
from train_support import config_file, make_config, write_dataset

from kubetune.errors import KubetuneError, ProcessGroupError
from runner.training.distributed import Ranks

pytest_plugins = ["fixtures_models"]
pytestmark = pytest.mark.timeout(600)


def _config(tmp_path: Path, model: Path, **fields: Any) -> tuple[Path, Path]:
    data = write_dataset(tmp_path / "data", n=4)
    out = tmp_path / "out"
    cfg = make_config("SD_LORA", model, data, out, train_batch_size=1, **fields)
    return config_file(cfg, tmp_path / "run.yaml"), out


@pytest.mark.slow
def test_seed_null_is_drawn_once_and_only_rank_0_writes(
    tmp_path: Path, tiny_sd_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``seed: null``: rank 0 draws the seed and broadcasts it, so the LoRA initial weights
    agree (the checksum after setup and at each checkpoint passes). Every write to the
    store, in a run and in a --no-resume rerun that discards it, is rank 0's."""
    config, out = _config(tmp_path, tiny_sd_dir, seed=None, max_train_steps=2,
                          save_every_n_steps=1)  # fmt: skip
    site = site_folder(tmp_path / "site", store_recorder("WRITERS_LOG"))
    writers = tmp_path / "writers.log"
    monkeypatch.setenv("WRITERS_LOG", str(writers))
    ok(torchrun(config, first=site))
    ok(torchrun(config, "--no-resume", first=site))
    lines = [line.split(" ", 2) for line in writers.read_text().splitlines()]
    keys = {key for _, _, key in lines}
    assert "checkpoints/step-000002/manifest.json" in keys and "progress.json" in keys
    assert {"delete"} <= {name for _, name, _ in lines}  # the rerun discarded the old run
    assert {rank for rank, _, _ in lines} == {"0"}
    info = json.loads((out / "checkpoints/step-000002/run_info.json").read_text())
    assert isinstance(info["seed"], int)


def _compare(rank: int, port: int, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=3)  # fmt: skip
    state = SimpleNamespace(process_index=rank, num_processes=3, is_main_process=rank == 0,
                            device=torch.device("cpu"))  # fmt: skip
    ranks = Ranks(state)  # type: ignore[arg-type]
    same = {"unet.lora_A": torch.ones(4, 4), "unet.lora_B": torch.zeros(4)}
    ranks.check_same(same, "after setup")
    odd = dict(same, **{"unet.lora_B": torch.full((4,), float(rank == 2))})
    try:
        ranks.check_same(odd, "at step 7")
        message = "no error"
    except ProcessGroupError as err:
        message = str(err)
    Path(results, f"rank-{rank}").write_text(message)
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_weight_mismatch_is_a_loud_error_naming_the_ranks(tmp_path: Path) -> None:
    """Three gloo processes; rank 2's weights differ at 'step 7': every rank raises
    ProcessGroupError naming rank 2 and the step, after a first comparison that agreed."""
    mp.spawn(_compare, args=(free_port(), str(tmp_path)), nprocs=3, join=True)
    for rank in range(3):
        message = (tmp_path / f"rank-{rank}").read_text()
        assert "rank [2] differ from rank 0's at step 7" in message, message


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_every_rank_after_the_same_step(
    tmp_path: Path, tiny_sd_dir: Path
) -> None:
    """SIGTERM to rank 1's worker alone (as one node's pod is signalled before another's):
    both ranks stop after the same step, rank 0 publishes that step's checkpoint, both exit
    143 (Preempted), and the rerun resumes from it."""
    config, out = _config(tmp_path, tiny_sd_dir, max_train_steps=400, save_every_n_steps=2)
    agent = subprocess.Popen(torchrun_cmd(config), env=env(), stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / "checkpoints/step-000002/manifest.json", agent)
        workers = {rank_of(pid): pid for pid in children(agent.pid)}
        os.kill(workers[1], signal.SIGTERM)
        _, stderr = agent.communicate(timeout=180)
    finally:
        agent.kill()
    stopped = re.findall(r"stopped by SIGTERM after step (\d+)", stderr)
    assert len(stopped) == 2 and len(set(stopped)) == 1, stderr[-3000:]
    step = int(stopped[0])
    assert (out / f"checkpoints/step-{step:06d}/manifest.json").exists()
    assert json.loads((out / "progress.json").read_text())["state"] == "preempted"
    assert stderr.count("exitcode  : 143") + stderr.count("exitcode: 143") >= 1, stderr[-3000:]
    rerun = ok(torchrun(config, "--set", f"max_train_steps={step + 1}"))
    assert f"resumed from checkpoint step-{step:06d}" in rerun.stderr


def _wait_for(path: Path, agent: subprocess.Popen[str], limit: float = 240) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        assert agent.poll() is None, "torchrun ended early"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def test_cuda_rng_restore_tolerates_another_gpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint's per-GPU RNG states restore on the GPUs visible now: 4 saved on 2 GPUs
    restore the first 2, 1 saved on 2 restores GPU 0 (IndexError before). No GPU here: the
    torch.cuda calls are replaced by recorders (the one fake of this test)."""
    from runner.checkpoint import state as checkpoint_state

    restored: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.append(i))
    saved = [torch.zeros(8, dtype=torch.uint8) for _ in range(4)]
    checkpoint_state.set_cuda_rng_states(saved)
    assert restored == [0, 1]
    restored.clear()
    checkpoint_state.set_cuda_rng_states(saved[:1])
    assert restored == [0]


def test_images_per_step_count_the_global_batch(tmp_path: Path) -> None:
    """Progress (images/s, ETA) counts every process's examples: a rank's step of 2 × 2
    micro-batches of 2 examples in global batches of 4 trains 8 images."""
    from data_fixtures import lora_config, write_image_dir

    from runner.data import build_train_dataloader
    from runner.training.loop import step_inputs

    write_image_dir(tmp_path / "d", [(64, 64)] * 8)
    cfg = lora_config({"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": str(tmp_path / "d")})
    loader = build_train_dataloader(
        cfg, seed=1, batch_size=2, device_is_cuda=False, num_processes=2, process_index=1
    )
    item = next(step_inputs(loader, 2))
    assert [len(b["caption"]) for b in item.group] == [2, 2]
    assert item.images == 8


def _wait_alone(rank: int, port: int, results: str) -> None:
    """Rank 0 waits in a collective rank 1 never joins (rank 1 is busy: a long validation)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")  # fmt: skip
    from data_fixtures import lora_config

    from runner.session.settings import process_group_timeout
    from runner.training.distributed import start_processes

    cfg = lora_config({"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": results})
    cfg = cfg.model_copy(update={"job": cfg.job or _job(process_group_timeout_minutes=0.05)})
    ranks = Ranks(start_processes(process_group_timeout(cfg)))
    if rank == 1:
        time.sleep(20)
        os._exit(0)
    start = time.monotonic()
    try:
        ranks.agree("seed")
        message = "no error"
    except ProcessGroupError as err:
        message = str(err)
    Path(results, "rank-0").write_text(f"{time.monotonic() - start:.1f}\n{message}")
    os._exit(0)  # gloo aborts the interpreter's teardown when an op was abandoned


def _job(**fields: Any) -> Any:
    from kubetune.config import JobConfig

    return JobConfig(**fields)


@pytest.mark.slow
def test_the_process_group_timeout_comes_from_the_job_section(tmp_path: Path) -> None:
    """job.process_group_timeout_minutes reaches init_process_group: with 0.05 (3 s), rank 0
    waiting for a rank that does not come gives up in seconds (not torch's 10 minutes) with
    one ProcessGroupError line."""
    mp.spawn(_wait_alone, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    took, message = (tmp_path / "rank-0").read_text().split("\n", 1)
    assert "lost contact with the other processes while agreeing" in message, message
    assert 2.5 <= float(took) < 15


def _each(rank: int, port: int, results: str) -> None:
    """Three ranks run ``Ranks.each``: all well (each keeps its own value), then ranks 1 and 2
    failing with different errors (every rank raises rank 1's), then a ``ConfigError`` that
    does not pickle back as itself (it travels as ``RankFailed``: its line, exit 2)."""
    from kubetune.errors import ConfigError, DataError

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=3)  # fmt: skip
    state = SimpleNamespace(process_index=rank, num_processes=3, is_main_process=rank == 0,
                            device=torch.device("cpu"))  # fmt: skip
    ranks = Ranks(state)  # type: ignore[arg-type]
    seen = [str(ranks.each(lambda: rank * 10))]

    def failing() -> None:
        if rank:
            raise DataError(f"img-{rank}.png: not an image")

    def bad_config() -> None:
        if rank == 2:
            raise ConfigError(["run.yaml:3: lora_rank_dim: must be > 0", "run.yaml:4: seed"])

    for work in (failing, bad_config):
        try:
            ranks.each(work)
            seen.append("no error")
        except KubetuneError as err:
            seen.append(f"{type(err).__name__} {err.exit_code} {err}")
    Path(results, f"rank-{rank}").write_text(json.dumps(seen))
    dist.destroy_process_group()


@pytest.mark.slow
def test_one_ranks_failure_is_raised_on_every_rank(tmp_path: Path) -> None:
    """Three gloo processes: ``Ranks.each`` keeps each rank's value when all succeed; when some
    fail, every rank raises the lowest failing rank's error, with its exit code (the one-line
    message each prints), a ConfigError included."""
    mp.spawn(_each, args=(free_port(), str(tmp_path)), nprocs=3, join=True)
    config = "run.yaml:3: lora_rank_dim: must be > 0\nrun.yaml:4: seed"
    for rank in range(3):
        seen = json.loads((tmp_path / f"rank-{rank}").read_text())
        kind = "ConfigError" if rank == 2 else "RankFailed"
        expected = [str(rank * 10), "DataError 2 img-1.png: not an image", f"{kind} 2 {config}"]
        assert seen == expected, seen


def test_an_error_travels_to_the_other_ranks_as_itself_or_as_its_line_and_code() -> None:
    """``portable``: kubetune's errors pickle back as themselves; one that would come back
    otherwise (a ``ConfigError``'s problems) or not at all (a local class) travels as
    ``RankFailed`` with the same line and exit code."""
    from kubetune.errors import ConfigError, DataError, RunLocked
    from runner.training.distributed import RankFailed, portable

    for same in (DataError("img-2.png: not an image"), RunLocked("held", hint="wait")):
        assert portable(same) is same
    config = ConfigError(["a.yaml:1: seed: bad", "a.yaml:2: model: missing"])

    class Local(Exception):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(f"{a} {b}")

    for err, code in ((config, 2), (Local(1, 2), 1)):
        sent = portable(err)
        assert isinstance(sent, RankFailed) and (str(sent), sent.exit_code) == (str(err), code)
        back = pickle.loads(pickle.dumps(sent))
        assert (type(back), str(back), back.exit_code) == (RankFailed, str(err), code)
