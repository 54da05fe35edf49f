"""Aspect-ratio buckets, the seeded batch sampler and mid-epoch resume of the loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_fixtures import BUCKET_SIZES, BUCKETS, lora_config, write_image_dir

from kubetune.config import AspectRatioBucketConfig
from kubetune.errors import ResumeMismatchError
from runner.data import build_train_dataloader
from runner.data.buckets import BucketBatchSampler, build_buckets, closest_bucket

SIZES = BUCKET_SIZES


def test_buckets_are_divisible_within_bounds_and_near_the_target_area() -> None:
    cfg = AspectRatioBucketConfig(**BUCKETS)
    buckets = build_buckets(cfg)
    assert (64, 64) in buckets and buckets == sorted(set(buckets))
    for h, w in buckets:
        assert h % 16 == 0 and w % 16 == 0
        assert 32 <= h <= 128 and 32 <= w <= 128
        assert h * w <= 64 * 64 and h * w > (64 * 64) * 0.6
        assert (w, h) in buckets


def test_closest_aspect_assignment() -> None:
    buckets = [(64, 64), (48, 80), (80, 48), (32, 128)]
    assert buckets[closest_bucket((100, 100), buckets)] == (64, 64)
    assert buckets[closest_bucket((60, 100), buckets)] == (48, 80)
    assert buckets[closest_bucket((100, 61), buckets)] == (80, 48)
    assert buckets[closest_bucket((10, 400), buckets)] == (32, 128)


def test_sampler_batches_are_single_bucket_cover_every_index_once_and_are_seeded() -> None:
    bucket_of = [i % 3 for i in range(23)]
    sampler = BucketBatchSampler(bucket_of, batch_size=4, seed=7)
    epoch0 = sampler.batches(0)
    assert len(epoch0) == len(sampler) == 6  # ceil(8/4) + ceil(8/4) + ceil(7/4)
    assert sorted(i for b in epoch0 for i in b) == list(range(23))
    assert all(len({bucket_of[i] for i in b}) == 1 for b in epoch0)
    assert epoch0 == BucketBatchSampler(bucket_of, 4, seed=7).batches(0)
    assert epoch0 != sampler.batches(1)
    assert epoch0 != BucketBatchSampler(bucket_of, 4, seed=8).batches(0)


def test_sampler_state_round_trip_mid_epoch() -> None:
    bucket_of = [i % 2 for i in range(20)]
    sampler = BucketBatchSampler(bucket_of, batch_size=3, seed=1)
    full = sampler.batches(0)
    it = iter(sampler)
    seen = [next(it) for _ in range(3)]
    state = sampler.state_dict()
    restored = BucketBatchSampler(bucket_of, batch_size=3, seed=1)
    restored.load_state_dict(state)
    assert seen + list(restored) == full
    assert restored.epoch == 1 and restored.position == 0  # epoch advanced at its end
    with pytest.raises(ResumeMismatchError):  # another data order
        BucketBatchSampler(bucket_of, batch_size=3, seed=2).load_state_dict(state)
    bigger = BucketBatchSampler(bucket_of, batch_size=4, seed=1)
    bigger.load_state_dict(state)  # another batch size: after the 9 examples seen
    done = bigger.batches(0)[: bigger.position]
    assert bigger.epoch == 0 and sum(map(len, done)) >= 9 > sum(map(len, done[:-1]))


def _bucket_loader(tmp_path: Path, **loader: object):
    write_image_dir(tmp_path / "d", SIZES)
    cfg = lora_config(
        {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": str(tmp_path / "d")},
        aspect_ratio_buckets=BUCKETS,
        **loader,
    )
    return cfg, build_train_dataloader(cfg, seed=5, batch_size=3, device_is_cuda=False)


def test_loader_batches_one_bucket_each_image_once(tmp_path: Path) -> None:
    _, loader = _bucket_loader(tmp_path, random_flip=True, center_crop=False)
    batches = list(loader)
    ids = [i for b in batches for i in b["id"]]
    assert sorted(ids) == sorted(f"img-{i:03d}.png" for i in range(len(SIZES)))
    shapes = set()
    for batch in batches:
        _, _, h, w = batch["pixel_values"].shape
        assert h % 16 == 0 and w % 16 == 0 and (h, w) in loader.buckets
        shapes.add((h, w))
        for (oh, ow), (top, left) in zip(
            batch["original_size_hw"].tolist(), batch["crop_top_left_yx"].tolist(), strict=True
        ):
            assert (ow, oh) in SIZES and top >= 0 and left >= 0
    assert len(shapes) >= 3  # wide, tall and square buckets all used


def test_loader_resumes_mid_epoch_with_exactly_the_remaining_batches(tmp_path: Path) -> None:
    cfg, loader = _bucket_loader(tmp_path, random_flip=True, center_crop=False)
    loader.set_epoch(2)
    reference = list(loader)
    assert loader.epoch == 3
    loader.set_epoch(2)
    consumed, state = [], None
    for batch in loader:
        consumed.append(batch)
        if len(consumed) == 2:
            state = loader.state_dict()
            break
    fresh = build_train_dataloader(cfg, seed=5, batch_size=3, device_is_cuda=False)
    fresh.load_state_dict(state)
    fresh.set_epoch(2)  # the training loop sets the epoch it resumes in: position is kept
    rest = list(fresh)
    resumed = consumed + rest
    assert [b["id"] for b in resumed] == [b["id"] for b in reference]
    for a, b in zip(resumed, reference, strict=True):
        assert a["caption"] == b["caption"]
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert fresh.epoch == 3 and len(list(fresh)) == len(fresh)  # next epoch is whole again


def test_loader_epochs_differ_and_repeat_by_seed(tmp_path: Path) -> None:
    cfg, loader = _bucket_loader(tmp_path)
    e0, e1 = [b["id"] for b in loader], [b["id"] for b in loader]
    assert e0 != e1
    again = build_train_dataloader(cfg, seed=5, batch_size=3, device_is_cuda=False)
    assert [b["id"] for b in again] == e0
