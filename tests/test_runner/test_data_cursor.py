"""The batch sampler is the one owner of the data cursor (epoch + batches of it consumed):
an epoch's order is a function of (seed, epoch) only, the position counts batches the
consumer took (not batches workers prefetched), and its state round-trips, including the
end-of-epoch position older checkpoints stored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from data_fixtures import (
    lora_config,
    ti_config,
    upload_tree,
    write_hf_dataset,
    write_image_dir,
)
from s3server import S3Server

from runner.data import build_train_dataloader
from runner.data.buckets import BucketBatchSampler
from runner.data.dreambooth import DreamBoothBatchSampler
from runner.data.loader import ResumableLoader

BUCKET_OF = [i % 3 for i in range(17)]


def _samplers(seed: int) -> dict[str, BucketBatchSampler]:
    return {
        "buckets": BucketBatchSampler(BUCKET_OF, 2, seed),
        "dreambooth": DreamBoothBatchSampler(BUCKET_OF, 6, 2, seed, bucketed=False),
        "dreambooth-buckets": DreamBoothBatchSampler(BUCKET_OF, 6, 2, seed, bucketed=True),
    }


@pytest.mark.parametrize("kind", ["buckets", "dreambooth", "dreambooth-buckets"])
def test_epoch_order_is_a_function_of_seed_and_epoch_only(kind: str) -> None:
    """Whatever happened before (whole epochs, abandoned partial passes, state round trips),
    epoch N yields what a fresh sampler of the same seed plans for epoch N."""
    lived = _samplers(seed=3)[kind]
    list(lived)  # epoch 0 whole
    partial = iter(lived)
    next(partial), next(partial)  # epoch 1: two batches, then the pass is abandoned
    moved = _samplers(seed=3)[kind]
    moved.load_state_dict(lived.state_dict())
    list(moved)  # rest of epoch 1
    assert moved.epoch == 2
    epoch2 = list(moved)
    assert epoch2 == _samplers(seed=3)[kind].batches(2)
    jumped = _samplers(seed=3)[kind]
    jumped.set_epoch(2)
    assert list(jumped) == epoch2
    assert epoch2 != _samplers(seed=4)[kind].batches(2)
    assert epoch2 != _samplers(seed=3)[kind].batches(3)


def test_cursor_advances_as_batches_are_consumed_and_rolls_over_at_the_epoch_end() -> None:
    sampler = BucketBatchSampler(BUCKET_OF, 4, seed=1)
    batches = iter(sampler)
    for taken in range(1, len(sampler)):
        next(batches)
        assert (sampler.epoch, sampler.position) == (0, taken)
    next(batches)  # the epoch's last batch: the cursor is at the next epoch's start at once
    assert (sampler.epoch, sampler.position) == (1, 0)
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["position"] == 0


def test_an_end_of_epoch_position_from_an_older_checkpoint_means_the_next_epoch() -> None:
    """Checkpoints written before this change stored (epoch, len) at an epoch's end."""
    sampler = BucketBatchSampler(BUCKET_OF, 4, seed=1)
    state = {**sampler.state_dict(), "epoch": 2, "position": len(sampler)}
    restored = BucketBatchSampler(BUCKET_OF, 4, seed=1)
    restored.load_state_dict(state)
    assert (restored.epoch, restored.position) == (3, 0)
    assert list(restored) == sampler.batches(3)


