"""Exact mid-epoch resume with the sampler as the one owner of the data cursor: a run
stopped (the SIGTERM flag) and resumed several times, mid-epoch and at an epoch's end, ends
with the weights of an uninterrupted run — with aspect-ratio buckets + keep_in_memory,
DreamBooth's balanced batches and two loader workers — and checkpoints hold the cursor once.
Checkpoints in the layout written before this change (epoch / batch_in_epoch in the loop
state, the sampler's copy beside it) still resume exactly."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from data_fixtures import write_image_dir
from safetensors.torch import load_file
from train_support import caption_loader, make_config, train, write_dataset

from kubetune.config import PipelineConfig
from kubetune.errors import Preempted

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fixtures_models"]
pytestmark = pytest.mark.timeout(300)
STATE = "training_state.pt"
BUCKETS = {"target_resolution": 32, "start_dim": 16, "end_dim": 64, "divisible_by": 8}
MIXED = [(48, 24), (24, 48), (32, 32), (40, 30), (30, 40), (60, 20), (33, 32), (22, 45)]


def _folder(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def _saved(out: Path, step: int) -> dict[str, Any]:
    return torch.load(_folder(out, step) / STATE, map_location="cpu", weights_only=True)


def _stop_once(cfg: PipelineConfig) -> int:
    """Train with the stop flag already raised: one step, a checkpoint, Preempted."""
    stop = threading.Event()
    stop.set()
    with pytest.raises(Preempted, match=r"after step (\d+)") as info:
        train(cfg, stop=stop)
    found = re.search(r"after step (\d+)", str(info.value))
    assert found is not None
    return int(found.group(1))


def _assert_same_weights(ref: Path, out: Path, step: int) -> None:
    want = load_file(_folder(ref, step) / "trainable.safetensors")
    got = load_file(_folder(out, step) / "trainable.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)


def _resume_case(
    request: pytest.FixtureRequest, tmp_path: Path, stops: int, **overrides: Any
) -> tuple[PipelineConfig, PipelineConfig]:
    """Reference config and run config (trained with ``stops`` stops, then to the end)."""
    model = request.getfixturevalue("tiny_sd_dir")
    data = write_dataset(tmp_path / "plain", n=6)
    ref = make_config("SD_LORA", model, data, tmp_path / "ref", **overrides)
    run = make_config("SD_LORA", model, data, tmp_path / "run", **overrides)
    train(ref)
    assert [_stop_once(run) for _ in range(stops)] == list(range(1, stops + 1))
    return ref, run


def _bucket_loader(root: Path) -> dict[str, Any]:
    write_image_dir(root, MIXED)
    return _plain_loader(root, aspect_ratio_buckets=BUCKETS)


@pytest.mark.slow
def test_buckets_keep_in_memory_resume_exactly(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """8 images in several buckets, batch 2, accumulation 2: stops after steps 1, 2, 3
    (mid-epoch and across an epoch's end), then to step 4."""
    loader = _bucket_loader(tmp_path / "mixed")
    loader["dataset"]["keep_in_memory"] = True
    extra = dict(
        data_loader=loader, gradient_accumulation_steps=2, max_train_steps=4, save_every_n_steps=100
    )
    ref, run = _resume_case(request, tmp_path, 3, **extra)
    assert train(run).step == 4
    _assert_same_weights(tmp_path / "ref", tmp_path / "run", 4)


def test_dreambooth_resumes_exactly(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """3 instance + 5 class images, balanced batches of 2: stops after steps 1 and 2."""
    write_image_dir(tmp_path / "inst", [(40, 32), (32, 48), (36, 36)], captions=False)
    write_image_dir(
        tmp_path / "cls", [(64, 32), (30, 30), (32, 60), (48, 40), (33, 33)], captions=False
    )
    loader = {
        "type": "DREAMBOOTH_SD_DATA_LOADER",
        "instance_caption": "a photo of sks dog",
        "instance_dataset": {"type": "IMAGE_DIR_DATASET", "dataset_dir": str(tmp_path / "inst")},
        "class_dataset": {"type": "IMAGE_DIR_DATASET", "dataset_dir": str(tmp_path / "cls")},
        "class_caption": "a photo of a dog",
        "class_data_loss_weight": 0.5,
        "resolution": 32,
        "random_flip": True,
        "caption_dropout_rate": 0.3,
    }
    extra = dict(data_loader=loader, max_train_steps=4, save_every_n_steps=100)
    ref, run = _resume_case(request, tmp_path, 2, **extra)
    assert train(run).step == 4
    _assert_same_weights(tmp_path / "ref", tmp_path / "run", 4)


def _plain_loader(data: Path, **extra: Any) -> dict[str, Any]:
    return caption_loader(data, resolution=32, random_flip=True, center_crop=False,
                          caption_dropout_rate=0.5, **extra)  # fmt: skip


@pytest.mark.slow
def test_two_workers_resume_exactly_and_the_cursor_is_saved_once(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """6 images, batch 2 (3 batches an epoch), two workers loading ahead from one shared
    keep_in_memory block: stops after steps 1 and 2; the checkpoint's state holds the step
    in ``loop`` and the cursor in ``data`` only, at the batches the loop consumed."""
    data = write_dataset(tmp_path / "plain", n=6)
    loader = _plain_loader(data, dataloader_num_workers=2)
    loader["dataset"]["keep_in_memory"] = True  # the workers share the decoded images
    extra = dict(
        data_loader=loader,
        max_train_steps=4,
        save_every_n_steps=100,
    )
    ref, run = _resume_case(request, tmp_path, 2, **extra)
    saved = _saved(tmp_path / "run", 2)
    assert saved["loop"] == {"step": 2}
    cursors = [k for k, v in saved.items() if isinstance(v, dict) and "epoch" in v]
    assert cursors == ["data"]
    assert (saved["data"]["epoch"], saved["data"]["position"]) == (0, 2)
    assert train(run).step == 4
    _assert_same_weights(tmp_path / "ref", tmp_path / "run", 4)


# --- checkpoints written before the sampler owned the cursor ---------------------------------


def _to_old_layout(folder: Path) -> None:
    """Rewrite a checkpoint's state as the code before this change wrote it: the loop state
    held ``epoch`` / ``batch_in_epoch`` and the sampler's copy sat under ``loader``, which at
    an epoch's end still pointed at the finished epoch (position == its length). The
    manifest entry is updated so the checkpoint stays valid."""
    saved = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    cursor = saved.pop("data")
    epoch, position = cursor["epoch"], cursor["position"]
    saved["loop"] = {"step": saved["loop"]["step"], "epoch": epoch, "batch_in_epoch": position}
    loader = dict(cursor)
    if position == 0 and epoch > 0:
        loader.update(epoch=epoch - 1, position=cursor["num_batches"])
    saved["loader"] = loader
    torch.save(saved, folder / STATE)
    manifest = json.loads((folder / "manifest.json").read_text())
    raw = (folder / STATE).read_bytes()
    for entry in manifest["files"]:
        if entry["key"] == STATE:
            entry.update(size=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


@pytest.mark.slow
def test_old_layout_checkpoints_resume_exactly(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """4 images, batch 2: each checkpoint of a stop chain (step 1 mid-epoch, step 2 at the
    epoch's end) is turned into the old layout before the next resume; the run still ends
    exactly."""
    model = request.getfixturevalue("tiny_sd_dir")
    data = write_dataset(tmp_path / "plain", n=4)
    loader = _plain_loader(data)
    extra: dict[str, Any] = dict(data_loader=loader, max_train_steps=3, save_every_n_steps=100)
    ref = make_config("SD_LORA", model, data, tmp_path / "ref", **extra)
    run = make_config("SD_LORA", model, data, tmp_path / "run", **extra)
    train(ref)
    for step in (1, 2):
        assert _stop_once(run) == step
        _to_old_layout(_folder(tmp_path / "run", step))
    old = _saved(tmp_path / "run", 2)
    assert old["loop"] == {"step": 2, "epoch": 1, "batch_in_epoch": 0}
    assert (old["loader"]["epoch"], old["loader"]["position"]) == (0, 2)
    assert train(run).step == 3
    _assert_same_weights(tmp_path / "ref", tmp_path / "run", 3)
