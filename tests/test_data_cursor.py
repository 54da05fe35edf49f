"""The batch sampler is the one owner of the data cursor (epoch + batches of it consumed):
an epoch's order is a function of (seed, epoch) only, the position counts batches the
consumer took (not batches workers prefetched), and its state round-trips, including the
end-of-epoch position older checkpoints stored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from data_fixtures import lora_config, write_image_dir

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