def _loader(tmp_path: Path, **extra: Any) -> tuple[Any, ResumableLoader]:
    data = tmp_path / "d"
    if not data.exists():
        write_image_dir(data, [(40 + 4 * i, 40) for i in range(12)])
    cfg = lora_config(
        {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": str(data)},
        random_flip=True,
        center_crop=False,
        caption_dropout_rate=0.5,
        **extra,
    )
    return cfg, build_train_dataloader(cfg, seed=5, batch_size=2, device_is_cuda=False)


def _ids(batches: list[dict[str, Any]]) -> list[tuple[list[str], list[str]]]:
    return [(b["id"], b["caption"]) for b in batches]


def test_position_counts_batches_the_loop_took_not_those_workers_prefetched(
    tmp_path: Path,
) -> None:
    """With two workers several batches are loaded ahead; the cursor counts only the ones
    handed out, and a loader restored from it yields exactly the rest (same captions, so
    caption dropout is seeded per image and epoch, not per worker)."""
    cfg, loader = _loader(tmp_path, dataloader_num_workers=2)
    assert len(loader) == 6
    batches = iter(loader)
    taken = [next(batches), next(batches)]
    assert loader.state_dict()["position"] == 2
    state = loader.state_dict()
    rest = list(batches)
    again = build_train_dataloader(cfg, seed=5, batch_size=2, device_is_cuda=False)
    again.load_state_dict(state)
    assert _ids(list(again)) == _ids(rest)
    _, single = _loader(tmp_path, dataloader_num_workers=0)
    assert _ids(taken + rest) == _ids(list(single))  # workers change nothing


MIXED = [(48, 24), (24, 48), (32, 32), (40, 30), (30, 40), (60, 20), (33, 32), (22, 45), (36, 36)]
BUCKETS = {"target_resolution": 32, "start_dim": 16, "end_dim": 64, "divisible_by": 8}


def _config(case: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """One loader configuration per case: each dataset type and loader family."""
    local = {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": str(tmp_path / "d")}
    write_image_dir(tmp_path / "d", MIXED)
    shuffled = dict(random_flip=True, center_crop=False, caption_dropout_rate=0.5)
    if case == "buckets-in-memory":
        return lora_config({**local, "keep_in_memory": True}, aspect_ratio_buckets=BUCKETS)
    if case == "streaming":
        streaming = {**BUCKETS, "order": "streaming"}
        return lora_config(local, aspect_ratio_buckets=streaming, **shuffled)
    if case == "ti":
        return ti_config({"type": "IMAGE_DIR_DATASET", "dataset_dir": str(tmp_path / "d")})
    if case == "hf":
        request.getfixturevalue("monkeypatch").setenv("HF_DATASETS_OFFLINE", "1")
        write_hf_dataset(tmp_path / "hf", MIXED)
        hf = {"type": "HF_HUB_IMAGE_CAPTION_DATASET", "dataset_name": str(tmp_path / "hf")}
        return lora_config(hf, **shuffled)
    s3: S3Server = request.getfixturevalue("s3_env")
    bucket = request.getfixturevalue("s3_bucket")
    upload_tree(s3.client(), bucket, "d", tmp_path / "d")
    remote = {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": f"s3://{bucket}/d"}
    if case == "streaming-s3-two-workers":
        streaming = {**BUCKETS, "order": "streaming"}
        return lora_config(
            remote, dataloader_num_workers=2, aspect_ratio_buckets=streaming, **shuffled
        )
    return lora_config(remote, dataloader_num_workers=2, **shuffled)


@pytest.mark.parametrize(
    "case",
    ["buckets-in-memory", "ti", "hf", "s3-two-workers", "streaming", "streaming-s3-two-workers"],
)
@pytest.mark.slow
def test_every_loader_resumes_mid_epoch_from_the_cursor_alone(
    case: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Epoch 0, two batches of epoch 1, then the cursor is saved: a fresh loader restored
    from it yields exactly the rest of epoch 1 and epoch 2 (same pixels and captions)."""
    cfg = _config(case, tmp_path, request)
    loader = build_train_dataloader(cfg, seed=2, batch_size=2, device_is_cuda=False)
    list(loader)
    batches = iter(loader)
    next(batches), next(batches)
    state = loader.state_dict()
    assert (state["epoch"], state["position"]) == (1, 2)
    expected = list(batches) + list(loader)
    again = build_train_dataloader(cfg, seed=2, batch_size=2, device_is_cuda=False)
    again.load_state_dict(state)
    got = list(again) + list(again)
    assert _ids(got) == _ids(expected)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_a_training_state_in_the_old_layout_is_read_into_the_one_cursor() -> None:
    """Before this change the loop state held epoch / batch_in_epoch beside the sampler's
    copy under ``loader`` (which, at an epoch's end, still named the finished epoch)."""
    from runner.checkpoint.state import upgrade_legacy_state

    sampler = BucketBatchSampler(BUCKET_OF, 4, seed=1)
    plan = {"fingerprint": sampler.legacy_fingerprint(), "num_batches": len(sampler)}
    mid = {
        "loop": {"step": 7, "epoch": 1, "batch_in_epoch": 2},
        "loader": {"epoch": 1, "position": 2, **plan},
        "rng": {"python": 1},
    }
    end = {
        "loop": {"step": 9, "epoch": 2, "batch_in_epoch": 0},
        "loader": {"epoch": 1, "position": len(sampler), **plan},
    }
    for old, cursor in ((mid, (1, 2)), (end, (2, 0))):
        new = upgrade_legacy_state(old)
        assert set(new) == set(old) - {"loader"} | {"data"}
        assert new["loop"] == {"step": old["loop"]["step"]}
        restored = BucketBatchSampler(BUCKET_OF, 4, seed=1)
        restored.load_state_dict(new["data"])
        assert (restored.epoch, restored.position) == cursor
    current = {"loop": {"step": 3}, "data": sampler.state_dict()}
    assert upgrade_legacy_state(current) is current  # today's layout passes through
